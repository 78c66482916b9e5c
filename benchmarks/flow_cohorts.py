"""When requests are dispatched, end and are shed under overload, with and without the ramp.

Flow control refills a freed slot at once. Requests of one length that start together end
together, so an empty fleet filled at once turns into cohorts: every slot frees within
seconds, is refilled within seconds, and for the rest of a request's lifetime nothing
frees, so every arrival meanwhile is shed. The ramp (README "Flow control": a backend's
limit grows over one expected request lifetime while requests wait) fills the fleet
gradually instead. This runs one overload step of `lbproxy simulate` (the same fleet,
workload and settings as BENCHMARKS.md's ladder) twice: as lbproxy runs it, and with the
ramp switched off (`FlowController.ramp_time` returning None, nothing else changed), and
writes per-interval counts of dispatches, completions and 429s, plus the step's figures:

    python benchmarks/flow_cohorts.py --rate 85 --out benchmarks/results/flow/cohorts-85.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lbproxy.bench.simulate import FleetSimulator, SimOptions
from lbproxy.bench.stats import poisson_arrivals, summarize_step
from lbproxy.bench.workloads import make_workload
from lbproxy.config import FlowControl
from lbproxy.flow.controller import FlowController
from lbproxy.sim.fleet import load_fleet
from lbproxy.tokenization.tokenizer import default_tokenizer

FLEET = Path(__file__).resolve().parent.parent / "configs" / "fleets" / "abc-20.yaml"


def run(args: argparse.Namespace, ramp: bool) -> dict[str, Any]:
    tok = default_tokenizer()
    wl = make_workload("shared-prefix", tok)
    sim = FleetSimulator(
        load_fleet(FLEET),
        args.profile,
        tokenizer=tok,
        options=SimOptions(),
        flow=FlowControl(max_wait=args.max_wait),
    )
    original = FlowController.ramp_time
    if not ramp:
        FlowController.ramp_time = lambda self: None  # type: ignore[method-assign]
    try:
        arrivals = poisson_arrivals(args.rate, args.duration, SimOptions().seed)
        records = sim.run_step(wl, arrivals, first_index=0, deadline=args.duration + args.drain)
    finally:
        FlowController.ramp_time = original  # type: ignore[method-assign]
    step = summarize_step(records, rate=args.rate, duration=args.duration, warmup=args.warmup)
    w = args.interval
    n = int((args.duration + args.drain) // w) + 1
    dispatched, finished, shed = [0] * n, [0] * n, [0] * n
    for r in records:
        if r.status == "ok" and r.end is not None:
            dispatched[int((r.start + (r.queue_wait or 0.0)) // w)] += 1
            finished[int(r.end // w)] += 1
        elif r.status == "rejected":
            shed[int(r.start // w)] += 1
    keep = (
        "completed_output_tokens_per_s",
        "goodput_output_tokens_per_s",
        "slo_attainment",
        "rejected",
        "ttft_p50_s",
        "itl_p90_s",
        "prefix_cache_hit_rate",
    )
    return {
        "ramp": ramp,
        "step": {k: step[k] for k in keep},
        "interval_s": w,
        "dispatched": dispatched,
        "finished": finished,
        "shed": shed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=85.0)
    ap.add_argument("--profile", default="cache-aware-plus")
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=120.0)
    ap.add_argument("--drain", type=float, default=120.0)
    ap.add_argument("--max-wait", type=float, default=4.0)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = [run(args, ramp=True), run(args, ramp=False)]
    out = {"command": " ".join(sys.argv), "fleet": "configs/fleets/abc-20.yaml", "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in runs:
        s = r["step"]
        print(
            f"ramp {'on ' if r['ramp'] else 'off'}: completed "
            f"{s['completed_output_tokens_per_s']:,.0f} tok/s, goodput "
            f"{s['goodput_output_tokens_per_s']:,.0f} tok/s; dispatches per "
            f"{args.interval:g} s: {r['dispatched']}"
        )


if __name__ == "__main__":
    main()
