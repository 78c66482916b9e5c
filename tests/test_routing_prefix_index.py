"""The approximate prefix index: chain hashing, matching, LRU and memory bounds."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
from xxhash import xxh64_intdigest

from lbproxy.routing.prefix_index import ChainHasher, EndpointBits, PrefixIndex, chain_hashes


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
    assert index.stats()["hashes"] == index.size("a") == capacity


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
    assert stats["entries"] == stats["hashes"] == 3 * 25
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
