"""precise-prefix scorer: cached blocks / full blocks of the request's token ids.

Token ids come from `ctx.token_ids()` (the proxy's tokenizer, chat rendered with the
model's template), cut into each endpoint's block size (as announced by its KV events,
else `ep.block_size`, else the `block_size` parameter), keyed by our chained xxh64 over
token ids (`precise_index`). score(E) = consecutive blocks from the start that E's vLLM
prefix cache holds, per its KV events / number of full blocks (at most `max_blocks`).
No tokenizer, a prompt shorter than one block or no match anywhere: the spread of
unmatched requests below (0 for all when the loads are equal).

The `PreciseIndex` is shared with the KV-event subscriber through
`bctx.shared["precise_index"]` (created here if the signals layer has not yet).

Speculation: `on_routed` marks the request's blocks as held by the chosen endpoint for
`speculative_ttl` seconds (0 disables), so requests that follow before the BlockStored
event arrives already see the hit; an event confirms the entries, else they expire.

KV-cache report mode: `kv_cache_report_mode` says how the pool's vLLM servers report
(see `precise_index`): "incremental", vLLM's default, when every BlockStored is a newly
cached block; "full" when requests carry `vllm_xargs: {"kv_cache_report_mode": "full"}`
and vLLM also re-announces each request's prefix-cache hits.

Anti-hotspot and the placement of new prefix groups: the same `HotspotRule` as
prefix-hash, with the same parameters. Free room = (num_gpu_blocks - blocks the events say
the endpoint holds) x its block size, when every candidate's num_gpu_blocks is known
(else in-flight counts alone break the tie).

Cost: the candidates' names, block sizes and capacities are kept until the candidates,
an endpoint's scraped geometry (`state.load_epoch`) or the block sizes events announced
change, so a request does no per-endpoint work in Python but the hot-spot rule's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, eq, not_
from typing import cast

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.interfaces import BuildContext, IndexStats
from lbproxy.routing.plugins._hotspot import HotspotRule
from lbproxy.routing.precise_index import PreciseIndex, ReportMode
from lbproxy.routing.state import Endpoint, RequestContext, load_epoch

TYPE = "precise-prefix"
KIND = "scorer"

SHARED_KEY = "precise_index"
_name = attrgetter("name")
_block_size = attrgetter("block_size")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1)  # tokens, when neither events nor the endpoint tell
    max_blocks: int = Field(4096, ge=1)
    speculative_ttl: float = Field(2.0, ge=0)
    hotspot_margin: float = Field(32.0, ge=0)
    hotspot_factor: float = Field(2.0, ge=1)
    hotspot_discount: float = Field(0.0, ge=0, le=1)
    spread_unmatched: float = Field(0.1, ge=0, le=1)
    kv_cache_report_mode: ReportMode = "incremental"


class _Scratch:
    """What score() computed for one request, kept on it (`ctx.scratch[scorer]`): keys
    per block size, and the blocks each endpoint holds by the match."""

    __slots__ = ("counts", "keys")

    def __init__(self) -> None:
        self.keys: dict[int, list[int]] = {}
        self.counts: dict[str, int] = {}


class PrecisePrefixScorer:
    name = TYPE

    def __init__(self, params: Params, index: PreciseIndex, flow_control: bool = False) -> None:
        self.index = index
        self.default_block_size = params.block_size
        self.max_blocks = params.max_blocks
        self.speculative_ttl = params.speculative_ttl
        self.hotspot = HotspotRule(
            params.hotspot_margin,
            params.hotspot_factor,
            1.0 if flow_control else params.hotspot_discount,
            params.spread_unmatched,
        )
        # Observability, as in prefix-hash: blocks routed to each endpoint and the matched ones.
        self.hit_blocks: dict[str, int] = {}
        self.query_blocks: dict[str, int] = {}
        # The last candidates' geometry (see `_geometry`) and what it was computed from.
        self._geo_endpoints: list[Endpoint] = []
        self._geo_key: tuple[int, int] = (-1, -1)
        self._geo: _Geometry | None = None

    def block_size_of(self, ep: Endpoint) -> int:
        return self.index.block_size_of(ep.name) or self._geometry_block_size(ep)

    def _geometry_block_size(self, ep: Endpoint) -> int:
        bs = ep.block_size
        if bs is None and ep.metrics is not None:
            bs = ep.metrics.block_size
        return bs or self.default_block_size

    def _scratch(self, ctx: RequestContext) -> _Scratch:
        memo = ctx.scratch.get(self)
        if memo is None:
            memo = ctx.scratch[self] = _Scratch()
        return memo

    def keys(self, ctx: RequestContext, block_size: int) -> list[int]:
        memo = self._scratch(ctx).keys
        keys = memo.get(block_size)
        if keys is None:
            tokens = ctx.token_ids()
            keys = self.index.keys_for(tokens, block_size, self.max_blocks) if tokens else []
            memo[block_size] = keys
        return keys

    def _geometry(self, endpoints: list[Endpoint]) -> _Geometry:
        """The candidates' names, block sizes and capacities, recomputed only when the
        candidates, their scraped geometry or the announced block sizes changed."""
        key = (load_epoch(), self.index.block_sizes_version)
        geo = self._geo
        if geo is not None and key == self._geo_key and endpoints == self._geo_endpoints:
            return geo
        n = len(endpoints)
        names = list(map(_name, endpoints))
        known = self.index.block_sizes(names)  # from events
        if None in known:  # then the endpoint's geometry, its metrics, the parameter
            known = [k or g for k, g in zip(known, map(_block_size, endpoints), strict=True)]
            for i in compress(range(n), map(not_, known)):  # None, or a nonsense 0
                known[i] = self._geometry_block_size(endpoints[i])
        sizes = cast(list[int], known)
        capacity: list[int] | None = []
        for ep in endpoints:
            blocks = ep.num_gpu_blocks
            if blocks is None and ep.metrics is not None:
                blocks = ep.metrics.num_gpu_blocks
            if not blocks:
                capacity = None
                break
            capacity.append(blocks)
        geo = _Geometry(names, sizes, set(sizes), capacity)
        self._geo, self._geo_key, self._geo_endpoints = geo, key, list(endpoints)
        return geo

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        n = len(endpoints)
        scores = [0.0] * n
        room = partial(self.free_room, endpoints)
        if not ctx.token_ids():
            return self.hotspot.adjust(scores, endpoints, room)
        geo = self._geometry(endpoints)
        names, sizes, distinct = geo.names, geo.sizes, geo.distinct
        matched = self._scratch(ctx).counts
        matched.clear()  # a new ranking of this request: its last match no longer holds
        for bs in distinct:
            keys = self.keys(ctx, bs)
            if not keys:
                continue
            group = (
                names if len(distinct) == 1 else list(compress(names, map(eq, sizes, repeat(bs))))
            )
            counts = self.index.match_keys(keys, group, now)
            if not counts:
                continue
            matched.update(counts)
            inv = 1.0 / len(keys)
            if len(counts) <= 8:  # usually a few holders: find them with C-level scans
                for name, c in counts.items():
                    scores[names.index(name)] = c * inv
            else:
                pos = {name: i for i, name in enumerate(names)}
                for name, c in counts.items():
                    scores[pos[name]] = c * inv
        return self.hotspot.adjust(scores, endpoints, room)

    def cached_tokens(self, ctx: RequestContext, endpoint: Endpoint) -> int:
        memo = ctx.scratch.get(self)
        if memo is None:
            return 0
        return memo.counts.get(endpoint.name, 0) * self.block_size_of(endpoint)

    def forget(self, endpoint_name: str) -> None:
        self.index.forget(endpoint_name)

    def index_stats(self) -> IndexStats:
        s = self.index.stats()
        return {"entries": s["entries"], "keys": s["keys"], "approx_bytes": s["approx_bytes"]}

    def free_room(self, endpoints: Sequence[Endpoint]) -> list[float] | None:
        """Free KV tokens per endpoint, or None if any endpoint's num_gpu_blocks is unknown."""
        geo = self._geometry(list(endpoints))
        if geo.capacity is None:
            return None
        held = self.index.held_counts(geo.names)
        return [
            float((blocks - n) * bs)
            for blocks, n, bs in zip(geo.capacity, held, geo.sizes, strict=True)
        ]

    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        if not ctx.token_ids():
            return
        keys = self.keys(ctx, self.block_size_of(endpoint))
        if not keys:
            return
        name = endpoint.name
        self.query_blocks[name] = self.query_blocks.get(name, 0) + len(keys)
        counts = self._scratch(ctx).counts
        self.hit_blocks[name] = self.hit_blocks.get(name, 0) + counts.get(name, 0)
        if self.speculative_ttl > 0:
            self.index.speculate(name, keys, now, self.speculative_ttl)


@dataclass(slots=True, frozen=True)
class _Geometry:
    """Per candidate, in order: its name, its block size (events, else geometry, else the
    parameter) and its capacity in blocks (None: some candidate's is unknown)."""

    names: list[str]
    sizes: list[int]
    distinct: set[int]
    capacity: list[int] | None


def shared_index(bctx: BuildContext) -> PreciseIndex:
    """The pool's PreciseIndex in `bctx.shared`, created on first use."""
    index = bctx.shared.get(SHARED_KEY)
    if index is None:
        index = bctx.shared[SHARED_KEY] = PreciseIndex()
    elif not isinstance(index, PreciseIndex):
        raise TypeError(f"bctx.shared[{SHARED_KEY!r}] is a {type(index).__name__}")
    return index


def build(params: Params, bctx: BuildContext) -> PrecisePrefixScorer:
    index = shared_index(bctx)
    index.report_mode = params.kv_cache_report_mode
    return PrecisePrefixScorer(params, index, bctx.flow_control)
