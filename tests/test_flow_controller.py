"""Flow control's pure logic: the queue's order, admission, shedding, deadlines, limits."""

from __future__ import annotations

import itertools

import pytest

from lbproxy.config import ConcurrencyLimit, FlowControl
from lbproxy.flow.controller import (
    CLIENT_LEFT,
    EXPECTED_WAIT,
    MAX_WAIT,
    QUEUE_FULL,
    FlowController,
    Shed,
    Thresholds,
    thresholds_for,
)
from lbproxy.flow.limiter import ConcurrencyLimiter
from lbproxy.flow.queue import CANCELLED, DISPATCHED, QUEUED, SHED, FlowQueue, Waiter
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.profiles import build_router
from lbproxy.routing.state import Decision, Endpoint, MetricsSnapshot, RequestContext


def _w(priority: int = 0, flow: str = "", arrival: float = 0.0, tag: str = "") -> Waiter:
    return Waiter(priority, flow, arrival, arrival, payload=tag)


# ------------------------------------------------------------------------------ queue
def test_queue_order_priority_then_fair_turns_then_fcfs() -> None:
    q = FlowQueue()
    for tag, prio, flow in [
        ("a1", 0, "a"),
        ("a2", 0, "a"),
        ("a3", 0, "a"),
        ("b1", 0, "b"),
        ("h1", 5, "a"),
        ("c1", 0, "c"),
        ("b2", 0, "b"),
        ("h2", 5, "z"),
    ]:
        q.push(_w(prio, flow, tag=tag))
    order = []
    while (w := q.pop()) is not None:
        order.append(w.payload)
    # band 5 first (its flows take turns), then band 0: a, b, c, a, b, a.
    assert order == ["h1", "h2", "a1", "b1", "c1", "a2", "b2", "a3"]
    assert q.size == 0 and q.lengths() == {}


def test_queue_remove_and_ahead_of() -> None:
    q = FlowQueue()
    ws = {tag: _w(0, flow, tag=tag) for tag, flow in [("a1", "a"), ("a2", "a"), ("b1", "b")]}
    for w in ws.values():
        q.push(w)
    q.push(_w(3, "x", tag="hi"))
    # A new request of flow b waits behind the high one, b1, and a's two turns (a1, a2).
    assert q.ahead_of(0, "b") == 4
    # A new flow waits behind one request of each flow in its band.
    assert q.ahead_of(0, "new") == 3
    # A heavy flow's next request waits behind its own and every light one.
    assert q.ahead_of(0, "a") == 1 + 2 + 1
    assert q.remove(ws["a2"]) and not q.remove(ws["a2"])
    assert q.size == 3 and q.lengths() == {0: 2, 3: 1}


def test_queue_victim_is_newest_of_longest_flow_in_lowest_band() -> None:
    q = FlowQueue()
    heavy = [_w(0, "heavy", tag=f"h{i}") for i in range(4)]
    for w in heavy:
        q.push(w)
    q.push(_w(0, "light", tag="l0"))
    assert q.victim_for(0, "light") is heavy[-1]  # a light flow displaces the heavy one
    assert q.victim_for(0, "heavy") is None  # the heavy flow cannot displace itself
    assert q.victim_for(1, "anyone") is heavy[-1]  # a higher band displaces the lowest
    assert q.victim_for(-1, "light") is None  # a lower band displaces nobody


# ------------------------------------------------------------------------------ controller
def _ep(name: str, **metrics: float) -> Endpoint:
    ep = Endpoint(name=name, url=f"http://{name}")
    if metrics:
        ep.metrics = MetricsSnapshot(time=metrics.pop("time", 0.0), **metrics)
    return ep


class Driver:
    """Plays the proxy's part (the Binder): ranks the least loaded first, or the backend a
    request's prefix prefers (routing total 3 against 0), and records what happens."""

    def __init__(self, prefer: dict[str, str] | None = None) -> None:
        self.prefer = prefer or {}
        self.bound: list[tuple[str, str]] = []
        self.shed: list[tuple[str, str]] = []

    def rank(self, w: Waiter, candidates: list[Endpoint], now: float) -> Decision | None:
        if not candidates:
            return None
        want = self.prefer.get(w.payload)
        totals = [3.0 if ep.name == want else 0.0 for ep in candidates]
        ranked = sorted(candidates, key=lambda e: (-totals[candidates.index(e)], e.in_flight))
        return Decision(ranked[0], ranked, list(candidates), [], totals)

    def bind(self, w: Waiter, decision: Decision, now: float) -> None:
        decision.endpoint.in_flight += 1
        self.bound.append((w.payload, decision.endpoint.name))

    def on_shed(self, w: Waiter) -> None:
        self.shed.append((w.payload, w.shed_reason))


def _fixed(limit: int, **kw: object) -> FlowControl:
    return FlowControl(limit=ConcurrencyLimit(type="fixed", initial=limit, min=1), **kw)


def test_admit_dispatches_at_once_below_capacity_and_holds_when_full() -> None:
    fc = FlowController(_fixed(2))
    eps = [_ep("x")]
    d = Driver()
    w1, w2, w3 = _w(tag="1"), _w(tag="2"), _w(tag="3")
    assert fc.admit(w1, eps, 0.0, d, d.on_shed) is True
    assert fc.admit(w2, eps, 0.0, d, d.on_shed) is True
    assert eps[0].in_flight == 2
    assert fc.admit(w3, eps, 0.1, d, d.on_shed) is False
    assert w3.state == QUEUED and fc.queue.size == 1 and len(d.bound) == 2
    # A request ends: the waiting one goes, never more than the limit in flight.
    eps[0].in_flight -= 1
    fc.on_done(eps[0], ok=True)
    assert fc.drain(eps, 0.5, d) == 1
    assert d.bound[-1] == ("3", "x") and w3.state == DISPATCHED and w3.dispatched_at == 0.5
    assert eps[0].in_flight == 2 and fc.dispatched_direct == 2 and fc.dispatched_queued == 1


@pytest.mark.parametrize(
    ("metrics", "can_take"),
    [
        ({"num_waiting": 5, "kv_cache_usage": 0.8}, True),
        ({"num_waiting": 6, "kv_cache_usage": 0.1}, False),
        ({"num_waiting": 0, "kv_cache_usage": 0.81}, False),
        ({"num_waiting": 9, "kv_cache_usage": 0.99, "time": -10.0}, True),  # stale: limit only
        ({}, True),  # never scraped: limit only
    ],
)
def test_can_take_reads_the_saturation_thresholds(metrics: dict, can_take: bool) -> None:
    fc = FlowController(_fixed(4), Thresholds(5, 0.8, metrics_max_age=2.0))
    assert fc.can_take(_ep("x", **metrics), now=0.0) is can_take


def test_unhealthy_draining_and_max_in_flight_cannot_take() -> None:
    fc = FlowController(_fixed(8, max_in_flight=3))
    sick, drained, busy, free = _ep("s"), _ep("d"), _ep("b"), _ep("f")
    sick.healthy = False
    drained.draining = True
    busy.in_flight = 3
    assert fc.available([sick, drained, busy, free], 0.0) == [free]
    assert fc.limit_of(busy) == 3


def test_queue_full_sheds_at_once_or_displaces_a_heavier_flow() -> None:
    fc = FlowController(_fixed(1, max_queue=3, headroom=0))
    ep = _ep("x", num_waiting=0, kv_cache_usage=0.0)
    ep.in_flight = 1
    d = Driver()
    for i in range(3):
        assert fc.admit(_w(flow="heavy", tag=f"h{i}"), [ep], 0.0, d, d.on_shed) is False
    with pytest.raises(Shed) as exc:
        fc.admit(_w(flow="heavy", tag="h3"), [ep], 0.0, d, d.on_shed)
    assert exc.value.reason == QUEUE_FULL and exc.value.retry_after >= 1
    # A light flow's request takes the heavy flow's newest place.
    assert fc.admit(_w(flow="light", tag="l0"), [ep], 0.0, d, d.on_shed) is False
    assert d.shed == [("h2", QUEUE_FULL)]
    assert fc.shed_counts[QUEUE_FULL] == 2 and fc.queue.size == 3


def test_max_wait_expires_waiting_requests_in_deadline_order() -> None:
    fc = FlowController(_fixed(1, max_wait=2.0))
    ep = _ep("x")
    ep.in_flight = 1
    d = Driver()
    a, b = _w(tag="a", arrival=0.0), _w(tag="b", arrival=1.0)
    fc.admit(a, [ep], 0.0, d, d.on_shed)
    fc.admit(b, [ep], 1.0, d, d.on_shed)
    assert fc.next_deadline() == 2.0
    assert fc.expire(1.9, d.on_shed) == 0
    assert fc.expire(2.0, d.on_shed) == 1 and d.shed == [("a", MAX_WAIT)]
    assert a.state == SHED and fc.next_deadline() == 3.0
    # b's client leaves: it is never dispatched, and its deadline no longer counts.
    assert fc.cancel(b, 2.5) and b.state == CANCELLED and not fc.cancel(b, 2.6)
    assert fc.next_deadline() is None and fc.shed_counts[CLIENT_LEFT] == 1
    ep.in_flight = 0
    assert fc.drain([ep], 3.0, d) == 0 and d.bound == []


def test_expected_wait_sheds_early_once_the_dispatch_rate_is_known() -> None:
    fc = FlowController(_fixed(1, max_wait=5.0, max_queue=10_000))
    ep = _ep("x")
    d = Driver()
    t = 0.0
    # Backlogged for 20 s at one dispatch per second: the rate is measured at ~1/s.
    ep.in_flight = 1
    for i in range(60):
        assert fc.admit(_w(tag=str(i), arrival=t), [ep], t, d, d.on_shed) is False
    assert fc.dispatch_rate() is None  # nothing measured yet: no early shedding
    for _ in range(20):
        t += 1.0
        ep.in_flight = 0
        fc.drain([ep], t, d)
    rate = fc.dispatch_rate()
    assert rate is not None and 0.8 < rate < 1.2
    with pytest.raises(Shed) as exc:  # ~39 waiting ahead at 1/s: far past 5 s
        fc.admit(_w(tag="late", arrival=t), [ep], t, d, d.on_shed)
    assert exc.value.reason == EXPECTED_WAIT and exc.value.retry_after == 5
    # A higher band has nobody ahead of it: it waits.
    assert fc.admit(_w(priority=9, tag="vip", arrival=t), [ep], t, d, d.on_shed) is False


def test_disabled_early_shed_only_bounds_by_max_queue() -> None:
    fc = FlowController(_fixed(1, shed_early=False, max_queue=50, max_wait=1.0))
    ep = _ep("x")
    ep.in_flight = 1
    d = Driver()
    for i in range(50):
        assert fc.admit(_w(tag=str(i), arrival=i * 0.01), [ep], i * 0.01, d, d.on_shed) is False


# ------------------------------------------------------------------------------ limiter
def _snap(t: float, generated: float, running: float) -> MetricsSnapshot:
    return MetricsSnapshot(time=t, num_running=running, num_waiting=0, generation_tokens=generated)


def _engine_itl(batch: float) -> float:
    """A decode step of 10 ms plus 1 ms per sequence: the limit for 80 ms is 70."""
    return 0.010 + 0.001 * batch


def test_gradient_limit_converges_to_the_batch_that_meets_the_target() -> None:
    lim = ConcurrencyLimiter(ConcurrencyLimit(initial=16, target_itl=0.08))
    t, generated = 0.0, 0.0
    for _ in range(200):
        running = float(lim.value())  # the backend always has as many as it is allowed
        t += 0.25
        generated += 0.25 * running / _engine_itl(running)
        lim.on_metrics(_snap(t, generated, running), in_flight=lim.value())
    assert 60 <= lim.value() <= 72
    assert lim.itl is not None and abs(lim.itl - 0.08) < 0.01


def test_gradient_limit_shrinks_when_latency_climbs_and_grows_only_when_used() -> None:
    lim = ConcurrencyLimiter(ConcurrencyLimit(initial=100, target_itl=0.05))
    t, generated = 0.0, 0.0
    for _ in range(40):  # 100 running at 110 ms per token: far over 50 ms
        t += 0.25
        generated += 0.25 * 100 / _engine_itl(100)
        lim.on_metrics(_snap(t, generated, 100), in_flight=100)
    assert lim.value() < 60
    low = lim.value()
    for _ in range(40):  # now lightly used: 5 running, latency low, in flight low
        t += 0.25
        generated += 0.25 * 5 / _engine_itl(5)
        lim.on_metrics(_snap(t, generated, 5), in_flight=5)
    assert lim.value() == low  # an unused limit says nothing about more load


@pytest.mark.parametrize("start", [2.6, 2.9, 3.9])
def test_a_small_fractional_limit_still_grows(start: float) -> None:
    """A limit of 2.6 lets 2 in flight: growth must not wait for 0.8 x 2.6 running. (A
    slow card cut to such a limit by a long prompt's prefill stayed there.)"""
    lim = ConcurrencyLimiter(ConcurrencyLimit(initial=16, target_itl=0.09))
    lim.limit = start
    t, generated = 0.0, 0.0
    for _ in range(80):
        running = float(lim.value())  # the backend runs as many as it is allowed
        t += 0.25
        generated += 0.25 * running / (0.028 + 0.0015 * running)
        lim.on_metrics(_snap(t, generated, running), in_flight=lim.value())
    assert lim.value() >= 16


def _fill(lim: ConcurrencyLimiter, seconds: float, ramp: float | None) -> list[int]:
    """A backend that always has as many requests as allowed; its limit each second."""
    t, generated, limits = 0.0, 0.0, []
    for k in range(int(seconds * 4)):
        running = float(lim.value())
        t += 0.25
        generated += 0.25 * running / _engine_itl(running)
        lim.on_metrics(_snap(t, generated, running), in_flight=lim.value(), ramp=ramp)
        if k % 4 == 3:
            limits.append(lim.value())
    return limits


def test_gradient_growth_is_paced_over_the_ramp_so_an_empty_backend_fills_gradually() -> None:
    params = ConcurrencyLimit(initial=8, target_itl=0.08)
    unpaced = _fill(ConcurrencyLimiter(params), 60, None)
    paced = _fill(ConcurrencyLimiter(params), 60, ramp=30.0)
    assert unpaced[4] >= 60  # filled within 5 s: every request would end together
    # Paced: about a request's lifetime (30 s) to fill, with room added every few seconds.
    assert paced[4] < 30 and 15 <= paced[14] < 60
    assert paced[-1] >= 60
    steps = [b - a for a, b in itertools.pairwise(paced[:30])]
    assert max(steps) <= 6


def test_the_ramp_follows_the_output_tokens_requests_ask_for() -> None:
    fc = FlowController(FlowControl(limit=ConcurrencyLimit(initial=4, target_itl=0.05)))
    eps = [_ep("x")]
    d = Driver()
    assert fc.ramp_time() is None  # nobody said: growth unpaced
    w = _w(tag="1")
    w.max_tokens = 1000
    assert fc.admit(w, eps, 0.0, d, d.on_shed) is True
    assert fc.ramp_time() == pytest.approx(50.0)  # 1,000 tokens x 50 ms
    w = _w(tag="2")
    w.max_tokens = 100_000
    fc.admit(w, eps, 0.0, d, d.on_shed)
    assert fc.ramp_time() == pytest.approx(120.0)  # capped


def test_only_new_room_under_a_backlog_is_paced() -> None:
    def grow(peak: float, waiting: bool) -> int:
        """The limit after 10 s of a full backend at low latency."""
        fc = FlowController(FlowControl(limit=ConcurrencyLimit(initial=8, target_itl=0.08)))
        ep = _ep("x")
        d = Driver()
        for i in range(8 + waiting):  # the 9th waits: the queue is not empty
            w = _w(tag=str(i))
            w.max_tokens = 1000  # an 80 s lifetime
            fc.admit(w, [ep], 0.0, d, d.on_shed)
        lim = fc.limiter(ep)
        lim.peak = max(lim.peak, peak)  # the highest limit it has had
        t, generated = 0.0, 0.0
        for _ in range(40):
            running = float(lim.value())
            ep.in_flight = lim.value()
            t += 0.25
            generated += 0.25 * running / _engine_itl(running)
            ep.metrics = _snap(t, generated, running)
            fc.on_metrics(ep)
        return lim.value()

    paced = grow(peak=0, waiting=True)
    assert paced < 20  # an empty backend under a backlog: filled over ~80 s
    assert grow(peak=200, waiting=True) >= 60  # back up to a limit it had: not paced
    assert grow(peak=0, waiting=False) >= 60  # nobody waits: as before


def test_a_limit_left_unused_is_forgotten_and_then_regrown_paced() -> None:
    def after_lull(in_flight: int, seconds: float = 60.0) -> ConcurrencyLimiter:
        """A limit of 70 learnt under load, then `seconds` with `in_flight` requests."""
        fc = FlowController(FlowControl(limit=ConcurrencyLimit(initial=8, target_itl=0.08)))
        ep = _ep("x")
        d = Driver()
        w = _w(tag="0")
        w.max_tokens = 1000  # an 80 s lifetime: an unused limit is forgotten over 20 s
        fc.admit(w, [ep], 0.0, d, d.on_shed)
        lim = fc.limiter(ep)
        lim.limit = lim.peak = 70.0
        ep.in_flight = in_flight
        t, generated = 0.0, 0.0
        for _ in range(int(seconds * 4)):
            t += 0.25
            if in_flight:
                generated += 0.25 * in_flight / _engine_itl(in_flight)
            ep.metrics = _snap(t, generated, float(in_flight))
            fc.on_metrics(ep)
        return lim

    assert after_lull(40).value() == 70  # more than half in use: kept
    assert after_lull(40).peak == 70
    lim = after_lull(10)  # forgotten down to twice what is in use
    assert 20 <= lim.value() <= 25 and lim.peak <= 25
    lim = after_lull(0)  # idle: back to about a new backend's
    assert lim.value() <= 12 and lim.peak <= 12
    assert after_lull(0, seconds=5.0).value() >= 50  # a short lull forgets little
    # A surge after the lull regrows it over a request's lifetime, not at once.
    assert _fill(lim, 10, ramp=80.0)[-1] < 25


def _asking(fc: FlowController, eps: list[Endpoint], n: int, tokens: int) -> None:
    d = Driver()
    for i in range(n):
        w = _w(tag=str(i))
        w.max_tokens = tokens
        fc.admit(w, eps, 0.0, d, d.on_shed)


def test_the_ramp_shortens_when_requests_end_sooner_than_they_ask() -> None:
    fc = FlowController(FlowControl(limit=ConcurrencyLimit(initial=64, target_itl=0.05)))
    eps = [_ep("x")]
    _asking(fc, eps, 10, 2000)  # they ask for 2,000 tokens: 100 s
    assert fc.ramp_time() == pytest.approx(100.0)
    # ...but each lives ~10 s from dispatch to end.
    for k in range(60):
        eps[0].in_flight -= 1
        fc.on_done(eps[0], ok=True, now=float(k), started=k - 10.0)
        eps[0].in_flight += 1
    ramp = fc.ramp_time()
    assert ramp is not None and 9.5 <= ramp <= 11.0
    # Ends without a dispatch time (a slot given back unused) measure nothing.
    for k in range(60, 120):
        fc.on_done(eps[0], ok=True, now=float(k))
    assert fc.ramp_time() == ramp


def _ending(
    in_flight: int, ended: int, t0: float, gap: float, lived: float
) -> tuple[FlowController, Endpoint]:
    """A backend with `in_flight` requests that asked for 2,000 tokens (100 s at a 50 ms
    target_itl), of which `ended` end from `t0`, `gap` s apart, each having lived `lived` s."""
    fc = FlowController(FlowControl(limit=ConcurrencyLimit(initial=64, target_itl=0.05)))
    ep = _ep("x")
    _asking(fc, [ep], 10, 2000)
    ep.in_flight = in_flight
    for k in range(ended):
        t = t0 + k * gap
        ep.in_flight -= 1
        fc.on_done(ep, ok=True, now=t, started=t - lived)
    return fc, ep


def test_the_ramp_holds_through_a_drain_and_the_lull_after_it() -> None:
    # 300 requests in flight, each living 40 s, end as a drain: in flight falls to
    # nothing, and nothing ends for a minute after. A surge then must still be ramped
    # over the 40 s they lived (the floor of 5 s would let an empty backend fill at once).
    fc, ep = _ending(in_flight=300, ended=300, t0=100.0, gap=0.2, lived=40.0)
    assert ep.in_flight == 0
    ramp = fc.ramp_time()
    assert ramp is not None and ramp == pytest.approx(40.0)


def test_the_ramp_holds_while_the_fleet_fills_though_the_first_requests_end_soon() -> None:
    # From empty, 1,500 requests go out over 30 s, and the first 40 of them end after
    # ~15 s each (they ran alone on empty engines). The requests dispatched now will
    # share full engines and live the 100 s they ask for at target_itl: the ramp stays.
    fc, _ = _ending(in_flight=1500, ended=40, t0=15.0, gap=0.25, lived=15.0)
    assert fc.ramp_time() == pytest.approx(100.0)


def test_limit_without_metrics_ramps_by_completions_and_backs_off_on_429() -> None:
    lim = ConcurrencyLimiter(ConcurrencyLimit(initial=4, max=10))
    for _ in range(20):
        lim.on_done(ok=True, overloaded=False, in_flight=lim.value() - 1)
    assert lim.value() == 10  # +1 per completion while in use, up to max
    lim.on_done(ok=False, overloaded=True, in_flight=3)
    assert lim.value() == 9
    fixed = ConcurrencyLimiter(ConcurrencyLimit(type="fixed", initial=4))
    for _ in range(5):
        fixed.on_done(ok=True, overloaded=False, in_flight=3)
    assert fixed.value() == 4


def test_a_request_waits_for_its_cached_backend_then_takes_another() -> None:
    fc = FlowController(_fixed(1, affinity_wait=2.0, affinity_margin=1.0))
    warm, cold = _ep("warm"), _ep("cold")
    warm.in_flight = 1  # full
    d = Driver(prefer={"p": "warm"})
    w = _w(tag="p", arrival=0.0)
    # The warm backend is full and the cold one scores 3 less: wait rather than go cold.
    assert fc.admit(w, [warm, cold], 0.0, d, d.on_shed) is False
    # A request without a preference is not held up behind it: it takes the cold one.
    assert fc.admit(_w(tag="any", arrival=0.5), [warm, cold], 0.5, d, d.on_shed) is False
    assert d.bound == [("any", "cold")] and fc.queue.size == 1
    cold.in_flight = 0
    assert fc.drain([warm, cold], 1.0, d) == 0  # 1 s waited: still holding for warm
    warm.in_flight = 0
    assert fc.drain([warm, cold], 1.5, d) == 1 and d.bound[-1] == ("p", "warm")
    # Past affinity_wait it takes whatever has room.
    warm.in_flight = 1
    late = _w(tag="p", arrival=2.0)
    assert fc.admit(late, [warm, cold], 2.0, d, d.on_shed) is False
    assert fc.drain([warm, cold], 4.1, d) == 1 and d.bound[-1] == ("p", "cold")


def test_affinity_wait_counts_from_the_first_hold_not_from_arrival() -> None:
    """Under a steady backlog every request reaching the front has already waited longer
    than affinity_wait; that wait, spent behind others, must not send it to a cold backend."""
    fc = FlowController(_fixed(1, affinity_wait=2.0, affinity_margin=1.0, max_wait=30.0))
    warm, cold = _ep("warm"), _ep("cold")
    warm.in_flight = cold.in_flight = 1  # both full: it waits behind the backlog
    d = Driver(prefer={"p": "warm"})
    w = _w(tag="p", arrival=0.0)
    assert fc.admit(w, [warm, cold], 0.0, d, d.on_shed) is False
    assert fc.drain([warm, cold], 9.0, d) == 0 and w.held_since is None  # nothing had room
    cold.in_flight = 0  # 10 s after its arrival a cold backend has room: it still holds
    assert fc.drain([warm, cold], 10.0, d) == 0 and w.held_since == 10.0
    assert fc.drain([warm, cold], 11.5, d) == 0
    warm.in_flight = 0
    assert fc.drain([warm, cold], 11.9, d) == 1 and d.bound[-1] == ("p", "warm")
    # Held for affinity_wait since its first hold: it takes the cold one.
    warm.in_flight = 1
    late = _w(tag="p", arrival=12.0)
    assert fc.admit(late, [warm, cold], 12.0, d, d.on_shed) is False
    assert fc.drain([warm, cold], 13.9, d) == 0
    assert fc.drain([warm, cold], 14.0, d) == 1 and d.bound[-1] == ("p", "cold")


def test_a_freed_backend_takes_a_request_of_its_own_before_one_going_cold() -> None:
    """Under overload most requests are shed anyway: a slot goes to a request whose prefix
    is cached there before one whose affinity wait ran out (it would arrive cold)."""
    fc = FlowController(_fixed(1, affinity_wait=2.0, affinity_margin=1.0, max_wait=30.0))
    warm, cold, other = _ep("warm"), _ep("cold"), _ep("other")
    eps = [warm, cold, other]
    warm.in_flight = cold.in_flight = other.in_flight = 1
    d = Driver(prefer={"p": "warm", "q": "cold"})
    p, q = _w(tag="p", arrival=0.0), _w(tag="q", arrival=0.1)
    assert fc.admit(p, eps, 0.0, d, d.on_shed) is False
    assert fc.admit(q, eps, 0.1, d, d.on_shed) is False
    other.in_flight = 0  # room only where neither is cached: both hold for their own
    assert fc.drain(eps, 1.0, d) == 0 and p.held_since == q.held_since == 1.0
    other.in_flight = 1
    cold.in_flight = 0  # past p's affinity wait, q's own backend frees up
    assert fc.drain(eps, 4.0, d) == 1
    assert d.bound == [("q", "cold")] and p.state == QUEUED
    # With nothing of its own waiting for the freed backend, p takes it.
    cold.in_flight = 0
    assert fc.drain(eps, 4.5, d) == 1 and d.bound[-1] == ("p", "cold")


def test_a_request_waits_for_its_cached_backend_over_the_kv_threshold() -> None:
    """With the pool's own router (cache-aware, saturation filter at KV 0.8), a request
    whose cached backend is over the threshold is held for it, not sent cold at once."""
    router = build_router("cache-aware", BuildContext(pool="p", model="m", metrics_max_age=2.0))
    fc = FlowController(_fixed(10, affinity_wait=1.0, max_wait=30.0), thresholds_for(router, 2.0))
    warm, cold = _ep("warm", kv_cache_usage=0.1), _ep("cold", kv_cache_usage=0.1)
    eps = [warm, cold]
    prompt = ("shared " * 200).encode()

    class Binder:
        bound: list[str] = []

        def rank(self, w: Waiter, candidates: list[Endpoint], now: float) -> Decision | None:
            return router.rank(w.payload, candidates, now, gates=False)

        def bind(self, w: Waiter, decision: Decision, now: float) -> None:
            router.commit(w.payload, decision.endpoint, now)
            decision.endpoint.in_flight += 1
            self.bound.append(decision.endpoint.name)

    b = Binder()
    first = Waiter(0, "", 0.0, 0.0, RequestContext(model="m", raw_prompt=prompt))
    assert fc.admit(first, eps, 0.0, b, lambda w: None) is True
    home = next(ep for ep in eps if ep.name == b.bound[0])
    assert home.metrics is not None
    home.metrics.kv_cache_usage = 0.9
    w = Waiter(0, "", 0.1, 0.0, RequestContext(model="m", raw_prompt=prompt))
    assert fc.admit(w, eps, 0.1, b, lambda w: None) is False and b.bound == [home.name]
    home.metrics.kv_cache_usage = 0.5
    assert fc.drain(eps, 0.5, b) == 1 and b.bound == [home.name, home.name]


def test_scan_follows_service_order() -> None:
    q = FlowQueue()
    for tag, prio, flow in [("a1", 0, "a"), ("a2", 0, "a"), ("b1", 0, "b"), ("h1", 1, "h")]:
        q.push(_w(prio, flow, tag=tag))
    assert [w.payload for w in q.scan(10)] == ["h1", "a1", "b1", "a2"]
    assert [w.payload for w in q.scan(2)] == ["h1", "a1"]


def test_headroom_lets_a_light_flow_and_a_higher_band_past_a_backlog() -> None:
    fc = FlowController(_fixed(10, headroom=0.2, max_queue=100))
    ep = _ep("x")
    ep.in_flight = 10  # full
    d = Driver()
    for i in range(5):
        assert fc.admit(_w(flow="heavy", tag=f"h{i}"), [ep], 0.0, d, d.on_shed) is False
    assert d.bound == []  # the backlog's own flow stays within the limit
    fc.admit(_w(flow="light", tag="l0"), [ep], 0.1, d, d.on_shed)
    fc.admit(_w(priority=5, flow="heavy", tag="p0"), [ep], 0.2, d, d.on_shed)
    # Both went at once into the headroom (2 = 20% of 10); the heavy flow still waits.
    assert d.bound == [("l0", "x"), ("p0", "x")] and ep.in_flight == 12
    fc.admit(_w(flow="light", tag="l1"), [ep], 0.3, d, d.on_shed)
    assert fc.queue.size == 6 and ep.in_flight == 12  # headroom used up


def test_one_flow_one_band_never_exceeds_the_limit() -> None:
    fc = FlowController(_fixed(3, headroom=0.5, max_queue=100))
    ep = _ep("x")
    d = Driver()
    for i in range(10):
        fc.admit(_w(tag=str(i)), [ep], 0.0, d, d.on_shed)
    assert ep.in_flight == 3 and fc.queue.size == 7
