"""The options of `lbproxy plan` (lbproxy.bench.plan) and its run."""

from __future__ import annotations

import argparse
import sys
import time

from lbproxy.bench.cli import (
    _add_workload_args,
    _fail,
    _non_negative_int,
    _on_off,
    _positive,
    _tokenizer,
    _workload,
)

_DEFAULTS = {"duration": 60.0, "drain": 120.0, "warmup": 20.0}


def configure_plan_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "What-if planner: evaluates prefill/decode role layouts of a fleet (all "
        "aggregated; P/D splits by card type and count, cross-vendor ones marked) by "
        "offline simulation at one rate; writes plan.json, plan.md and plots."
    )
    p.add_argument("--fleet", required=True, help="fleet YAML, or a shipped fleet by name")
    p.add_argument("--rate", type=_positive, required=True, help="offered requests/s")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--duration",
        type=_positive,
        default=_DEFAULTS["duration"],
        help="virtual seconds of arrivals per candidate (default 60)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=_DEFAULTS["drain"],
        help="virtual seconds after the arrivals for requests to finish (default 120)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=_DEFAULTS["warmup"],
        help="first seconds of arrivals not counted (default 20)",
    )
    p.add_argument(
        "--routing",
        default="cache-aware",
        help="the pool's routing profile for aggregated requests (default cache-aware)",
    )
    p.add_argument(
        "--min-prompt-tokens",
        type=_non_negative_int,
        default=None,
        help="disaggregation.min_prompt_tokens (default: the fleet's, else 512)",
    )
    p.add_argument(
        "--flow-control",
        type=_on_off,
        default=False,
        metavar="on|off",
        help="simulate lbproxy's flow control with its defaults (default off: routing alone)",
    )
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        default=2,
        help="best layouts whose card types are then split by count (default 2)",
    )
    p.add_argument("--slo-ttft", type=_positive, default=5.0, help="SLO: TTFT, s (default 5)")
    p.add_argument("--slo-itl", type=_positive, default=0.1, help="SLO: ITL, s (default 0.1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress or table on the terminal")
    _add_workload_args(p)
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from lbproxy.bench.plan import PlanOptions, markdown, plan, write_plan
    from lbproxy.config import FlowControl
    from lbproxy.sim.fleet import load_fleet

    started = time.perf_counter()
    try:
        fleet = load_fleet(args.fleet)
        tok = _tokenizer(args.tokenizer or fleet.tokenizer)
        wl = _workload(args, tok)
        opts = PlanOptions(
            rate=args.rate,
            duration=args.duration,
            drain=args.drain,
            warmup=args.warmup,
            profile=args.routing,
            min_prompt_tokens=args.min_prompt_tokens,
            flow=FlowControl() if args.flow_control else None,
            slo_ttft=args.slo_ttft,
            slo_itl=args.slo_itl,
            refine=args.refine,
            seed=args.seed,
        )

        def progress(n: int, summary: str) -> None:
            if not args.quiet:
                t = time.perf_counter() - started
                print(f"[{t:6.0f} s] candidate {n}: {summary}", file=sys.stderr, flush=True)

        result, runs = plan(fleet, wl, tok, opts, progress)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    result["settings"]["fleet"] = str(args.fleet)
    paths = write_plan(args.out, result, runs, plots=not args.no_plots)
    if not args.quiet:
        print(markdown(result))
        print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.1f}s")
    return 0
