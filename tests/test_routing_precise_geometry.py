"""precise-prefix keeps the candidates' block sizes and capacities between requests.

They are recomputed only when the candidates, an endpoint's scraped geometry or the block
sizes announced by KV events change: checked here against the per-endpoint formulas over
random changes of each, and by counting the index look-ups of unchanged requests.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins.precise_prefix import PrecisePrefixScorer
from lbproxy.routing.precise_index import PreciseIndex, block_keys, token_bytes
from lbproxy.routing.registry import lookup
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

NOW = 100.0


class Stored:
    """A BlockStored event as the KV-event decoder produces it (matched by class name)."""

    def __init__(self, hashes: list[int], tokens: list[int], block_size: int) -> None:
        self.block_hashes = hashes
        self.parent_block_hash = None
        self.token_ids = tokens
        self.block_size = block_size


Stored.__name__ = "BlockStored"


class CountingIndex(PreciseIndex):
    lookups = 0

    def block_sizes(self, backend_names: Any) -> list[int | None]:
        self.lookups += 1
        return super().block_sizes(backend_names)


def scorer(index: PreciseIndex, **params: Any) -> PrecisePrefixScorer:
    bctx = BuildContext(pool="p", shared={"precise_index": index})
    return lookup("precise-prefix", "scorer").build(params, bctx)  # type: ignore[no-any-return]


def ref_block_size(s: PrecisePrefixScorer, ep: Endpoint) -> int:
    bs = s.index.block_size_of(ep.name) or ep.block_size
    if not bs and ep.metrics is not None:
        bs = ep.metrics.block_size
    return bs or s.default_block_size


def ref_free_room(s: PrecisePrefixScorer, eps: list[Endpoint]) -> list[float] | None:
    held = s.index.held_counts([e.name for e in eps])
    out = []
    for ep, n in zip(eps, held, strict=True):
        blocks = ep.num_gpu_blocks
        if blocks is None and ep.metrics is not None:
            blocks = ep.metrics.num_gpu_blocks
        if not blocks:
            return None
        out.append(float((blocks - n) * ref_block_size(s, ep)))
    return out


def test_geometry_follows_every_change_like_the_per_endpoint_formulas() -> None:
    rng = random.Random(3)
    index = PreciseIndex()
    s = scorer(index, block_size=8)
    eps = [Endpoint(name=f"e{i}", url="http://x", num_gpu_blocks=100) for i in range(8)]
    tokens = list(range(256))
    candidates = eps
    for step in range(800):
        ep = rng.choice(eps)
        change = rng.randrange(9)
        if change == 0:
            ep.block_size = rng.choice([None, 16, 32])
        elif change == 1:
            ep.num_gpu_blocks = rng.choice([None, 50, 200])
        elif change == 2:
            ep.metrics = MetricsSnapshot(
                time=NOW, block_size=rng.choice([None, 64]), num_gpu_blocks=rng.choice([None, 80])
            )
        elif change == 3 and ep.metrics is not None:
            ep.metrics.num_gpu_blocks = rng.choice([None, 120])  # edited in place
        elif change == 4:  # events announce a block size (a new one drops the old keys)
            bs = rng.choice([16, 32])
            index.apply_events(ep.name, [Stored([step], tokens[:bs], bs)])
        elif change == 5:
            index.forget(ep.name)
        elif change == 6:
            candidates = [e for e in eps if rng.random() < 0.7] or eps
        elif change == 7:
            candidates = list(candidates)
        ctx = RequestContext(model="m")
        ctx.set_token_ids(tokens)
        s.score(ctx, candidates, NOW)
        assert [s.block_size_of(e) for e in candidates] == [
            ref_block_size(s, e) for e in candidates
        ]
        assert s.free_room(candidates) == ref_free_room(s, candidates)
        geo = s._geometry(candidates)
        assert geo.sizes == [ref_block_size(s, e) for e in candidates]


def test_unchanged_requests_look_up_no_block_sizes() -> None:
    index = CountingIndex()
    s = scorer(index)
    eps = [Endpoint(name=f"e{i}", url="http://x", num_gpu_blocks=100) for i in range(64)]
    tokens = list(range(320))
    index.apply_events("e0", [Stored([1, 2], tokens[:32], 16)])
    for i in range(20):
        ctx = RequestContext(model="m")
        ctx.set_token_ids(tokens)
        assert s.score(ctx, eps, NOW + i)[0] == 2 / 20
        eps[i].in_flight += 1  # in-flight counts are read live, not part of the geometry
    assert index.lookups == 1
    eps[5].block_size = 32  # a scrape found another geometry
    ctx = RequestContext(model="m")
    ctx.set_token_ids(tokens)
    s.score(ctx, eps, NOW)
    assert index.lookups == 2
    assert s.block_size_of(eps[5]) == 32


def test_token_bytes_of_an_array_are_those_of_the_list() -> None:
    ids = [0, 1, 7, 65535, 2**31 + 5] * 40
    assert token_bytes(array("I", ids)) == token_bytes(ids) == array("I", ids).tobytes()
    assert block_keys(array("I", ids), 16) == block_keys(ids, 16)
    assert token_bytes(array("H", [1, 2])) == token_bytes([1, 2])  # another width: converted
