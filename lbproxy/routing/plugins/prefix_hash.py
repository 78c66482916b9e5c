"""prefix-hash scorer (approximate): matched blocks / total blocks of the prompt's bytes.

The prompt's canonical bytes (`ctx.prompt_bytes()`) are hashed over a span of at most
`max_blocks` units of `block_size` x 4 bytes (~4 bytes per token; 256 x 64 B = 16 KB, ~4K
tokens by default) from the start; bytes past the span are not looked at. The span is cut
into blocks that grow with their offset (`block_growth` g, see `prefix_index.block_ends`):
the first 2g blocks are one unit, then each is 1/g of the prefix before it (16 KB: 41
blocks at g = 8, against 256 one-unit blocks with g = 0). hash i = xxh64(block_i,
seed=hash_{i-1}), seeded with xxh64 of the pool's model name. score(E) = units in the
consecutive blocks from the start that E is believed to hold / units in the request's
blocks (only full blocks count, so up to 1/g of a long prompt's tail is not hashed). A
prompt shorter than one unit, or matched nowhere, gets the spread of unmatched requests
below (0 for all when loads are equal).

Why growing blocks: a never-seen long prompt costs one hash and one index entry per block
(inserted, and later evicted); with one-unit blocks that was 256 of each, ~0.25 ms per
decision. A match is now found to within 1/g of its length instead of to within a unit
(identical below 2g units = 1 KB), which moves scores by at most ~1/g and ties holders
of the same prefix exactly as before. `block_growth: 0` restores one-unit blocks.

Learning: `on_routed` records that the chosen endpoint now holds all the request's blocks.
Each endpoint's LRU holds `ep.num_gpu_blocks` units when known (converted from the
endpoint's block size to ours), else `lru_capacity`; never more than `max_lru_capacity`.
A block weighs its size in units, and eviction drops least recently used blocks until
the endpoint holds at most its capacity. With `footprint` (the default), the rest of the
request's KV is charged too, as one entry older than its blocks: the prompt past the
hashed span and the `max_tokens` it asks for. vLLM's cache holds every request's blocks,
running ones pinned, finished ones until evicted; counting only the hashed span (16 KB of
an 8,200-token request) made the index believe a busy backend held several times the
prefixes its cache kept, so it kept sending requests to holders that had evicted them.
At most `max_endpoints` endpoints are tracked. Memory is therefore bounded by
max_endpoints x max_lru_capacity entries (~200 B each).

Block size: one per index, the `block_size` parameter (default 16, vLLM's GPU default),
not each endpoint's: endpoints' geometry arrives late (from a scrape) and may differ
within a pool, and changing the block size would invalidate every hash learnt so far.
Bytes-per-token is an estimate anyway, so block boundaries cannot line up with vLLM's.

Anti-hotspot (`HotspotRule`, in `_hotspot`): an endpoint whose in-flight count exceeds the least
busy candidate's by more than `hotspot_margin` and is over `hotspot_factor` times it has
its score multiplied by `hotspot_discount` (default 0), so a burst on one hot prefix
spills to idle backends before the next metrics scrape shows the queue.

Placing new prefix groups (`HotspotRule.tie_break`): when no candidate matches more than
`spread_unmatched` of the prompt (nothing, or only a short common head), each candidate
gets `spread_unmatched` x (least-in-flight + 2 x free room) / 3 added to its score. Free
room is the endpoint's capacity minus the units its LRU holds (the cache working set the
index believes it has), relative to the roomiest candidate. At low concurrency in-flight
counts tie and vLLM's KV usage ignores cached idle blocks, so without it new groups land
by coin-flip and one backend can be filled past its cache while another stays empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, is_

from pydantic import BaseModel, ConfigDict, Field
from xxhash import xxh64_intdigest

from lbproxy.routing.interfaces import BuildContext, IndexStats
from lbproxy.routing.plugins._hotspot import HotspotRule
from lbproxy.routing.prefix_index import ChainHasher, PrefixIndex, block_ends
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "prefix-hash"
KIND = "scorer"

BYTES_PER_TOKEN = 4
# How long an endpoint's free room (capacity minus working set) is kept before its
# capacity is read again (routing's clock): on_routed keeps the working set current, and
# geometry changes only when a server restarts; computing capacities for every candidate
# of every unmatched request would double the prefix scorer's cost at 256 backends.
CAPACITY_TTL = 10.0
_name = attrgetter("name")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1)  # tokens; a block is block_size * 4 prompt bytes
    max_blocks: int = Field(256, ge=1)  # hashed span, in units of block_size tokens
    block_growth: int = Field(8, ge=0)  # blocks grow to 1/g of their offset; 0: fixed
    lru_capacity: int = Field(31_250, ge=1)  # blocks per endpoint when num_gpu_blocks unknown
    max_lru_capacity: int = Field(262_144, ge=1)
    footprint: bool = True  # charge each request's whole KV (prompt + max_tokens) to the LRU
    max_endpoints: int = Field(1024, ge=1)
    hotspot_margin: float = Field(32.0, ge=0)
    hotspot_factor: float = Field(2.0, ge=1)
    hotspot_discount: float = Field(0.0, ge=0, le=1)
    spread_unmatched: float = Field(0.1, ge=0, le=1)


class _Scratch:
    """What score() computed for one request, kept on it (`ctx.scratch[scorer]`) for the
    on_routed() / cached_tokens() that follow: its hash chain and the index's match."""

    __slots__ = ("counts", "hashes")

    def __init__(self, hashes: list[int]) -> None:
        self.hashes = hashes
        self.counts: dict[str, int] | None = None


class PrefixHashScorer:
    name = TYPE

    def __init__(self, params: Params, model: str = "", flow_control: bool = False) -> None:
        self.block_size = params.block_size
        self.lru_capacity = params.lru_capacity
        self.max_lru_capacity = params.max_lru_capacity
        self.footprint = params.footprint
        self.model = model
        self.index = PrefixIndex(params.max_endpoints)
        bb = params.block_size * BYTES_PER_TOKEN
        self.hasher = ChainHasher(bb, params.max_blocks, growth=params.block_growth)
        # Units (blocks of block_size tokens) up to the end of each block, and each block's.
        ends = block_ends(bb, params.max_blocks, params.block_growth)
        self._units = [e // bb for e in ends]
        self._weights = [b - a for a, b in zip([0, *self._units], self._units, strict=False)]
        self.hotspot = HotspotRule(
            params.hotspot_margin,
            params.hotspot_factor,
            1.0 if flow_control else params.hotspot_discount,
            params.spread_unmatched,
        )
        self._seed_of: tuple[str, int] = ("", xxh64_intdigest(b""))
        # Endpoint name -> capacity minus the units its LRU holds, for free_room(); kept
        # current by on_routed, read afresh every CAPACITY_TTL.
        self._free: dict[str, int] = {}
        self._free_at = float("-inf")
        # Observability: per endpoint name, blocks of the requests routed to it and how many
        # of them the index believed it held (read by lbproxy's /metrics, never by routing).
        self.hit_blocks: dict[str, int] = {}
        self.query_blocks: dict[str, int] = {}

    def _scratch(self, ctx: RequestContext) -> _Scratch:
        memo = ctx.scratch.get(self)
        if memo is None:
            model = self.model or ctx.model
            if model != self._seed_of[0]:
                self._seed_of = (model, xxh64_intdigest(model.encode()))
            memo = ctx.scratch[self] = _Scratch(
                self.hasher.hashes(ctx.prompt_bytes(), self._seed_of[1])
            )
        return memo

    def hashes(self, ctx: RequestContext) -> list[int]:
        """The request's hash chain (computed once per request, kept on it)."""
        return self._scratch(ctx).hashes

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        memo = self._scratch(ctx)
        hashes = memo.hashes
        counts = memo.counts = self.index.match(hashes) if hashes else None
        scores = [0.0] * len(endpoints)
        if counts:
            units = self._units
            inv = 1.0 / units[len(hashes) - 1]
            if len(counts) <= 8:  # usually a few holders: find them with C-level scans
                names = list(map(_name, endpoints))
                for name, c in counts.items():
                    if name in names:
                        scores[names.index(name)] = units[c - 1] * inv
            else:
                held = map(counts.get, map(_name, endpoints), repeat(0))
                scores = [units[c - 1] * inv if c else 0.0 for c in held]
        return self.hotspot.adjust(scores, endpoints, partial(self.free_room, endpoints, now))

    def free_room(self, endpoints: Sequence[Endpoint], now: float) -> list[float]:
        """Each endpoint's capacity minus the units its LRU holds (both in our units)."""
        free = self._free
        if not 0.0 <= now - self._free_at <= CAPACITY_TTL:
            free.clear()
            self._free_at = now
        names = list(map(_name, endpoints))
        out = list(map(free.get, names))
        if None in out:
            size = self.index.size
            for i in compress(range(len(out)), map(is_, out, repeat(None))):
                name = names[i]
                out[i] = free[name] = self.capacity(endpoints[i]) - size(name)
        return out  # type: ignore[return-value]

    def cached_tokens(self, ctx: RequestContext, endpoint: Endpoint) -> int:
        memo = ctx.scratch.get(self)
        counts = memo.counts if memo is not None else None
        if not counts:
            return 0
        c = counts.get(endpoint.name, 0)
        return self._units[c - 1] * self.block_size if c else 0

    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        memo = self._scratch(ctx)
        hashes = memo.hashes
        if hashes:
            name = endpoint.name
            units = self._units
            self.query_blocks[name] = self.query_blocks.get(name, 0) + units[len(hashes) - 1]
            if memo.counts:
                c = memo.counts.get(name, 0)
                self.hit_blocks[name] = self.hit_blocks.get(name, 0) + (units[c - 1] if c else 0)
            cap = self.capacity(endpoint)
            self.index.insert(name, hashes, cap, self._weights, self.tail(ctx, len(hashes)))
            self._free[name] = cap - self.index.size(name)

    def tail(self, ctx: RequestContext, n: int) -> int:
        """Units of a request's KV past its `n` hashed blocks (the rest of its prompt, and
        the output it asks for), charged to the LRU with them; 0 without `footprint`."""
        if not self.footprint:
            return 0
        tokens = (ctx.prompt_token_estimate or len(ctx.prompt_bytes()) // BYTES_PER_TOKEN) + (
            ctx.max_tokens or 0
        )
        return max(0, tokens // self.block_size - self._units[n - 1])

    def capacity(self, ep: Endpoint) -> int:
        """The endpoint's KV capacity in our blocks, bounded by max_lru_capacity."""
        blocks, size = ep.num_gpu_blocks, ep.block_size
        m = ep.metrics
        if blocks is None and m is not None:
            blocks, size = m.num_gpu_blocks, size or m.block_size
        bs = self.block_size
        cap = blocks * (size or bs) // bs if blocks else self.lru_capacity
        return max(1, min(cap, self.max_lru_capacity))

    def learn(
        self,
        ep: Endpoint,
        hashes: list[int],
        weights: Sequence[int] | None = None,
        tail: int = 0,
    ) -> None:
        """Record that `ep` holds this block chain (and `tail` units of that request's KV
        past it), learnt elsewhere (another replica's decision); its free room is
        recomputed when next needed."""
        self.index.insert(ep.name, hashes, self.capacity(ep), weights, tail)
        self._free.pop(ep.name, None)

    def forget(self, endpoint_name: str) -> None:
        self.index.forget(endpoint_name)
        self._free.pop(endpoint_name, None)

    def index_stats(self) -> IndexStats:
        s = self.index.stats()
        return {"entries": s["entries"], "keys": s["hashes"], "approx_bytes": s["approx_bytes"]}


def build(params: Params, bctx: BuildContext) -> PrefixHashScorer:
    return PrefixHashScorer(params, bctx.model, bctx.flow_control)
