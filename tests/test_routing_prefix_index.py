"""The approximate prefix index: chain hashing, matching, LRU and memory bounds."""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict

import pytest
from xxhash import xxh64_intdigest

from lbproxy.routing.prefix_index import (
    ChainHasher,
    EndpointBits,
    PrefixIndex,
    block_ends,
    chain_hashes,
)


def chain(n: int, tag: int = 0, start: int = 0) -> list[int]:
    """A fake hash chain: distinct per (tag, position)."""
    return [(tag << 32) | i for i in range(start, start + n)]


# ---- hashing -------------------------------------------------------------------------------


def test_chain_hashes_follow_the_formula() -> None:
    data = bytes(range(200))
    seed = 7
    h0 = xxh64_intdigest(data[0:64], seed)
    h1 = xxh64_intdigest(data[64:128], h0)
    h2 = xxh64_intdigest(data[128:192], h1)
    assert chain_hashes(data, 64, seed) == [h0, h1, h2]  # the partial block is not hashed


@pytest.mark.parametrize(
    ("length", "max_blocks", "expected"),
    [(0, None, 0), (63, None, 0), (64, None, 1), (640, None, 10), (640, 4, 4), (6400, 256, 100)],
)
def test_chain_hasher_counts_full_blocks_only(
    length: int, max_blocks: int | None, expected: int
) -> None:
    hasher = ChainHasher(64, max_blocks)
    assert len(hasher.hashes(b"x" * length, 1)) == expected


def test_chain_hasher_reuse_gives_the_same_hashes_as_a_fresh_chain() -> None:
    rng = random.Random(3)
    base = rng.randbytes(64 * 40)
    hasher = ChainHasher(64, max_blocks=32, recent=4)
    prompts = [base]
    for cut in (0, 1, 63, 64, 65, 640, 64 * 31, 64 * 32, 64 * 40):
        prompts.append(base[:cut] + rng.randbytes(700))
    prompts.append(base[:100])  # shorter than the cached one
    prompts.append(base + b"tail")
    for _ in range(3):  # twice more, in cache now
        for p in prompts:
            want = chain_hashes(p, 64, 9)[:32]
            assert hasher.hashes(p, 9) == want
            assert hasher.hashes(p, 10) == chain_hashes(p, 64, 10)[:32]  # seed is part of it


def test_chain_hasher_remembers_a_bounded_number_of_prompts() -> None:
    hasher = ChainHasher(8, recent=3)
    for i in range(10):
        hasher.hashes(bytes([i]) * 64, 0)
    assert len(hasher._recent) == 3


# ---- endpoint bits ---------------------------------------------------------------------------


def test_endpoint_bits_are_reused_after_release() -> None:
    bits = EndpointBits()
    a, b = bits.bit("a"), bits.bit("b")
    assert (a, b) == (1, 2)
    assert bits.names(a | b) == ["a", "b"]
    bits.release("a")
    assert bits.get("a") == 0
    assert bits.bit("c") == 1
    assert bits.mask(["b", "c", "zzz"]) == 3


# ---- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "request_", "expected"),
    [
        ({"a": chain(10)}, chain(10), {"a": 10}),
        ({"a": chain(10)}, chain(4), {"a": 4}),
        ({"a": chain(4)}, chain(10), {"a": 4}),
        ({"a": chain(10)}, chain(10, tag=1), {}),
        ({"a": chain(10), "b": chain(3)}, chain(8), {"a": 8, "b": 3}),
        ({"a": chain(1)}, chain(5), {"a": 1}),
        ({"a": chain(2), "b": chain(9)}, chain(9), {"a": 2, "b": 9}),
        ({}, chain(3), {}),
        ({"a": chain(3)}, [], {}),
    ],
)
def test_match_counts_consecutive_blocks_from_the_start(
    stored: dict[str, list[int]], request_: list[int], expected: dict[str, int]
) -> None:
    index = PrefixIndex()
    for name, hashes in stored.items():
        index.insert(name, hashes, capacity=100)
    assert index.match(request_) == expected
    for name in stored:
        assert index.matched(name, request_) == expected.get(name, 0)


def test_an_evicted_chain_loses_its_tail_first() -> None:
    index = PrefixIndex()
    index.insert("a", chain(10), capacity=10)
    index.insert("a", chain(4, tag=1), capacity=10)  # 4 other blocks push 4 out
    assert index.size("a") == 10
    assert index.matched("a", chain(10)) == 6  # blocks 6..9 went, 0..5 stay
    assert index.matched("a", chain(4, tag=1)) == 4


def test_a_refreshed_prefix_outlives_older_blocks() -> None:
    index = PrefixIndex()
    index.insert("a", chain(5, tag=1), capacity=10)
    index.insert("a", chain(5, tag=2), capacity=10)
    index.insert("a", chain(5, tag=1), capacity=10)  # tag 1 is now the most recent
    index.insert("a", chain(3, tag=3), capacity=10)
    assert index.matched("a", chain(5, tag=1)) == 5
    assert index.matched("a", chain(5, tag=2)) == 2
    assert index.matched("a", chain(3, tag=3)) == 3


def _reference_lru(ops: list[tuple[str, list[int]]], capacity: int) -> dict[str, OrderedDict]:
    """A plain per-block LRU that touches each request's blocks from the last to the first."""
    lrus: dict[str, OrderedDict[int, None]] = {}
    for name, hashes in ops:
        lru = lrus.setdefault(name, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity:
            lru.popitem(last=False)
    return lrus


def test_index_agrees_with_a_plain_lru_and_a_linear_walk() -> None:
    rng = random.Random(11)
    index = PrefixIndex()
    ops = []
    for _ in range(600):
        name = rng.choice("abc")
        tag = rng.randrange(6)
        shared = rng.randrange(1, 30)
        tail = chain(rng.randrange(0, 8), tag=1000 + 100 * tag + rng.randrange(50), start=shared)
        hashes = chain(shared, tag) + tail  # a tail hash names its whole prefix, as in a chain
        ops.append((name, hashes))
        index.insert(name, hashes, capacity=40)
    ref = _reference_lru(ops, 40)
    for name, lru in ref.items():
        assert index.size(name) == len(lru)
        for tag in range(6):
            probe = chain(40, tag)
            linear = 0
            while linear < len(probe) and probe[linear] in lru:
                linear += 1
            assert index.matched(name, probe) == linear
            assert index.match(probe).get(name, 0) == linear


# ---- bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 7, 64])
def test_each_endpoint_holds_at_most_its_capacity(capacity: int) -> None:
    index = PrefixIndex()
    for tag in range(50):
        index.insert("a", chain(20, tag), capacity=capacity)
        assert index.size("a") <= capacity
    stats = index.stats()
    assert stats["entries"] == index.size("a") == capacity
    # "hashes" counts the index's keys, the distinct first blocks held.
    assert stats["hashes"] == sum(1 for tag in range(50) if index.holders(chain(1, tag)[0]))


def test_shrinking_capacity_evicts_down_to_it() -> None:
    index = PrefixIndex()
    index.insert("a", chain(50), capacity=100)
    index.insert("a", chain(50), capacity=10)
    assert index.size("a") == 10
    assert index.matched("a", chain(50)) == 10


def test_memory_is_bounded_by_endpoints_times_capacity() -> None:
    index = PrefixIndex(max_endpoints=3)
    for i in range(20):
        for tag in range(10):
            index.insert(f"ep{i}", chain(30, tag * 100 + i), capacity=25)
    stats = index.stats()
    assert stats["endpoints"] == 3
    assert stats["entries"] == 3 * 25
    assert stats["hashes"] == 3  # one chain head each
    assert stats["approx_bytes"] > 0
    # The least recently routed endpoints were forgotten, with all their hashes.
    assert index.match(chain(30, 9 * 100 + 0)) == {}
    assert index.match(chain(30, 9 * 100 + 19)) == {"ep19": 25}


def test_forget_drops_an_endpoint_and_frees_its_bit() -> None:
    index = PrefixIndex()
    index.insert("a", chain(5), capacity=10)
    index.insert("b", chain(5), capacity=10)
    index.forget("a")
    assert index.match(chain(5)) == {"b": 5}
    assert index.holders(chain(5)[0]) == ["b"]
    index.insert("c", chain(3), capacity=10)  # reuses a's bit without inheriting its blocks
    assert index.match(chain(5)) == {"b": 5, "c": 3}
    index.forget("nobody")
    assert index.stats()["endpoints"] == 2


# ---- growing blocks and weights --------------------------------------------------------------


def test_block_ends_fixed_and_growing() -> None:
    assert block_ends(64, 5) == [64, 128, 192, 256, 320]
    ends = block_ends(64, 256, growth=8)
    assert len(ends) == 41 and ends[-1] == 256 * 64  # the whole span, in 41 blocks
    assert ends[:16] == [64 * (i + 1) for i in range(16)]  # the first 2g blocks: one unit
    for start, end in itertools.pairwise([0, *ends]):
        assert end - start == 64 * max(1, start // 64 // 8) or end == 256 * 64  # 1/g, or cut
    assert block_ends(64, 10, growth=8)[-1] == 640


def test_chain_hasher_with_growing_blocks_hashes_full_blocks_with_reuse() -> None:
    rng = random.Random(5)
    ends = block_ends(64, 256, growth=8)
    base = rng.randbytes(64 * 300)

    def fresh(p: bytes, seed: int) -> list[int]:
        out, h = [], seed
        for a, b in itertools.pairwise([0, *ends]):
            if b > len(p):
                break
            h = xxh64_intdigest(p[a:b], h)
            out.append(h)
        return out

    hasher = ChainHasher(64, 256, recent=4, growth=8)
    prompts = [base] + [base[:cut] + rng.randbytes(900) for cut in (0, 5, 64, 1500, 9000, 16383)]
    prompts += [base[:100], base[: ends[20]], base[: ends[20] - 1]]
    for _ in range(3):
        for p in prompts:
            assert hasher.hashes(p, 3) == fresh(p, 3)
    assert len(hasher.hashes(base[: ends[20] - 1], 3)) == 20  # only full blocks
    with pytest.raises(ValueError):
        ChainHasher(64, None, growth=8)


def _reference_weighted_lru(
    ops: list[tuple[str, list[int]]], weight: dict[int, int], capacity: int
) -> dict[str, OrderedDict]:
    """Per endpoint: touch a request's hashes from last to first, then drop the least
    recently used until the weights held are at most `capacity`."""
    lrus: dict[str, OrderedDict[int, None]] = {}
    for name, hashes in ops:
        lru = lrus.setdefault(name, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while sum(weight[h] for h in lru) > capacity:
            lru.popitem(last=False)
    return lrus


def test_weighted_index_agrees_with_a_plain_weighted_lru() -> None:
    rng = random.Random(12)
    weights = [1] * 4 + [2, 3, 5, 8, 13] * 4  # 24 positions
    index = PrefixIndex()
    ops, weight = [], {}
    for _ in range(500):
        name = rng.choice("ab")
        tag = rng.randrange(5)
        shared = rng.randrange(1, 20)
        # A tail's tag encodes its whole prefix (tag, shared), as a real chain's hash does.
        variant = 1000 + 1000 * tag + 30 * shared + rng.randrange(30)
        hashes = chain(shared, tag) + chain(rng.randrange(0, 5), tag=variant, start=shared)
        for i, h in enumerate(hashes):
            weight[h] = weights[i]
        ops.append((name, hashes))
        index.insert(name, hashes, 60, weights)
        assert index.size(name) <= 60
    for name, lru in _reference_weighted_lru(ops, weight, 60).items():
        assert index.size(name) == sum(weight[h] for h in lru)
        assert index.stats()["entries"] >= len(lru)
        for tag in range(5):
            probe = chain(24, tag)
            linear = 0
            while linear < len(probe) and probe[linear] in lru:
                linear += 1
            assert index.matched(name, probe) == linear
            assert index.match(probe).get(name, 0) == linear


def test_weighted_eviction_keeps_the_head_of_a_chain_too_big_to_hold() -> None:
    index = PrefixIndex()
    index.insert("a", chain(10), capacity=12, weights=[1, 1, 2, 2, 4, 4, 8, 8, 16, 16])
    assert index.size("a") == 10  # blocks 0..4 (1+1+2+2+4); block 5 would make it 14
    assert index.matched("a", chain(10)) == 5
    assert index.stats() == {
        "endpoints": 1,
        "entries": 5,
        "units": 10,
        "hashes": 1,
        "approx_bytes": 5 * 200,
    }


def test_a_footprint_is_charged_and_evicted_before_its_chain() -> None:
    index = PrefixIndex()
    index.insert("a", chain(4, tag=1), capacity=20, tail=6)
    assert index.size("a") == 10
    assert index.match(chain(4, tag=1)) == {"a": 4}  # a footprint is never matched
    index.insert("a", chain(4, tag=2), capacity=20, tail=6)  # 20 units: full
    index.insert("a", chain(2, tag=3), capacity=20)  # 2 more: the oldest footprint goes
    assert index.size("a") == 16
    assert index.matched("a", chain(4, tag=1)) == 4
    index.insert("a", chain(9, tag=4), capacity=20)  # 5 over: tag 1's chain, tag 2's footprint
    assert index.matched("a", chain(4, tag=1)) == 0
    assert index.match(chain(4, tag=1)) == {}
    assert index.matched("a", chain(4, tag=2)) == 4
    assert index.size("a") == 15


def test_a_busy_endpoint_forgets_prefixes_its_cache_could_not_keep() -> None:
    """Short hashed spans of long requests: counting the spans only, an endpoint seems to
    hold every prefix ever sent; counting each request's whole footprint it keeps the
    recent ones, as the engine's cache does."""
    with_tail, spans_only = PrefixIndex(), PrefixIndex()
    for g in range(30):  # 30 groups of 4-unit spans, each request 40 units in all
        with_tail.insert("a", chain(4, tag=g), capacity=200, tail=36)
        spans_only.insert("a", chain(4, tag=g), capacity=200)
    assert spans_only.matched("a", chain(4, tag=0)) == 4  # 120 units of spans: all "held"
    assert with_tail.matched("a", chain(4, tag=0)) == 0  # 1,200 units sent to 200 of cache
    assert with_tail.matched("a", chain(4, tag=29)) == 4
    assert sum(with_tail.matched("a", chain(4, tag=g)) == 4 for g in range(30)) == 5
