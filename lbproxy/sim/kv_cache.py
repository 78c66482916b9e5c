"""Paged KV cache with prefix caching, modelled on vLLM v1's block pool and KV cache manager.

- ``num_gpu_blocks`` blocks of ``block_size`` tokens; block 0 is the reserved null block, so
  ``num_gpu_blocks - 1`` are usable and usage is measured against that (as vLLM does).
- A full block is keyed by a hash chain: ``hash_i = H(hash_{i-1}, tokens of block i)``.
  Blocks are hashed ("cached") when the scheduler commits tokens that fill them, which is
  when BlockStored is emitted, one event per request and call, covering consecutive blocks.
- Free blocks sit in one queue in eviction order. Freed blocks without a hash go to the front
  (reused first); freed hashed blocks go to the back, tail block of a request first, so they
  stay reusable as long as possible. Taking a hashed block from the queue evicts it
  (BlockRemoved).
- Identical blocks are not de-duplicated (vLLM keeps block tables append-only): a hash may be
  held by several blocks, each announced by its own BlockStored and removed by its own
  BlockRemoved. Replaying the events as a multiset (count per hash) gives exactly
  ``cached_hashes()``; a plain set can drop a hash that another block still holds.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

__all__ = [
    "AllBlocksCleared",
    "BlockHasher",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "KVCacheManager",
    "KVEvent",
    "RequestBlocks",
]

NULL_BLOCK = 0


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class BlockHasher:
    """Chained 64-bit block hashes (xxh3), seeded so that engines can be told apart."""

    __slots__ = ("_root", "block_size", "seed")

    def __init__(self, block_size: int, seed: int = 0) -> None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"hash_seed must be in [0, 2**64), got {seed}")
        self.block_size = block_size
        self.seed = seed
        # Parent of the first block, like vLLM's NONE_HASH.
        self._root = xxhash.xxh3_64_intdigest(b"lbproxy-sim-none-hash", seed=seed)

    def hash_block(self, parent: int | None, token_ids: Sequence[int]) -> int:
        data = (self._root if parent is None else parent).to_bytes(8, "little")
        return xxhash.xxh3_64_intdigest(data + array("q", token_ids).tobytes(), seed=self.seed)

    def extend(self, hashes: list[int], token_ids: Sequence[int], num_blocks: int) -> None:
        """Append hashes until ``hashes`` covers ``num_blocks`` full blocks of ``token_ids``."""
        bs = self.block_size
        i = len(hashes)
        if i >= num_blocks:
            return
        seed = self.seed
        digest = xxhash.xxh3_64_intdigest
        parent = hashes[-1] if i else self._root
        raw = array("q", token_ids[i * bs : num_blocks * bs]).tobytes()
        step = bs * 8
        for off in range(0, len(raw), step):
            parent = digest(parent.to_bytes(8, "little") + raw[off : off + step], seed=seed)
            hashes.append(parent)


@dataclass(slots=True)
class RequestBlocks:
    """A request's view of the cache: its token ids, their block hashes and its block table.

    ``token_ids`` is the request's own list (prompt + generated tokens), shared not copied.
    Hashes depend only on content, so they survive preemption; blocks do not.
    """

    token_ids: list[int]
    block_hashes: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already hashed and in the cache map


class BlockPool:
    """Blocks, their reference counts and hashes, the free queue and the hash -> blocks map."""

    __slots__ = ("_cached", "_events", "_free", "_hash", "_ref", "block_size", "num_gpu_blocks")

    def __init__(self, num_gpu_blocks: int, block_size: int) -> None:
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (one is reserved), got {num_gpu_blocks}")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self._ref = [0] * num_gpu_blocks
        self._hash: list[int | None] = [None] * num_gpu_blocks
        self._ref[NULL_BLOCK] = 1  # never freed, never in the queue
        # Eviction order, front first; O(1) pop-front, remove and push at either end.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_gpu_blocks))
        # hash -> block ids holding it, first inserted first (the one a prefix hit reuses).
        self._cached: dict[int, list[int]] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks not used by any request (empty or free-but-cached)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, as ``vllm:kv_cache_usage_perc``."""
        return 1.0 - len(self._free) / (self.num_gpu_blocks - 1)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        return list(self._free)

    def get_cached_block(self, block_hash: int) -> int | None:
        ids = self._cached.get(block_hash)
        return ids[0] if ids else None

    def cached_hashes(self) -> set[int]:
        return set(self._cached)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks hit by a request (leaving the free queue if idle)."""
        ref, free = self._ref, self._free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the front of the free queue, evicting their cached content."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, {len(self._free)} free")
        ref, hashes, free = self._ref, self._hash, self._free
        out: list[int] = []
        for _ in range(n):
            b = free.popitem(last=False)[0]
            h = hashes[b]
            if h is not None:
                self._evict(b, h)
            ref[b] = 1
            out.append(b)
        return out

    def _evict(self, block_id: int, block_hash: int) -> None:
        ids = self._cached[block_hash]
        ids.remove(block_id)
        if not ids:
            del self._cached[block_hash]
        self._hash[block_id] = None
        self._events.append(BlockRemoved([block_hash]))

    def free(self, ordered_blocks: Iterable[int]) -> None:
        """Drop one reference per block; ``ordered_blocks`` lists the first to evict first."""
        ref, hashes, free = self._ref, self._hash, self._free
        fresh: list[int] = []
        for b in ordered_blocks:
            ref[b] -= 1
            if ref[b] == 0:
                if hashes[b] is None:
                    fresh.append(b)
                else:
                    free[b] = None  # back of the queue: evicted last
        for b in reversed(fresh):  # front of the queue, keeping their order
            free[b] = None
            free.move_to_end(b, last=False)

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        parent_block_hash: int | None,
        token_ids: list[int],
    ) -> None:
        """Record newly full blocks under their hashes and announce them in one BlockStored."""
        hashes, cached = self._hash, self._cached
        for b, h in zip(block_ids, block_hashes, strict=True):
            hashes[b] = h
            ids = cached.get(h)
            if ids is None:
                cached[h] = [b]
            else:
                ids.append(b)
        self._events.append(
            BlockStored(list(block_hashes), parent_block_hash, token_ids, self.block_size)
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; only possible when no request holds a block (as vLLM)."""
        if len(self._free) != self.num_gpu_blocks - 1:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_gpu_blocks
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events


class KVCacheManager:
    """Per-request allocation on top of a BlockPool (vLLM's KVCacheManager, one group)."""

    __slots__ = ("block_size", "hasher", "pool")

    def __init__(self, num_gpu_blocks: int, block_size: int, hash_seed: int = 0) -> None:
        self.pool = BlockPool(num_gpu_blocks, block_size)
        self.hasher = BlockHasher(block_size, hash_seed)
        self.block_size = block_size

    def get_computed_blocks(self, req: RequestBlocks) -> list[int]:
        """Cached blocks matching the request's leading full blocks.

        At least one token must be computed to produce logits, so a fully cached sequence
        gives up its last block: hits are capped at ``(num_tokens - 1) // block_size`` blocks.
        Hashes are computed lazily, stopping at the first miss.
        """
        max_blocks = (len(req.token_ids) - 1) // self.block_size
        hashes = req.block_hashes
        cached = self.pool._cached
        hits: list[int] = []
        while True:
            end = min(max_blocks, len(hashes))
            for h in hashes[len(hits) : end]:
                ids = cached.get(h)
                if not ids:
                    return hits
                hits.append(ids[0])
            if end == max_blocks:
                return hits
            self.hasher.extend(hashes, req.token_ids, min(max_blocks, end + 64))

    def allocate_slots(
        self,
        req: RequestBlocks,
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
    ) -> bool:
        """Reserve blocks for ``num_new_tokens`` more tokens; False (and no change) if short.

        ``new_computed_blocks`` are prefix-cache hits found for a request being admitted.
        Newly full blocks are hashed and cached right away, as vLLM does at schedule time.
        """
        bs = self.block_size
        blocks = req.blocks
        total = num_computed_tokens + len(new_computed_blocks) * bs + num_new_tokens
        if num_new_tokens == 1 and total % bs and total <= len(blocks) * bs:
            return True  # a decode token landing in a block that has room and stays partial
        pool = self.pool
        num_new_blocks = -(-total // bs) - len(blocks) - len(new_computed_blocks)
        needed = num_new_blocks
        if new_computed_blocks:
            ref = pool._ref
            # Hits sitting idle in the free queue leave it when touched.
            needed += sum(1 for b in new_computed_blocks if ref[b] == 0)
        if needed > len(pool._free):
            return False
        if new_computed_blocks:
            pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            req.num_cached_blocks = len(blocks)
        if num_new_blocks > 0:
            blocks.extend(pool.allocate(num_new_blocks))
        tokens = req.token_ids
        num_full = min(total, len(tokens)) // bs
        start = req.num_cached_blocks
        if num_full > start:
            hashes = req.block_hashes
            if len(hashes) < num_full:
                self.hasher.extend(hashes, tokens, num_full)
            pool.cache_full_blocks(
                blocks[start:num_full],
                hashes[start:num_full],
                hashes[start - 1] if start else None,
                tokens[start * bs : num_full * bs],
            )
            req.num_cached_blocks = num_full
        return True

    def free(self, req: RequestBlocks) -> None:
        """Release a request's blocks, tail first so that its prefix is evicted last."""
        self.pool.free(reversed(req.blocks))
        req.blocks = []
        req.num_cached_blocks = 0
