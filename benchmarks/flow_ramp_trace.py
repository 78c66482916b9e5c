"""The flow controller's ramp time at the start of each step of the abc-20 ladder.

The ramp (README "Flow control", **Ramp**) paces a backend's growth above its highest limit
over one expected request lifetime: what requests ask for x `target_itl`, or, when shorter,
the lifetime seen (the longer of the mean dispatch-to-end time of the requests that ended
and Little's law, requests in flight / requests ending per second, both over ~30 s). This
samples, every 2.5 s of a step's first `--window` seconds, the ramp time, the
requests in flight and waiting, and one vendor-b backend's limit, in `lbproxy simulate`'s
fleet simulator with the ladder's settings (BENCHMARKS.md, "The ladder"):

    python benchmarks/flow_ramp_trace.py --rates 5,10,25,50 \
        --out benchmarks/results/flow/ramp/trace-25-50.json
"""

from __future__ import annotations

import argparse
from typing import Any

from flow_placement import ladder_sim, write_result  # this folder's: same fleet and settings

from lbproxy.bench.stats import poisson_arrivals
from lbproxy.flow.controller import FlowController

SAMPLE = 2.5  # seconds between samples
WATCHED = "b-0"  # the backend whose limit is sampled


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sim, wl = ladder_sim(args.profile)
    watched = next(ep for ep in sim.endpoints if ep.name == WATCHED)
    steps: list[dict[str, Any]] = []
    state = {"t0": 0.0, "next": 0.0}
    on_metrics = FlowController.on_metrics

    def sample(self: FlowController, ep: Any) -> None:
        on_metrics(self, ep)
        t = sim.now - state["t0"]
        if ep is watched and t <= args.window and t >= state["next"]:
            state["next"] = t + SAMPLE
            steps[-1]["samples"].append(
                {
                    "t": round(t, 1),
                    "ramp_s": self.ramp_time(),
                    "in_flight": sum(e.in_flight for e in sim.endpoints),
                    "waiting": self.queue.size,
                    "limit": round(self.limiter(ep).limit, 1),
                }
            )

    FlowController.on_metrics = sample  # type: ignore[method-assign]
    try:
        index = 0
        for k, rate in enumerate(args.rates):
            arrivals = poisson_arrivals(
                rate, args.duration, sim.options.seed + k
            )  # as simulate_run
            state["t0"], state["next"] = sim.now, 0.0
            steps.append({"rate": rate, "samples": []})
            sim.run_step(wl, arrivals, first_index=index, deadline=args.duration + 120)
            index += len(arrivals)
            first = steps[-1]["samples"][:3]
            print(f"{rate:g} req/s: ramp {[s['ramp_s'] for s in first]} ...", flush=True)
    finally:
        FlowController.on_metrics = on_metrics  # type: ignore[method-assign]
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cache-aware-plus")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], required=True)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--window", type=float, default=60.0, help="seconds sampled per step")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    write_result(args.out, run(args))


if __name__ == "__main__":
    main()
