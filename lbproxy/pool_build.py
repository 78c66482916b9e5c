"""What a pool's routing is built from and what building it makes: its tokenizer (with the
compiled chat template), its BuildContext (prefix indexes) and its routers.

Config validation builds these to check them and keeps the result on the Pool
(`Pool.take_build`), so that the runtime's PoolTable takes it instead of building it
again. Each build is handed out once: two tables never share a router (its indexes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lbproxy.routing.disagg import DisaggRouter
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY as PRECISE_INDEX_KEY
from lbproxy.routing.profiles import build_router

if TYPE_CHECKING:
    from lbproxy.config import Pool
    from lbproxy.tokenization.token_cache import PromptTokenizer
    from lbproxy.tokenization.tokenizer import Tokenizer


def routing_key(pool: Pool, metrics_max_age: float) -> tuple[Any, ...]:
    """Everything a pool's routers depend on: equal keys, interchangeable routers."""
    return (
        pool.routing,
        pool.tokenizer,
        pool.chat_template,
        pool.disaggregation,
        (pool.models or [""])[0],
        metrics_max_age,
        pool.flow().enabled,  # the prefix scorers' hot-spot rule
    )


def load_pool_tokenizer(pool: Pool) -> Tokenizer | None:
    if pool.tokenizer is None:
        return None
    # Imported here: tokenizers and jinja2 cost a pool without a tokenizer nothing.
    from lbproxy.tokenization.tokenizer import Tokenizer

    path = None if pool.tokenizer == "default" else pool.tokenizer
    return Tokenizer.from_file(path, chat_template=pool.chat_template)


def build_context(pool: Pool, tokenizer: Tokenizer | None, metrics_max_age: float) -> BuildContext:
    return BuildContext(
        pool=pool.name,
        model=(pool.models or [""])[0],
        metrics_max_age=metrics_max_age,
        tokenizer=tokenizer,
        flow_control=pool.flow().enabled,
    )


@dataclass(slots=True)
class PoolBuild:
    """A pool's built routing; `claim` hands it out once."""

    key: tuple[Any, ...]
    bctx: BuildContext
    router: Router
    disagg: DisaggRouter | None
    tokenize: PromptTokenizer | None = None
    routing_tokenizer: PromptTokenizer | None = None  # tokenize, if a scorer needs the ids
    _claimed: bool = field(default=False, repr=False)

    @classmethod
    def assemble(
        cls,
        pool: Pool,
        metrics_max_age: float,
        bctx: BuildContext,
        router: Router,
        sides: tuple[Router, Router] | None,
    ) -> PoolBuild:
        dis = pool.disaggregation
        disagg = None
        if dis is not None and sides is not None:
            disagg = DisaggRouter(sides[0], sides[1], dis.min_prompt_tokens)
        build = cls(routing_key(pool, metrics_max_age), bctx, router, disagg)
        if bctx.tokenizer is not None:
            # tokenizers: only when needed
            from lbproxy.tokenization.token_cache import PromptTokenizer

            build.tokenize = PromptTokenizer(bctx.tokenizer)
        # Token ids are computed before routing (`proxy.prompt_ids`) only for a pool whose
        # scorers read them (precise-prefix, in any of its routers).
        if PRECISE_INDEX_KEY in bctx.shared:
            build.routing_tokenizer = build.tokenize
        return build

    def claim(self) -> bool:
        """True the first time only (a build copied with its Pool is still one build)."""
        claimed, self._claimed = self._claimed, True
        return not claimed


def build_pool(pool: Pool, metrics_max_age: float) -> PoolBuild:
    """Build a pool's routing from scratch (what validation does, without its checks)."""
    bctx = build_context(pool, load_pool_tokenizer(pool), metrics_max_age)
    router = build_router(pool.routing, bctx)
    dis = pool.disaggregation
    sides = None
    if dis is not None:
        sides = (build_router(dis.prefill_routing, bctx), build_router(dis.decode_routing, bctx))
    return PoolBuild.assemble(pool, metrics_max_age, bctx, router, sides)
