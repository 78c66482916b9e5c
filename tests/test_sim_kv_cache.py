"""Paged KV cache with prefix caching (lbproxy.sim.kv_cache)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbproxy.sim.kv_cache import (
    AllBlocksCleared,
    BlockHasher,
    BlockPool,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    RequestBlocks,
)


def run_prefill(kv: KVCacheManager, tokens: list[int]) -> RequestBlocks:
    """Admit a request the way the scheduler does: reuse hits, then compute the rest."""
    req = RequestBlocks(list(tokens))
    hits = kv.get_computed_blocks(req)
    num_new = len(tokens) - len(hits) * kv.block_size
    assert kv.allocate_slots(req, 0, num_new, hits)
    return req


def replay(events: list, into: Counter[int]) -> None:
    """Apply KV events as a multiset: vLLM does not de-duplicate identical blocks."""
    for ev in events:
        if isinstance(ev, BlockStored):
            into.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            into.subtract(ev.block_hashes)
        else:
            into.clear()
    for h in [h for h, n in into.items() if n <= 0]:
        del into[h]


def test_hashes_are_chained_seeded_uint64() -> None:
    h = BlockHasher(4, seed=7)
    a = h.hash_block(None, [1, 2, 3, 4])
    assert a == BlockHasher(4, seed=7).hash_block(None, [1, 2, 3, 4])
    assert a != BlockHasher(4, seed=8).hash_block(None, [1, 2, 3, 4])
    assert 0 <= a < 2**64
    # Same tokens under another parent hash differently: the chain is positional.
    assert h.hash_block(a, [5, 6, 7, 8]) != h.hash_block(None, [5, 6, 7, 8])
    chain: list[int] = []
    h.extend(chain, list(range(1, 11)), 2)  # 10 tokens -> 2 full blocks
    assert chain == [a, h.hash_block(a, [5, 6, 7, 8])]
    with pytest.raises(ValueError, match="hash_seed"):
        BlockHasher(4, seed=-1)


@pytest.mark.parametrize(
    ("prompt_len", "block_size", "expected_hit"),
    [
        (500, 128, 384),  # last partial block is never cached
        (512, 128, 384),  # fully cached: the last block is recomputed anyway
        (513, 128, 512),
        (128, 128, 0),
        (100, 128, 0),
        (256, 16, 240),
        (17, 16, 16),
    ],
)
def test_prefix_hit_of_repeated_prompt(prompt_len: int, block_size: int, expected_hit: int) -> None:
    kv = KVCacheManager(64, block_size)
    tokens = list(range(prompt_len))
    first = run_prefill(kv, tokens)
    kv.free(first)
    second = RequestBlocks(list(tokens))
    assert len(kv.get_computed_blocks(second)) * block_size == expected_hit


def test_prompts_sharing_a_prefix_hit_the_shared_full_blocks() -> None:
    kv = KVCacheManager(128, 16)
    prefix = list(range(1000, 1300))  # 300 tokens: 18 full blocks + 12
    a = run_prefill(kv, [*prefix, 1, 2, 3])
    b = RequestBlocks([*prefix, 7, 8, 9, 10, 11])
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 18
    assert hits == a.blocks[:18]
    # Sharing takes a reference instead of new blocks.
    assert kv.allocate_slots(b, 0, len(b.token_ids) - 18 * 16, hits)
    assert all(kv.pool.ref_count(x) == 2 for x in hits)
    assert a.blocks[18] != b.blocks[18]


def test_block_stored_events_batch_a_requests_new_blocks() -> None:
    kv = KVCacheManager(64, 4)
    req = RequestBlocks(list(range(10)))
    assert kv.allocate_slots(req, 0, 10)
    (ev,) = kv.pool.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.parent_block_hash is None
    assert ev.token_ids == list(range(8)) and ev.block_size == 4
    assert ev.block_hashes == req.block_hashes[:2]
    # Two decoded tokens fill block 3: announced alone, chained to block 2.
    req.token_ids.extend([10, 11])
    assert kv.allocate_slots(req, 10, 1)
    assert kv.pool.take_events() == []
    assert kv.allocate_slots(req, 11, 1)
    (ev,) = kv.pool.take_events()
    assert ev.block_hashes == [req.block_hashes[2]]
    assert ev.parent_block_hash == req.block_hashes[1]
    assert ev.token_ids == [8, 9, 10, 11]


def test_lru_evicts_oldest_freed_first_and_reports_removal() -> None:
    # 12 usable blocks of 4 tokens; three 8-token requests use 2 blocks each.
    kv = KVCacheManager(13, 4)
    reqs = [run_prefill(kv, [100 * i + t for t in range(8)]) for i in range(3)]
    for r in reqs:  # freed oldest first: reqs[0], then [1], then [2]
        kv.free(r)
    kv.pool.take_events()
    # Six never-used blocks are handed out before any cached one.
    kv.pool.allocate(6)
    assert kv.pool.take_events() == []
    kv.pool.allocate(3)
    removed = [h for ev in kv.pool.take_events() for h in ev.block_hashes]
    r0, r1 = reqs[0].block_hashes, reqs[1].block_hashes
    # A request's tail block goes before its head, so shared prefixes live longest.
    assert removed == [r0[1], r0[0], r1[1]]
    assert kv.get_computed_blocks(RequestBlocks([*range(8), 0])) == []
    assert len(kv.get_computed_blocks(RequestBlocks([*range(200, 208), 0]))) == 2


def test_freed_fresh_blocks_are_reused_before_cached_ones() -> None:
    kv = KVCacheManager(9, 4)
    cached = run_prefill(kv, list(range(8)))  # 2 full blocks
    partial = run_prefill(kv, [50, 51])  # 1 unhashed block
    cached_ids, partial_id = list(cached.blocks), partial.blocks[0]
    kv.free(cached)
    kv.free(partial)
    queue = kv.pool.free_queue()
    assert queue[0] == partial_id  # empty again: first to be reused
    assert queue[-2:] == cached_ids[::-1]  # cached: last to go, tail before head
    kv.pool.take_events()
    assert kv.pool.allocate(1) == [partial_id]
    assert kv.pool.take_events() == []  # nothing cached was evicted


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    kv = KVCacheManager(5, 4)  # 4 usable blocks
    a = run_prefill(kv, list(range(12)))  # 3 blocks
    b = RequestBlocks(list(range(100, 108)))
    assert not kv.allocate_slots(b, 0, 8)
    assert b.blocks == [] and kv.pool.num_free_blocks == 1
    assert kv.pool.usage == pytest.approx(3 / 4)  # the null block is not counted
    kv.free(a)
    assert kv.pool.usage == 0.0
    assert kv.allocate_slots(b, 0, 8)


def test_a_shared_block_stays_in_use_until_its_last_holder_frees_it() -> None:
    kv = KVCacheManager(16, 4)
    a = run_prefill(kv, list(range(9)))
    b = run_prefill(kv, list(range(9)))
    shared = a.blocks[:2]
    assert b.blocks[:2] == shared
    kv.free(a)
    assert all(kv.pool.ref_count(x) == 1 for x in shared)
    assert not set(shared) & set(kv.pool.free_queue())
    kv.free(b)
    assert set(shared) <= set(kv.pool.free_queue())


def test_reset_prefix_cache_only_when_no_block_is_in_use() -> None:
    kv = KVCacheManager(16, 4)
    req = run_prefill(kv, list(range(9)))
    assert not kv.pool.reset_prefix_cache()
    kv.free(req)
    kv.pool.take_events()
    assert kv.pool.reset_prefix_cache()
    assert kv.pool.take_events() == [AllBlocksCleared()]
    assert kv.pool.cached_hashes() == set()
    assert kv.get_computed_blocks(RequestBlocks(list(range(9)))) == []


def test_events_replayed_as_multiset_give_exactly_the_cached_hashes() -> None:
    rng = random.Random(3)
    kv = KVCacheManager(40, 4)
    live: list[RequestBlocks] = []
    seen: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for _ in range(400):
        if live and (rng.random() < 0.4 or kv.pool.num_free_blocks < 8):
            kv.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 14))]
            req = RequestBlocks(tokens)
            hits = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, 0, len(tokens) - len(hits) * 4, hits):
                live.append(req)
        events = kv.pool.take_events()
        kinds.update(type(ev).__name__ for ev in events)
        replay(events, seen)
        assert set(seen) == kv.pool.cached_hashes()
    assert kinds["BlockStored"] > 50 and kinds["BlockRemoved"] > 50


def test_pool_rejects_a_cache_without_usable_blocks() -> None:
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        BlockPool(1, 16)
