"""The three plugin kinds of the routing pipeline, and what a plugin factory receives.

Contracts (the pipeline enforces them, plugins may rely on them):
- A Filter returns a subset of the endpoints it is given, in the same order. It may
  return an empty list; the pipeline then keeps the unfiltered set.
- A Scorer returns one score per endpoint, in order. Scores are clamped to [0, 1] by the
  pipeline, then multiplied by the scorer's weight and summed. A scorer may return the
  very same list again while its scores hold (the load scorers do, between scrapes): the
  pipeline then reuses that list's clamped, weighted sum. So a returned list is never
  changed afterwards, by the scorer or by anyone else.
- A Picker orders the candidates best first; the first one is chosen and the rest are
  the retry order. Ties must be broken with the `rng` it is given (seeded in tests).

Optional hooks, each a protocol below; the pipeline (`Router`) sorts its plugins by them
once, when it is built, and callers ask the router's lists, never a plugin's name:
- `RoutedObserver.on_routed`: told which endpoint a request went to, so that stateful
  plugins (round-robin, prefix indexes) can learn. A retry on another endpoint is told
  the same way (the request went there after all); there is no separate retry hook.
- `Forgetful.forget`: a backend left the pool; drop what was learnt about it.
- `PrefixMatcher.cached_tokens`: how much of the prompt a backend caches (P/D routing).
- `IndexStatsProvider`: size of a prefix index and hit/query block counters, for
  `/metrics` and the dashboard, labelled by the plugin's `name`.

State between `score()` and `on_routed()` of one request (a prompt's hash chain, the
match) lives on the request, in `ctx.scratch[plugin]`, never on the plugin: flow control
and P/D rank several requests before committing any of them.

No plugin reads a clock or performs I/O: `now` is passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, runtime_checkable

from lbproxy.routing.state import Endpoint, RequestContext


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(
        self, ctx: RequestContext, endpoints: list[Endpoint], now: float
    ) -> list[Endpoint]: ...


@runtime_checkable
class LoadGate(Protocol):
    """A filter that drops endpoints only for being busy now (`load_gate = True`). Flow
    control applies such thresholds itself and waits for room, so it ranks without them:
    hiding a request's cached backend while it is momentarily full would send the request
    cold elsewhere instead of letting it wait for that backend."""

    load_gate: bool


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]: ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        totals: list[float],
        rng: random.Random,
    ) -> list[Endpoint]: ...


@runtime_checkable
class RoutedObserver(Protocol):
    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None: ...


@runtime_checkable
class Forgetful(Protocol):
    """A plugin that learns per backend: told when a backend leaves its pool."""

    def forget(self, endpoint_name: str) -> None: ...


@runtime_checkable
class PrefixMatcher(Protocol):
    """A scorer that knows how much of a prompt each backend caches (P/D routing asks it
    for the uncached part of a prompt on the chosen prefill backend)."""

    def cached_tokens(self, ctx: RequestContext, endpoint: Endpoint) -> int:
        """Prompt tokens `endpoint` holds by the match `score` last computed for `ctx`
        (0 if `score` has not seen `ctx`)."""
        ...


class IndexStats(TypedDict):
    entries: int  # (backend, block) entries held
    keys: int  # distinct keys (prompt heads, block hashes)
    approx_bytes: int  # estimated memory


@runtime_checkable
class IndexStatsProvider(Protocol):
    """A plugin with a prefix index, for observability (never read by routing).

    `hit_blocks` / `query_blocks`: per backend name, prompt blocks of the requests routed
    to it that the index believed it held / that were looked up (monotonic counters)."""

    name: str
    hit_blocks: dict[str, int]
    query_blocks: dict[str, int]

    def index_stats(self) -> IndexStats: ...


@dataclass(slots=True)
class BuildContext:
    """What a plugin factory may use besides its own parameters.

    `shared` holds objects several plugins or the signals layer must see the same
    instance of (for example the precise prefix index fed by KV events), keyed by name.
    """

    pool: str
    model: str = ""
    metrics_max_age: float = 2.0
    tokenizer: Any = None
    shared: dict[str, Any] = field(default_factory=dict)
    # Flow control bounds every backend's requests in flight, so a plugin need not guard
    # against piling onto one (the prefix scorers' hot-spot discount is then off: it would
    # read the limits' differences between fast and slow cards as hot spots).
    flow_control: bool = False
