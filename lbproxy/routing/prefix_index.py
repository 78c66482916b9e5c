"""Approximate prefix index: which endpoints probably hold the leading blocks of a prompt.

Keys. A prompt's bytes are cut into blocks from the start (only full blocks, within a span
of `max_blocks` x `block_bytes`); hash i = xxh64(block_i, seed=hash_{i-1}) and hash_{-1}
is the seed (for prefix-hash: xxh64 of the model name). A hash therefore names the whole
prefix up to its block, so "endpoint E holds hash i" means "E has computed this prompt up
to block i". Blocks are `block_bytes` each, or, with `growth` g > 0, grow with their
offset (see `block_ends`): the first 2g blocks are `block_bytes`, then each is 1/g of the
prefix before it, so a 16 KB span is 41 blocks (g = 8) instead of 256 and a match is
still within 1/g of its length. `ChainHasher` computes these chains and reuses the hashes
of the longest byte-identical prefix of a recent prompt, so a shared system prompt is
hashed once.

State. Each endpoint has one LRU of the hashes it holds, bounded by its capacity (in units
of `block_bytes`: a hash weighs its block's size in units, 1 for fixed blocks). `roots`
maps each first-block hash to the bitmask of the endpoints holding it; evicting a first
block clears the endpoint's bit. Only first blocks are in `roots`: a request's other
blocks touch nothing but the endpoint's own LRU (inserting and evicting a block is two
dict operations, not four on a shared table too), and whoever holds the first block is
searched in its own LRU. Memory is bounded: at most `max_endpoints` endpoints (the least
recently routed is forgotten beyond that), each with at most its capacity of hashes.

Footprints. `insert(..., tail=u)` also charges `u` units for the rest of the request's KV
(what lies past the hashed blocks): one entry under a key of its own (negative, never a
hash), older than the chain, so it is evicted before the chain's blocks. It is never
matched; it only takes room, as the request's other blocks take room in vLLM's cache.

Invariant: each endpoint's holdings are prefix-closed (if hash i is held, so is hash i-1).
`insert` refreshes a request's hashes from the last block to the first, so a parent is
always more recent than its child and the LRU evicts a chain from its tail, as vLLM frees
a finished request's blocks tail first. Hence "consecutive blocks matched from the start"
is the number of the request's hashes an endpoint holds, and `match` finds it by binary
search: O(log n) lookups per endpoint that holds the first block, none for the others.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import reduce
from itertools import accumulate, compress, islice, pairwise, repeat
from itertools import count as counter
from operator import ge, or_
from struct import Struct

from xxhash import xxh64_intdigest

_drain = deque(maxlen=0).extend  # run an iterator for its side effects, in C

# Rough bytes per index entry (LRU node + table slot + the int keys and masks), for stats.
_ENTRY_BYTES = 200


def block_ends(block_bytes: int, max_blocks: int, growth: int = 0) -> list[int]:
    """End offsets (bytes) of the blocks of a span of `max_blocks` x `block_bytes` bytes.

    growth 0: fixed blocks. growth g > 0: a block starting u units (of `block_bytes`) in
    is max(1, u // g) units long, the last one cut at the span's end. Matching cannot see
    past a block's start, so a shared prefix is found to within one block: 1/g of its
    length (a prompt diverging anywhere in [u, u + u/g) matches u units), and the number
    of blocks grows with the log of the span, not with the span.
    """
    ends: list[int] = []
    u = 0
    while u < max_blocks:
        u = min(max_blocks, u + (max(1, u // growth) if growth > 0 else 1))
        ends.append(u * block_bytes)
    return ends


class ChainHasher:
    """Chained xxh64 over the blocks of a byte string, reusing recent work.

    `hashes(data, seed)` returns [h_0, ..., h_{n-1}] with h_i = xxh64(block_i, h_{i-1}) and
    h_{-1} = seed, for the n blocks that `data` fills: fixed blocks of `block_bytes` (at
    most `max_blocks`), or the growing blocks of `block_ends` when `growth` > 0. The last
    `recent` prompts are remembered by their first block: a prompt starting like one of
    them reuses the hashes of the byte-identical prefix (found by binary search on bytes
    comparisons, which run at memcmp speed) and hashes only the rest. The returned list is
    shared with the cache: callers must not mutate it.
    """

    __slots__ = ("_cuts", "_recent", "_split", "block_bytes", "ends", "max_blocks", "recent")

    def __init__(
        self, block_bytes: int, max_blocks: int | None = None, recent: int = 64, growth: int = 0
    ) -> None:
        if block_bytes < 1:
            raise ValueError("block_bytes must be >= 1")
        if growth and max_blocks is None:
            raise ValueError("growing blocks need max_blocks")
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.recent = recent
        # Block end offsets when blocks grow (None: fixed blocks, cut in C by a Struct).
        self.ends = block_ends(block_bytes, max_blocks, growth) if growth else None
        self._cuts = [slice(a, b) for a, b in pairwise([0, *(self.ends or ())])]
        self._recent: dict[bytes, tuple[int, bytes, list[int]]] = {}
        self._split = Struct(f"{block_bytes}s").iter_unpack

    def _end(self, i: int) -> int:
        """Byte offset where block i - 1 ends (0 for i = 0)."""
        ends = self.ends
        return i * self.block_bytes if ends is None else (ends[i - 1] if i else 0)

    def hashes(self, data: bytes, seed: int) -> list[int]:
        bb = self.block_bytes
        ends = self.ends
        if ends is None:
            n = len(data) // bb
            if self.max_blocks is not None and n > self.max_blocks:
                n = self.max_blocks
        else:
            n = bisect_right(ends, len(data))
        if n == 0:
            return []
        head = data[:bb]
        recent = self._recent
        prev = recent.pop(head, None)
        out: list[int]
        if prev is not None and prev[0] == seed:
            pdata, phashes = memoryview(prev[1]), prev[2]
            # data.startswith(memoryview slice): a memcmp, with no copy of either prefix.
            hi = min(n, len(phashes))
            if hi == n and len(phashes) == n and data.startswith(pdata[: self._end(n)]):
                out = phashes  # the same prompt prefix again: nothing to hash
                recent[head] = prev
                return out
            # Largest c in [1, hi] with equal first c blocks; block 0 is equal (same head).
            lo = 1
            if data.startswith(pdata[: self._end(hi)]):
                lo = hi
            else:
                top = hi - 1  # block hi-1 differs somewhere in its bytes
                while lo < top:
                    mid = (lo + top + 1) >> 1
                    if data.startswith(pdata[: self._end(mid)]):
                        lo = mid
                    else:
                        top = mid - 1
            out = phashes[:lo]
        else:
            out = []
        k = len(out)
        if k < n:
            if ends is None:
                _extend(out, self._split(memoryview(data)[k * bb : n * bb]), seed)
            else:
                _extend_cuts(out, data, self._cuts[k:n], seed)
        if prev is None and len(recent) >= self.recent:
            del recent[next(iter(recent))]  # oldest first: dicts keep insertion order
        recent[head] = (seed, data, out)
        return out


def _extend(out: list[int], blocks: Iterator[tuple[bytes]], seed: int) -> None:
    """Append the chain over `blocks` to `out`, continuing from its last hash (or `seed`)."""
    h = out[-1] if out else seed
    append = out.append
    # struct.iter_unpack cuts the blocks in C: faster than slicing a memoryview per block.
    for (block,) in blocks:
        h = xxh64_intdigest(block, h)
        append(h)


def _extend_cuts(out: list[int], data: bytes, cuts: list[slice], seed: int) -> None:
    """Append the chain over the blocks data[cut] for each cut, continuing from out[-1]."""
    h = out[-1] if out else seed
    append = out.append
    for cut in cuts:  # slicing bytes with a ready slice: cheaper than a memoryview per block
        h = xxh64_intdigest(data[cut], h)
        append(h)


def chain_hashes(data: bytes, block_bytes: int, seed: int) -> list[int]:
    """The plain chain (no reuse, no limit): h_i = xxh64(block_i, seed=h_{i-1})."""
    out: list[int] = []
    end = len(data) // block_bytes * block_bytes
    if end:
        _extend(out, Struct(f"{block_bytes}s").iter_unpack(memoryview(data)[:end]), seed)
    return out


class EndpointBits:
    """Assigns each endpoint name one bit, so a set of endpoints is a Python int.

    Intersections are then single `&` operations, whatever the number of endpoints.
    """

    __slots__ = ("_bit", "_free", "_name")

    def __init__(self) -> None:
        self._bit: dict[str, int] = {}
        self._name: dict[int, str] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._bit)

    def get(self, name: str) -> int:
        """The endpoint's bit, or 0 if it has none."""
        return self._bit.get(name, 0)

    def bit(self, name: str) -> int:
        b = self._bit.get(name)
        if b is None:
            b = 1 << (self._free.pop() if self._free else len(self._bit))
            self._bit[name] = b
            self._name[b] = name
        return b

    def release(self, name: str) -> int:
        b = self._bit.pop(name, 0)
        if b:
            del self._name[b]
            self._free.append(b.bit_length() - 1)
        return b

    def mask(self, names: Iterable[str]) -> int:
        return reduce(or_, map(self._bit.get, names, repeat(0)), 0)

    def names(self, mask: int) -> list[str]:
        out = []
        name = self._name
        while mask:
            low = mask & -mask
            out.append(name[low])
            mask ^= low
        return out

    def name_of(self, bit: int) -> str:
        return self._name[bit]


def prefix_lengths(
    bits: EndpointBits,
    first: int,
    last: int,
    keys: Sequence[int],
    mask_of: Callable[[int, int], int],
) -> dict[str, int]:
    """How many consecutive blocks from the start each endpoint in `first` holds.

    `first` and `last` are the masks of the endpoints holding the first and the last of
    `keys`; `mask_of(keys[i], 0)` is the mask of those holding block i. What an endpoint
    holds must be prefix-closed (block i held implies every block before it is), so each
    length is a binary search: O(log n) `mask_of` calls per endpoint, none for those
    holding every block.
    """
    n = len(keys)
    out: dict[str, int] = {}
    name_of = bits.name_of
    m = first
    while m:
        bit = m & -m
        m ^= bit
        if last & bit:
            out[name_of(bit)] = n
            continue
        lo, hi = 1, n - 1  # block lo-1 held, block hi not
        while lo < hi:
            mid = (lo + hi) >> 1
            if mask_of(keys[mid], 0) & bit:
                lo = mid + 1
            else:
                hi = mid
        out[name_of(bit)] = lo
    return out


def _held(lru: OrderedDict[int, int], hashes: Sequence[int]) -> int:
    """How many of `hashes` an endpoint holds, given that it holds the first: prefix-closed,
    so a binary search of O(log n) lookups (one when it holds them all)."""
    n = len(hashes)
    if hashes[-1] in lru:
        return n
    lo, hi = 1, n - 1  # block lo-1 held, block hi not
    while lo < hi:
        mid = (lo + hi) >> 1
        if hashes[mid] in lru:
            lo = mid + 1
        else:
            hi = mid
    return lo


class PrefixIndex:
    """hash -> endpoints holding it, with one bounded LRU of hashes per endpoint.

    Each LRU maps a hash to its weight (its block's size in units); `_used` is the sum of
    an endpoint's weights, which its capacity bounds.
    """

    __slots__ = ("_bits", "_lrus", "_roots", "_tails", "_used", "max_endpoints")

    def __init__(self, max_endpoints: int = 1024) -> None:
        self.max_endpoints = max_endpoints
        # First-block hash -> bitmask of the endpoints holding it: who to search.
        self._roots: dict[int, int] = {}
        self._bits = EndpointBits()
        # Endpoint LRUs, themselves in least-recently-routed order (for max_endpoints).
        self._lrus: OrderedDict[str, OrderedDict[int, int]] = OrderedDict()
        self._used: dict[str, int] = {}
        self._tails = counter(-1, -1)  # keys of footprint entries: never a hash (>= 0)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Consecutive blocks from the start each endpoint holds; endpoints with 0 omitted."""
        if not hashes:
            return {}
        m = self._roots.get(hashes[0], 0)
        out: dict[str, int] = {}
        name_of = self._bits.name_of
        lrus = self._lrus
        while m:
            bit = m & -m
            m ^= bit
            name = name_of(bit)
            out[name] = _held(lrus[name], hashes)
        return out

    def matched(self, name: str, hashes: Sequence[int]) -> int:
        """Consecutive blocks from the start that `name` holds."""
        lru = self._lrus.get(name)
        if lru is None or not hashes or hashes[0] not in lru:
            return 0
        return _held(lru, hashes)

    def insert(
        self,
        name: str,
        hashes: Sequence[int],
        capacity: int,
        weights: Sequence[int] | None = None,
        tail: int = 0,
    ) -> None:
        """Record that `name` now holds `hashes` (a chain from the start), LRU-bounded.

        `weights[i]` is hash i's size in units (at least len(hashes) of them; default 1
        each); `capacity` bounds the sum of the weights an endpoint holds.
        """
        lrus = self._lrus
        lru = lrus.get(name)
        if lru is None:
            if len(lrus) >= self.max_endpoints:
                self.forget(next(iter(lrus)))
            lru = lrus[name] = OrderedDict()
            self._used[name] = 0
        else:
            lrus.move_to_end(name)
        if not hashes:
            return
        if tail > 0:
            # The rest of the request's KV (prompt past the hashed span, its output): an
            # entry of its own, older than the chain, so the LRU fills as the engine's
            # cache does and evicts it first (vLLM frees a request's blocks tail first).
            lru[next(self._tails)] = tail
            self._used[name] += tail
        bit = self._bits.bit(name)
        roots = self._roots
        n = len(hashes)
        k = self.matched(name, hashes)
        if k < n:
            # Prefix-closed: blocks k.. are all new here. Insert tail first (C loops).
            new = hashes[k:]
            if weights is None:
                lru.update(zip(reversed(new), repeat(1)))
                self._used[name] += n - k
            else:
                w = weights[k:n]
                lru.update(zip(reversed(new), reversed(w), strict=True))
                self._used[name] += sum(w)
            if not k:  # a new first block for this endpoint
                h0 = hashes[0]
                roots[h0] = roots.get(h0, 0) | bit
        if k:
            _drain(map(lru.move_to_end, reversed(hashes[:k])))
        excess = self._used[name] - max(capacity, 1)
        if excess > 0:
            # The fewest least recently used hashes that weigh `excess` or more (C loops).
            enough = map(ge, accumulate(lru.values()), repeat(excess))
            count = next(compress(counter(1), enough))
            self._used[name] -= self._evict(lru, bit, count)

    def _evict(self, lru: OrderedDict[int, int], bit: int, count: int) -> int:
        """Drop the `count` least recently used hashes of one endpoint (C-level loops);
        returns their weight."""
        roots = self._roots
        old = list(islice(lru, count))
        weight = sum(map(lru.pop, old))
        for h in compress(old, map(roots.__contains__, old)):  # first blocks: a few
            m = roots[h] & ~bit
            if m:
                roots[h] = m
            else:
                del roots[h]
        return weight

    def forget(self, name: str) -> None:
        """Drop everything known about an endpoint (removed, restarted, cache reset)."""
        lru = self._lrus.pop(name, None)
        self._used.pop(name, None)
        bit = self._bits.release(name)
        if lru is not None and bit:
            self._evict(lru, bit, len(lru))

    def holders(self, h: int) -> list[str]:
        """Endpoints holding hash `h` (a scan of every LRU: for tests and diagnostics)."""
        return [name for name, lru in self._lrus.items() if h in lru]

    def size(self, name: str) -> int:
        """The weight `name` holds (its hash count when every weight is 1)."""
        return self._used.get(name, 0)

    def stats(self) -> dict[str, int]:
        entries = sum(len(lru) for lru in self._lrus.values())
        return {
            "endpoints": len(self._lrus),
            "entries": entries,
            "units": sum(self._used.values()),
            "hashes": len(self._roots),  # distinct first blocks: the index's keys
            "approx_bytes": entries * _ENTRY_BYTES,
        }
