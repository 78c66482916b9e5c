"""The decode-latency scorer and the cache-aware-plus profile built on it."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.profiles import BUILTIN_PROFILES, build_router
from lbproxy.routing.registry import PluginError, lookup
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext


def scorer(**params: Any) -> Any:
    bctx = BuildContext(pool="p", model="m", metrics_max_age=2.0)
    return lookup("decode-latency", "scorer").build(params, bctx)  # type: ignore[arg-type]


def scrape(e: Endpoint, t: float, generated: float, running: float | None) -> None:
    e.metrics = MetricsSnapshot(
        time=t, num_running=running, num_waiting=0.0, kv_cache_usage=0.1,
        generation_tokens=generated,
    )  # fmt: skip


def ctx() -> RequestContext:
    return RequestContext(model="m", raw_prompt=b"x")


def feed(s: Any, eps: list[Endpoint], samples: list[list[tuple[float, float]]]) -> list[float]:
    """Scrape every endpoint once a second with (generated, running) and score after each."""
    out: list[float] = []
    for k, row in enumerate(zip(*samples, strict=True)):
        for e, (gen, run) in zip(eps, row, strict=True):
            scrape(e, float(k), gen, run)
        out = s.score(ctx(), eps, float(k))
    return out


def test_slower_backend_at_the_same_batch_scores_lower() -> None:
    # Both run 10 requests; a makes 1000 tok/s (10 ms ITL), b 250 tok/s (40 ms ITL).
    a, b = Endpoint("a", "u", in_flight=10), Endpoint("b", "u", in_flight=10)
    s = scorer(tau=0.001)
    scores = feed(s, [a, b], [[(0, 10), (1000, 10)], [(0, 10), (250, 10)]])
    assert scores == pytest.approx([1.0, 0.25])


def test_more_running_requests_on_equal_hardware_score_lower() -> None:
    # Same rate, twice the batch: each request gets half the tokens per second.
    a, b = Endpoint("a", "u", in_flight=8), Endpoint("b", "u", in_flight=16)
    scores = feed(scorer(tau=0.001), [a, b], [[(0, 8), (800, 8)], [(0, 16), (800, 16)]])
    assert scores == pytest.approx([1.0, 0.5])


def test_idle_is_best_and_unknown_is_neutral() -> None:
    idle = Endpoint("idle", "u")
    busy = Endpoint("busy", "u", in_flight=4)  # running, but a single snapshot: no rate
    never = Endpoint("never", "u", in_flight=1)
    scrape(idle, 0.0, 0.0, 0.0)
    scrape(busy, 0.0, 0.0, 4.0)
    assert scorer().score(ctx(), [idle, busy, never], 0.5) == [1.0, 0.5, 0.5]
    assert scorer(unknown_score=0.0).score(ctx(), [busy], 0.5) == [0.0]


def test_stale_metrics_are_unknown() -> None:
    a = Endpoint("a", "u", in_flight=2)
    s = scorer(tau=0.001)
    feed(s, [a], [[(0, 2), (100, 2)]])
    assert s.score(ctx(), [a], 10.0) == [0.5]  # last snapshot 9 s old > max age 2 s


def test_requests_routed_since_the_scrape_raise_the_estimate() -> None:
    a, b = Endpoint("a", "u", in_flight=10), Endpoint("b", "u", in_flight=10)
    s = scorer(tau=0.001)
    assert feed(s, [a, b], [[(0, 10), (1000, 10)]] * 2) == pytest.approx([1.0, 1.0])
    a.in_flight = 21  # eleven more sent to a before the next scrape: about twice the ITL
    assert s.score(ctx(), [a, b], 1.1) == pytest.approx([0.5, 1.0])


def test_counter_reset_restarts_the_track() -> None:
    a = Endpoint("a", "u", in_flight=5)
    s = scorer(tau=0.001)
    feed(s, [a], [[(0, 5), (500, 5)]])
    scrape(a, 2.0, 10.0, 5.0)  # the backend restarted: counter went back
    assert s.score(ctx(), [a], 2.0) == [0.5]


def test_rate_is_smoothed() -> None:
    a, b = Endpoint("a", "u", in_flight=1), Endpoint("b", "u", in_flight=1)
    s = scorer(tau=1.0)
    # a's rate jumps from 100 to 1000 tok/s; with tau = 1 s it moves ~63% of the way.
    feed(s, [a, b], [[(0, 1), (100, 1), (1100, 1)], [(0, 1), (100, 1), (200, 1)]])
    est = 100 + (1 - math.exp(-1.0)) * 900
    assert s.score(ctx(), [a, b], 2.0) == pytest.approx([1.0, 100 / est])


def test_params_are_checked() -> None:
    with pytest.raises(PluginError):
        scorer(tau=0)
    with pytest.raises(PluginError):
        scorer(unknown_score=2)


def test_cache_aware_plus_profile() -> None:
    spec = BUILTIN_PROFILES["cache-aware-plus"]
    types = {s["type"]: s["weight"] for s in spec["scorers"]}
    # The reference's weights are kept; the load terms are added to them.
    assert types["prefix-hash"] == 3 and types["queue"] == 2 and types["kv-cache-util"] == 2
    assert "decode-latency" in types
    r = build_router("cache-aware-plus", BuildContext(pool="p", model="m"), seed=1)
    eps = [Endpoint(f"e{i}", "u") for i in range(3)]
    for e in eps:
        scrape(e, 0.0, 0.0, 0.0)
    d = r.route(ctx(), eps, 0.1)
    assert d is not None and "decode-latency" in d.scores
