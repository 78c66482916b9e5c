"""Flow control for P/D split requests in `lbproxy simulate` (the same controller and the
same pair rule as the proxy, in virtual time): held and dispatched as a pair, both slots
counted from dispatch, shed as one, never half-dispatched."""

from __future__ import annotations

from lbproxy.bench.simulate import FleetSimulator
from lbproxy.bench.stats import poisson_arrivals
from lbproxy.config import FlowControl
from tests.test_sim_pd_simulate import TOK, _fleet, _workload

CAP = 2


class _Watched(FleetSimulator):
    """Records, after every engine step, the most requests each backend ever held."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.peak_in_flight = [0] * len(self.endpoints)
        self.peak_legs = [0] * len(self.endpoints)  # legs in its engine at once

    def _on_step(self, i: int, t: float) -> None:
        super()._on_step(i, t)
        legs = [0] * len(self.endpoints)
        for st in self._live.values():
            legs[st.ep] += 1
        for pd in self._prefills.values():
            legs[pd.p] += 1
        for k, ep in enumerate(self.endpoints):
            self.peak_in_flight[k] = max(self.peak_in_flight[k], ep.in_flight)
            self.peak_legs[k] = max(self.peak_legs[k], legs[k])


def test_pairs_are_held_dispatched_and_shed_as_one() -> None:
    flow = FlowControl(max_in_flight=CAP, max_wait=2.0)
    sim = _Watched(_fleet(min_prompt_tokens=0), "cache-aware", tokenizer=TOK, flow=flow)
    records = sim.run_step(_workload(output_len=64), poisson_arrivals(8.0, 20, 0),
                           first_index=0, deadline=200)  # fmt: skip
    ok = [r for r in records if r.status == "ok"]
    shed = [r for r in records if r.status == "rejected"]
    assert ok and shed, "the step must overload the pair capacity"
    assert len(ok) + len(shed) == len(records)
    assert all(r.backend is None for r in shed)  # sent nowhere
    assert sim.flow is not None and sum(sim.flow.shed_counts.values()) == len(shed)  # one each
    # Every dispatched pair ran both legs: one prefill and one decode per completion.
    assert sim.routed[0] == len(ok) == sim.routed[1] + sim.routed[2]
    assert sim.pd.reasons["split"] == len(records)
    # The decode slot is counted from dispatch: no backend ever held more than its cap,
    # counting legs still to come (a decode side's slot while its prefill runs).
    assert max(sim.peak_in_flight) <= CAP
    assert max(sim.peak_legs) <= CAP
    assert [ep.in_flight for ep in sim.endpoints] == [0, 0, 0]
    assert sim.engines[0].num_held == 0


def test_a_pair_waits_for_a_free_decode_side() -> None:
    """One decode backend of cap 1: a second split request waits (its prefill unsent)
    until the first one's decode ends, then runs; nothing is shed within max_wait."""
    fleet = _fleet(min_prompt_tokens=0)
    fleet = type(fleet)(fleet.model, fleet.backends[:2], fleet.tokenizer, fleet.source,
                        fleet.links, fleet.disaggregation)  # fmt: skip
    flow = FlowControl(max_in_flight=1, max_wait=60.0)
    sim = _Watched(fleet, "cache-aware", tokenizer=TOK, flow=flow)
    records = sim.run_step(_workload(output_len=64), [0.0, 0.01], first_index=0, deadline=120)
    a, b = records
    assert a.status == b.status == "ok"
    assert a.queue_wait == 0.0 and b.queue_wait > 0.5  # b waited for a's whole decode
    assert b.start + b.queue_wait >= a.end - 1e-9  # dispatched once a's decode ended
    assert sim.peak_legs == [1, 1]


def test_a_prefill_backends_limit_ignores_its_decode_latency() -> None:
    """A prefill-only backend generates one token per request: the decode-latency gradient
    would read a huge latency and cut its limit to the minimum. Its limit stays; the
    prompt tokens sent since its last scrape are still reset by a fresh one."""
    from lbproxy.flow.controller import FlowController
    from lbproxy.routing.state import Endpoint, MetricsSnapshot

    ctl = FlowController(FlowControl())
    pre = Endpoint(name="p", url="http://p", role="prefill")
    both = Endpoint(name="b", url="http://b")
    for t, generated in ((0.0, 0.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)):
        for ep in (pre, both):  # 8 running, ~2 tokens/s: 4 s per token each
            ep.in_flight = 8
            ep.metrics = MetricsSnapshot(time=t, num_running=8, num_waiting=0,
                                         generation_tokens=generated)  # fmt: skip
            ctl.limiter(ep).sent_tokens = 100
            ctl.on_metrics(ep)
    assert ctl.limit_of(both) < 16  # the gradient at work on a decoding backend
    assert ctl.limit_of(pre) == 16 and ctl.limiter(pre).sent_tokens == 0


def test_flow_control_keeps_up_with_no_flow_control_at_capacity_on_a_pd_fleet() -> None:
    """A quarter of the abc-20-pd fleet (a prefill backend, two decode, two `both`) at its
    capacity (6 req/s of long shared-prefix prompts): flow control completes as much as
    without it and meets the SLO as often. Holding split requests by the aggregated rules
    (prefill backends full at 5 prompts waiting, `both` backends' limits cut by the
    prefills they run for others, decode limits that never see their reserved slots run)
    completed ~30% less and shed a quarter of the requests."""
    from lbproxy.bench.simulate import simulate_run
    from lbproxy.bench.workloads import make_workload
    from lbproxy.sim.fleet import parse_fleet

    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "role": "prefill"},
        {"name": "b", "profile": "vendor-b", "port": 0, "role": "decode", "count": 2},
        {"name": "c", "profile": "vendor-c", "port": 0, "role": "both", "count": 2},
    ]})  # fmt: skip
    wl = make_workload("shared-prefix", TOK, {"seed": 0, "output_len": 300})
    steps = {}
    for name, flow in (("off", None), ("on", FlowControl(max_wait=4.0))):
        run = simulate_run(fleet, wl, "cache-aware", [6.0], duration=40, drain=40, warmup=10,
                           tokenizer=TOK, flow=flow)  # fmt: skip
        steps[name] = run["steps"][0]
    off, on = steps["off"], steps["on"]
    assert off["rejected"] == 0 and off["completed"] > 100
    done = "completed_output_tokens_per_s"
    assert on[done] >= 0.95 * off[done], (on[done], off[done])
    assert on["rejected"] <= 0.03 * on["requests"]
    assert on["slo_attainment"] >= off["slo_attainment"] - 0.05
