"""Flow control's P/D rules, pure logic with hand-built endpoints: a prefill leg is
admitted by the prefill work queued on its backend (not by the decode limit nor the
engine's queue of prompts), a `role: both` backend's decode limit counts only what
decodes there, and a decode slot reserved while its prefill runs does not stop the
limit's growth."""

from __future__ import annotations

from lbproxy.config import ConcurrencyLimit, FlowControl
from lbproxy.flow.controller import FlowController
from lbproxy.flow.limiter import ConcurrencyLimiter
from lbproxy.routing.state import Endpoint, MetricsSnapshot


def _pd_controller(**flow: object) -> FlowController:
    ctl = FlowController(FlowControl(**flow))  # type: ignore[arg-type]
    ctl.disaggregated = True
    return ctl


def _split(ctl: FlowController, p: Endpoint, d: Endpoint, uncached: int, now: float) -> None:
    """Dispatch a pair as the drivers do: both slots counted, the decode one reserved."""
    ctl.bind_pair(p, d, uncached, uncached, now)
    p.in_flight += 1
    d.in_flight += 1


def test_a_both_backends_decode_limit_is_not_cut_by_the_prefill_legs_it_runs() -> None:
    """A `role: both` backend runs 6 prefill legs for others and 2 decodes; its decode
    latency is over the target because of those prefills. Its limit (4) counts the 2
    decodes, so it still takes a request, and the latency does not cut it: fewer decodes
    would not make its prefills cheaper. The same latency on a backend without prefill
    legs does cut its limit (the gradient at work)."""
    ctl = _pd_controller(limit=ConcurrencyLimit(initial=4, min=1))
    both = Endpoint(name="c", url="http://c")  # role both
    plain = Endpoint(name="c2", url="http://c2")
    decode = Endpoint(name="b", url="http://b", role="decode")
    for _ in range(6):
        _split(ctl, both, decode, 1000, 0.0)
    both.in_flight += 2  # two requests decoding there
    plain.in_flight = 2
    for t in range(6):  # 0.2 s per token (target 0.09) at 8 running
        for ep in (both, plain):
            running = 8 if ep is both else 2
            ep.metrics = MetricsSnapshot(time=float(t), num_running=running, num_waiting=0,
                                         generation_tokens=5.0 * running * t,
                                         itl_sum=0.2 * 10 * t, itl_count=10.0 * t)  # fmt: skip
            ctl.on_metrics(ep)
    assert ctl.limit_of(plain) < 4  # cut by the latency
    assert ctl.limit_of(both) == 4  # not cut: its latency is its prefills'
    assert ctl.can_take(both, 5.0)  # 8 in flight, 6 of them prefill legs: 2 < 4


def _measured(ctl: FlowController, p: Endpoint, d: Endpoint, tokens: int) -> float:
    """Run legs of `tokens` uncached tokens through `p`, one ending every 0.5 s with
    two in flight, for 20 s: its prefill rate is then known (~2 x tokens per second)."""
    t = 0.0
    _split(ctl, p, d, tokens, t)
    for _ in range(40):
        _split(ctl, p, d, tokens, t)
        t += 0.5
        p.in_flight -= 1
        ctl.on_done(p, True, now=t, prefill=tokens)
        ctl.decode_started(d)
    p.in_flight -= 1
    ctl.on_done(p, True, now=t, prefill=tokens)
    ctl.decode_started(d)
    rate = ctl.pd_load(p).rate()
    assert rate is not None
    return rate


def test_a_prefill_backend_with_waiting_prompts_takes_legs_within_the_bound() -> None:
    """A prefill-only engine with 20 prompts waiting (the aggregated rule, more than
    `queue_depth` waiting = full, would refuse it) takes prefill legs while the uncached
    tokens in flight there drain within `prefill_wait` (2 s) at its measured rate (about
    2,000 tokens/s), and refuses past that bound."""
    ctl = _pd_controller(max_wait=30.0)
    p = Endpoint(name="p", url="http://p", role="prefill")
    d = Endpoint(name="d", url="http://d", role="decode")
    rate = _measured(ctl, p, d, 1000)
    assert 1500 < rate < 2500
    assert ctl.prefill_wait == 2.0
    p.metrics = MetricsSnapshot(time=20.0, num_running=4, num_waiting=20, kv_cache_usage=0.3)
    assert not ctl.can_take(p, 20.0)  # the aggregated rule: its queue is "full"
    assert ctl.can_prefill(p, 20.0)  # nothing in flight
    for _ in range(3):  # 3,000 tokens: 1.5 s of work
        _split(ctl, p, d, 1000, 20.0)
    assert ctl.can_prefill(p, 20.0)
    for _ in range(3):  # 6,000 tokens: 3 s of work, over the 2 s bound
        _split(ctl, p, d, 1000, 20.0)
    assert not ctl.can_prefill(p, 20.0)
    # One leg ends: 5,000 tokens, still over; two more: 3,000, within.
    for _ in range(3):
        p.in_flight -= 1
        ctl.on_done(p, True, now=20.5, prefill=1000)
        ctl.decode_started(d)
        if _ == 0:
            assert not ctl.can_prefill(p, 20.5)
    assert ctl.can_prefill(p, 20.5)


def test_a_prefill_leg_limit_before_the_rate_is_known_and_max_in_flight() -> None:
    """Before its rate is measured a backend takes fewer prefill legs than the limit's
    `initial`; `max_in_flight` caps what it has in flight of any kind."""
    ctl = _pd_controller(limit=ConcurrencyLimit(initial=3))
    p = Endpoint(name="p", url="http://p", role="prefill")
    d = Endpoint(name="d", url="http://d", role="decode")
    for _ in range(3):
        assert ctl.can_prefill(p, 0.0)
        _split(ctl, p, d, 5000, 0.0)
    assert not ctl.can_prefill(p, 0.0)
    capped = _pd_controller(max_in_flight=2)
    q = Endpoint(name="q", url="http://q", role="prefill")
    _split(capped, q, d, 10, 0.0)
    assert capped.can_prefill(q, 0.0)
    _split(capped, q, d, 10, 0.0)
    assert not capped.can_prefill(q, 0.0)


def test_a_reserved_decode_slot_does_not_stop_the_limit_from_growing() -> None:
    """A decode backend at its limit (8), 5 of those slots reserved for pairs whose
    prefill still runs: the engine runs 3, with a latency well under the target. The limit
    grows: the 3 it runs are the evidence; without the reservations counted out it would
    wait for 0.8 x 8 running, which reserved slots never show."""
    lim = ConcurrencyLimiter(ConcurrencyLimit(initial=8))
    reserved_lim = ConcurrencyLimiter(ConcurrencyLimit(initial=8))
    for t in range(6):  # 0.01 s per token at 3 running
        m = MetricsSnapshot(time=float(t), num_running=3, num_waiting=0,
                            generation_tokens=300.0 * t)  # fmt: skip
        lim.on_metrics(m, 8)
        reserved_lim.on_metrics(m, 8, reserved=5)
    assert lim.value() == 8  # 3 running of 8: no evidence for more
    assert reserved_lim.value() > 8
