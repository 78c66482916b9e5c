"""Load scores computed once per scrape: the same results as computing them per request.

The saturation filter and the `queue` / `kv-cache-util` scorers keep their last result
until a snapshot, the candidates or their freshness change (`routing.load_cache`). These
tests run them against the per-request formulas (as the plugins computed them before)
over random sequences of scrapes, in-place edits, clock moves across the staleness
boundary, in-flight changes and candidate changes; and check that a request with nothing
changed reads no metrics. Also the max-score picker: a uniform winner among ties, the
retry order by score, and a few random draws per pick instead of a shuffle.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router, WeightedScorer
from lbproxy.routing.plugins._scores import normalise_low_is_good
from lbproxy.routing.plugins.max_score import MaxScorePicker
from lbproxy.routing.registry import lookup
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

MAX_AGE = 2.0
CTX = RequestContext(model="m")


def build(kind: str, type_: str, **params: Any) -> Any:
    return lookup(type_, kind).build(params, BuildContext(pool="p", metrics_max_age=MAX_AGE))


# ---- the per-request formulas, as the plugins computed them before caching --------------------


def fresh(ep: Endpoint, now: float) -> MetricsSnapshot | None:
    m = ep.metrics
    return None if m is None or now - m.time > MAX_AGE else m


def ref_saturated(p: dict[str, Any], ep: Endpoint, now: float) -> bool:
    limit = p.get("max_in_flight")
    if limit is not None and ep.in_flight > limit:
        return True
    m = fresh(ep, now)
    unknown_ok = p.get("stale_as") == "available"
    qd, kvu = p.get("queue_depth", 5), p.get("kv_cache_util", 0.8)
    if m is None:
        return not unknown_ok
    w, u = m.num_waiting, m.kv_cache_usage
    if w is None or u is None:
        if not unknown_ok:
            return True
        return (w is not None and w > qd) or (u is not None and u > kvu)
    return w > qd or u > kvu


def ref_queue(stale: float, eps: list[Endpoint], now: float) -> list[float]:
    values = [None if (m := fresh(ep, now)) is None else m.num_waiting for ep in eps]
    known = [v for v in values if v is not None]
    if not known:
        return [stale] * len(values)
    it = iter(normalise_low_is_good(known))
    return [stale if v is None else next(it) for v in values]


def ref_kv(stale: float, eps: list[Endpoint], now: float) -> list[float]:
    out = []
    for ep in eps:
        m = fresh(ep, now)
        u = None if m is None else m.kv_cache_usage
        out.append(stale if u is None else 1.0 - u)
    return out


# ---- random states ---------------------------------------------------------------------------


def snapshot(rng: random.Random, now: float) -> MetricsSnapshot:
    def maybe(v: float) -> float | None:
        return None if rng.random() < 0.1 else v

    return MetricsSnapshot(
        time=now - rng.choice([0.0, 0.5, 1.0, MAX_AGE, 3.0]),
        num_waiting=maybe(float(rng.randrange(9))),
        kv_cache_usage=maybe(rng.choice([0.1, 0.5, 0.8, 0.81, 0.95])),
    )


def mutate(rng: random.Random, eps: list[Endpoint], now: float) -> float:
    """One random change of state; returns the new clock."""
    ep = rng.choice(eps)
    step = rng.randrange(8)
    if step == 0:
        ep.metrics = snapshot(rng, now)
    elif step == 1 and ep.metrics is not None:  # edited in place (tests and tools do)
        ep.metrics.num_waiting = float(rng.randrange(9))
    elif step == 2 and ep.metrics is not None:
        ep.metrics.kv_cache_usage = rng.choice([0.2, 0.85, None])
    elif step == 3:
        ep.metrics = None
    elif step == 4:
        ep.in_flight = rng.randrange(6)
    elif step == 5:  # onto a snapshot's staleness boundary, or just past it
        times = [e.metrics.time for e in eps if e.metrics is not None]
        if times:
            return rng.choice(times) + MAX_AGE + rng.choice([0.0, 1e-9, -1e-9])
    elif step == 6:
        return now + rng.choice([0.01, 0.3, 1.0])
    elif step == 7:
        return now - rng.choice([0.01, 0.5])  # a clock stepped back is still handled
    return now


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"stale_as": "available"},
        {"max_in_flight": 3},
        {"queue_depth": 2, "kv_cache_util": 0.5, "max_in_flight": 0, "stale_as": "available"},
    ],
)
@pytest.mark.parametrize("seed", range(4))
def test_cached_load_plugins_match_per_request_formulas(params: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    now = 100.0
    eps = [Endpoint(name=f"e{i}", url=f"http://e{i}") for i in range(12)]
    for ep in eps:
        ep.metrics = snapshot(rng, now)
    sat = build("filter", "saturation", **params)
    queue = build("scorer", "queue", stale_as=rng.choice(["worst", "neutral"]))
    kv = build("scorer", "kv-cache-util", stale_as=rng.choice(["worst", "neutral"]))
    candidates = eps
    for _ in range(1500):
        if rng.random() < 0.6:
            now = mutate(rng, eps, now)
        if rng.random() < 0.1:  # another candidate set (a health change, a P/D side)
            candidates = [ep for ep in eps if rng.random() < 0.8]
        elif rng.random() < 0.2:  # the same endpoints in a new list, as the pipeline builds
            candidates = list(candidates)
        kept = sat.filter(CTX, candidates, now)
        assert kept == [ep for ep in candidates if not ref_saturated(params, ep, now)]
        assert queue.score(CTX, candidates, now) == ref_queue(queue.stale_score, candidates, now)
        assert kv.score(CTX, candidates, now) == ref_kv(kv.stale_score, candidates, now)


class _Ref:
    """A plugin computing the per-request formulas, for a reference router."""

    def __init__(self, name: str, fn: Any) -> None:
        self.name, self.fn = name, fn

    def filter(self, ctx: RequestContext, eps: list[Endpoint], now: float) -> list[Endpoint]:
        return self.fn(eps, now)

    def score(self, ctx: RequestContext, eps: list[Endpoint], now: float) -> list[float]:
        return self.fn(eps, now)


def test_cache_aware_decisions_equal_the_per_request_ones_in_a_seeded_run() -> None:
    """A whole router with the cached plugins makes the same decisions, in order, as one
    with the per-request formulas, while requests add in-flight load between scrapes."""
    rng = random.Random(7)
    now = 50.0
    eps = [Endpoint(name=f"e{i}", url=f"http://e{i}") for i in range(20)]
    for ep in eps:
        ep.metrics = snapshot(rng, now)
    params = {"max_in_flight": 4}
    cached = Router(
        [build("filter", "saturation", **params)],
        [
            WeightedScorer(build("scorer", "queue"), 2.0),
            WeightedScorer(build("scorer", "kv-cache-util"), 2.0),
            WeightedScorer(build("scorer", "least-request"), 1.0),
        ],
        MaxScorePicker(),
        seed=3,
    )
    sat = _Ref("saturation", lambda es, t: [e for e in es if not ref_saturated(params, e, t)])
    reference = Router(
        [sat],  # type: ignore[list-item]
        [
            WeightedScorer(_Ref("queue", lambda es, t: ref_queue(0.0, es, t)), 2.0),  # type: ignore[arg-type]
            WeightedScorer(_Ref("kv-cache-util", lambda es, t: ref_kv(0.0, es, t)), 2.0),  # type: ignore[arg-type]
            WeightedScorer(build("scorer", "least-request"), 1.0),
        ],
        MaxScorePicker(),
        seed=3,
    )
    routed = 0
    for _ in range(600):
        if rng.random() < 0.15:
            now = mutate(rng, eps, now)
        now += 0.002
        a = cached.route(CTX, eps, now)
        b = reference.route(CTX, eps, now)
        assert a is not None and b is not None
        assert a.ranked == b.ranked
        assert a.total_list == b.total_list and a.reason == b.reason
        a.endpoint.in_flight += 1  # routed: counted until it finishes
        routed += 1
        if rng.random() < 0.5:
            busy = [e for e in eps if e.in_flight]
            if busy:
                rng.choice(busy).in_flight -= 1
    assert routed == 600


class CountingEndpoint(Endpoint):
    __slots__ = ()
    reads = 0

    def fresh_metrics(self, now: float, max_age: float) -> MetricsSnapshot | None:
        CountingEndpoint.reads += 1
        return Endpoint.fresh_metrics(self, now, max_age)


def test_requests_between_scrapes_read_no_metrics() -> None:
    """The load plugins read each snapshot once per scrape, not once per request: with
    nothing scraped, requests (and in-flight changes) cost no per-endpoint metrics reads."""
    eps: list[Endpoint] = [CountingEndpoint(name=f"e{i}", url="http://x") for i in range(50)]
    for i, ep in enumerate(eps):
        ep.metrics = MetricsSnapshot(time=10.0, num_waiting=float(i % 4), kv_cache_usage=0.3)
    plugins = [
        build("filter", "saturation", max_in_flight=8),
        build("scorer", "queue"),
        build("scorer", "kv-cache-util"),
    ]

    def request(now: float) -> None:
        for p in plugins:
            p.filter(CTX, eps, now) if hasattr(p, "filter") else p.score(CTX, eps, now)

    request(10.5)
    first = CountingEndpoint.reads
    assert first >= len(eps)  # computed once
    for k in range(100):
        eps[k % 50].in_flight += 1  # in-flight counts change with every request
        request(10.5 + k * 0.001)
    assert CountingEndpoint.reads == first
    eps[3].metrics = MetricsSnapshot(time=11.0, num_waiting=9.0, kv_cache_usage=0.9)  # a scrape
    request(11.0)
    assert CountingEndpoint.reads == 2 * first
    assert eps[3] not in plugins[0].filter(CTX, eps, 11.0)
    request(12.6)  # the scrape at 10.0 is now stale: everything is recomputed once more
    assert CountingEndpoint.reads == 3 * first


# ---- max-score picker --------------------------------------------------------------------------


class CountingRandom(random.Random):
    draws = 0

    def getrandbits(self, k: int) -> int:
        self.draws += 1
        return super().getrandbits(k)


def test_max_score_winner_is_uniform_among_ties_and_retry_order_is_by_score() -> None:
    eps = [Endpoint(name=f"e{i}", url="http://x") for i in range(8)]
    totals = [0.5, 0.9, 0.2, 0.9, 0.5, 0.9, 0.1, 0.9]
    tied = {eps[i] for i in (1, 3, 5, 7)}
    rng = random.Random(11)
    picker = MaxScorePicker()
    winners: Counter[str] = Counter()
    second_of_tie: Counter[str] = Counter()
    for _ in range(4000):
        ranked = picker.pick(CTX, eps, totals, rng)
        assert sorted(map(id, ranked)) == sorted(map(id, eps))  # every candidate, once
        scores = [totals[eps.index(e)] for e in ranked]
        assert scores == sorted(scores, reverse=True)
        assert ranked[0] in tied
        winners[ranked[0].name] += 1
        second_of_tie[ranked[1].name] += 1
    assert set(winners) == {"e1", "e3", "e5", "e7"}
    assert all(800 < c < 1200 for c in winners.values()), winners  # 1000 each expected
    assert len(second_of_tie) == 4  # the retry order among ties varies too


def test_max_score_draws_a_few_random_numbers_per_pick_not_one_per_candidate() -> None:
    eps = [Endpoint(name=f"e{i}", url="http://x") for i in range(256)]
    totals = [float(i % 16) for i in range(256)]
    rng = CountingRandom(5)
    picker = MaxScorePicker()
    for _ in range(100):
        ranked = picker.pick(CTX, eps, totals, rng)
        assert totals[eps.index(ranked[0])] == 15.0
    assert rng.draws < 100 * 6  # two bounded draws per pick (a shuffle: ~255 per pick)


def test_max_score_single_and_mismatched() -> None:
    e = Endpoint(name="a", url="http://a")
    assert MaxScorePicker().pick(CTX, [e], [0.3], random.Random(1)) == [e]
    with pytest.raises(ValueError):
        MaxScorePicker().pick(CTX, [e], [0.3, 0.4], random.Random(1))


class _Fixed:
    """A scorer returning one list object until told otherwise (as load scorers do)."""

    def __init__(self, name: str, scores: list[float]) -> None:
        self.name = name
        self.scores = scores
        self.calls = 0

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        self.calls += 1
        return self.scores


def test_the_pipeline_reuses_the_sum_of_unchanged_lists_and_follows_new_ones() -> None:
    eps = [Endpoint(name=f"e{i}", url=f"http://e{i}") for i in range(4)]
    load = _Fixed("load", [0.1, 0.9, 2.0, -1.0])  # clamped to 1.0 and 0.0
    other = _Fixed("other", [0.5, 0.0, 0.0, 0.25])
    router = Router(
        [], [WeightedScorer(load, 2.0), WeightedScorer(other, 1.0)], MaxScorePicker(), seed=1
    )

    def totals() -> list[float]:
        d = router.route(CTX, eps, 1.0)
        assert d is not None
        return d.total_list

    assert totals() == [0.7, 1.8, 2.0, 0.25]
    assert totals() == [0.7, 1.8, 2.0, 0.25]  # the kept sum, not one added to twice
    other.scores = [0.0, 1.0, 0.0, 0.0]  # a new list from the other scorer
    assert totals() == [0.2, 2.8, 2.0, 0.0]
    load.scores = [0.0, 0.0, 0.0, 1.0]  # a new list from the load scorer
    assert totals() == [0.0, 1.0, 0.0, 2.0]
    assert (load.calls, other.calls) == (4, 4)
