"""Runtime pools: the endpoints and router of each configured pool, and model lookup."""

from __future__ import annotations

from collections.abc import Iterator

from lbproxy.config import Config, Pool, load_pool_tokenizer
from lbproxy.prompt_tokens import PromptTokenizer
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.profiles import build_router
from lbproxy.routing.state import Endpoint


class PoolRuntime:
    __slots__ = (
        "bctx",
        "configured_models",
        "discovered_models",
        "endpoints",
        "name",
        "router",
        "tokenize",
    )

    def __init__(
        self, spec: Pool, *, metrics_max_age: float = 2.0, seed: int | None = None
    ) -> None:
        self.name = spec.name
        self.configured_models: list[str] | None = spec.models
        self.discovered_models: dict[str, set[str]] = {}  # backend name -> its models
        self.endpoints = [
            Endpoint(
                name=b.name or b.url,
                url=b.url,
                vendor=b.vendor,
                labels=dict(b.labels),
                weight=b.weight,
                pool=spec.name,
            )
            for b in spec.backends
        ]
        self.bctx = BuildContext(
            pool=spec.name, model=(spec.models or [""])[0], metrics_max_age=metrics_max_age
        )
        tokenizer = load_pool_tokenizer(spec)
        self.bctx.tokenizer = tokenizer
        # Token ids are computed only if a precise scorer asks, and cached across requests.
        self.tokenize = PromptTokenizer(tokenizer) if tokenizer is not None else None
        self.router: Router = build_router(spec.routing, self.bctx, seed=seed)

    def models(self) -> set[str]:
        if self.configured_models is not None:
            return set(self.configured_models)
        out: set[str] = set()
        for ms in self.discovered_models.values():
            out |= ms
        return out


class PoolTable:
    """Maps a request's `model` to its pool; rebuilt when discovery learns new models."""

    def __init__(self, cfg: Config, *, seed: int | None = None) -> None:
        age = cfg.signals.metrics_max_age
        self.pools = [PoolRuntime(p, metrics_max_age=age, seed=seed) for p in cfg.pools]
        self._by_model: dict[str, PoolRuntime] = {}
        self.rebuild()

    def rebuild(self) -> None:
        by_model: dict[str, PoolRuntime] = {}
        for pool in self.pools:  # configured pools first win a model served twice
            for m in pool.models():
                by_model.setdefault(m, pool)
        self._by_model = by_model

    def for_model(self, model: str) -> PoolRuntime | None:
        return self._by_model.get(model)

    def served_models(self) -> list[str]:
        return sorted(self._by_model)

    def endpoints(self) -> Iterator[Endpoint]:
        for pool in self.pools:
            yield from pool.endpoints
