"""PrefixIndex against a plain model of its LRU, entry for entry (hash, weight, order),
over seeded random sequences of real hash chains (ChainHasher, growing blocks).

The model: one OrderedDict hash -> weight per endpoint; an insert appends the new blocks
tail first, then moves the held prefix to the end tail first, then drops the oldest
hashes until the endpoint is within its capacity; `roots` are the endpoints holding each
first block. Any change to the index's structure (issue 15 tried a queue of per-request
runs: no gain measured) must keep this test passing.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

import pytest

from lbproxy.routing.prefix_index import ChainHasher, PrefixIndex, block_ends


class Model:
    def __init__(self, max_endpoints: int) -> None:
        self.max_endpoints = max_endpoints
        self.lrus: OrderedDict[str, OrderedDict[int, int]] = OrderedDict()
        self.used: dict[str, int] = {}

    def held(self, name: str, hashes: Sequence[int]) -> int:
        lru = self.lrus.get(name, {})
        k = 0
        while k < len(hashes) and hashes[k] in lru:
            k += 1
        return k

    def insert(
        self, name: str, hashes: Sequence[int], capacity: int, weights: Sequence[int] | None
    ) -> None:
        if name not in self.lrus:
            if len(self.lrus) >= self.max_endpoints:
                self.forget(next(iter(self.lrus)))
            self.lrus[name] = OrderedDict()
            self.used[name] = 0
        else:
            self.lrus.move_to_end(name)
        if not hashes:  # nothing to hold: not even a shrunk capacity is applied
            return
        lru = self.lrus[name]
        w = [1] * len(hashes) if weights is None else list(weights[: len(hashes)])
        k = self.held(name, hashes)
        for i in reversed(range(k, len(hashes))):
            lru[hashes[i]] = w[i]
            self.used[name] += w[i]
        for i in reversed(range(k)):
            lru.move_to_end(hashes[i])
        while self.used[name] > max(capacity, 1):
            _, wi = lru.popitem(last=False)
            self.used[name] -= wi
            # (the fewest oldest that weigh the excess: popping one at a time until under)

    def forget(self, name: str) -> None:
        self.lrus.pop(name, None)
        self.used.pop(name, None)

    def roots(self) -> dict[int, set[str]]:
        """First-block hash -> endpoints holding it (every hash an insert began with)."""
        out: dict[int, set[str]] = {}
        for name, lru in self.lrus.items():
            for h in lru:
                if h in FIRST:
                    out.setdefault(h, set()).add(name)
        return out


FIRST: set[int] = set()  # the first blocks of the chains generated


def _entries(index: PrefixIndex, name: str) -> list[tuple[int, int]]:
    """The endpoint's LRU, oldest first, as (hash, weight) pairs."""
    return list(index._lrus[name].items())


def _roots(index: PrefixIndex) -> dict[int, set[str]]:
    return {h: set(index._bits.names(m)) for h, m in index._roots.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_index_is_entry_for_entry_the_plain_lru_model(seed: int) -> None:
    rng = random.Random(seed)
    bb = 64
    ends = block_ends(bb, 256, 8)
    units = [e // bb for e in ends]
    weights = [b - a for a, b in zip([0, *units], units, strict=False)]
    hasher = ChainHasher(bb, 256, growth=8)
    systems = [rng.randbytes(rng.choice([100, 900, 3000, 8000, 20_000])) for _ in range(6)]
    names = [f"e{i}" for i in range(5)]
    index, model = PrefixIndex(max_endpoints=4), Model(max_endpoints=4)
    for step in range(1500):
        r = rng.random()
        if r < 0.3:  # unique
            data = rng.randbytes(rng.randrange(30, 28_000))
        elif r < 0.8:  # a shared system prompt, then a tail of its own (or none)
            data = rng.choice(systems) + rng.randbytes(rng.choice([0, 0, 50, 700, 5000]))
        else:  # a prefix of a system prompt
            s = rng.choice(systems)
            data = s[: rng.randrange(1, len(s) + 1)]
        hashes = hasher.hashes(data, seed=7)
        if hashes:
            FIRST.add(hashes[0])
        name = rng.choice(names)
        capacity = rng.choice([300, 1000, 1000, 4000]) if step % 50 else rng.randrange(1, 80)
        w = None if rng.random() < 0.15 else weights  # learn() may give no weights
        index.insert(name, hashes, capacity, w)
        model.insert(name, hashes, capacity, w)
        if rng.random() < 0.01:
            gone = rng.choice(names)
            index.forget(gone)
            model.forget(gone)
        assert list(index._lrus) == list(model.lrus)  # endpoints, least recently routed first
        if name not in model.lrus:  # just forgotten
            continue
        assert _entries(index, name) == list(model.lrus[name].items())
        assert index.size(name) == model.used[name]
        if step % 25 == 0:
            for n in model.lrus:
                assert _entries(index, n) == list(model.lrus[n].items())
            assert _roots(index) == model.roots()
            probe = hasher.hashes(rng.choice(systems) + b"x" * 300, seed=7)
            expect = {n: model.held(n, probe) for n in model.lrus}
            assert index.match(probe) == {n: c for n, c in expect.items() if c}
            assert index.stats()["entries"] == sum(len(lru) for lru in model.lrus.values())
