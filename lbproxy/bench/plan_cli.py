"""The options of `lbproxy plan` (lbproxy.bench.plan) and its run."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lbproxy.bench.cli import (
    _add_workload_args,
    _fail,
    _flow_config,
    _non_negative_int,
    _on_off,
    _positive,
    _tokenizer,
    _validated_flow,
    _workload,
)

_DEFAULTS = {"duration": 60.0, "drain": 120.0, "warmup": 20.0}
# A request that waited longer than this share of the SLO's TTFT would miss it anyway,
# so under the SLO it is better refused at once (4 s at the default 5 s, as the flow
# benchmarks run); lbproxy's own default (30 s) suits clients that prefer waiting.
MAX_WAIT_OF_SLO_TTFT = 0.8


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
    _add_flow_args(p)
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        default=2,
        help="best layouts whose card types are then split by count (default 2)",
    )
    p.add_argument(
        "--rounds",
        type=_non_negative_int,
        default=2,
        help="ascent rounds from the best layout, changing one card type per move and "
        "combining the improving moves of several types (default 2; 0: none)",
    )
    p.add_argument("--slo-ttft", type=_positive, default=5.0, help="SLO: TTFT, s (default 5)")
    p.add_argument("--slo-itl", type=_positive, default=0.1, help="SLO: ITL, s (default 0.1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress or table on the terminal")
    _add_workload_args(p)
    p.set_defaults(func=run_plan)


def _add_flow_args(p: argparse.ArgumentParser) -> None:
    """`lbproxy simulate`'s flow-control options, same spelling and default (on); only
    --max-wait's default differs (see MAX_WAIT_OF_SLO_TTFT). No --mix: one traffic class."""
    from lbproxy.config import FlowControl

    defaults = FlowControl()
    p.add_argument(
        "--flow-control",
        type=_on_off,
        default=True,
        metavar="on|off",
        help="flow control (default on, as lbproxy serves); the simulated proxy's setting",
    )
    p.add_argument(
        "--max-wait",
        type=_positive,
        default=None,
        help="flow control: seconds a request may wait (default "
        f"{MAX_WAIT_OF_SLO_TTFT:g} x --slo-ttft: 4 s at the default SLO)",
    )
    p.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=None,
        help=f"flow control: requests waiting per pool (default {defaults.max_queue})",
    )
    p.add_argument(
        "--flow-config",
        default=None,
        metavar="FILE",
        help="flow control settings: a YAML mapping of flow_control keys (or an lbproxy "
        "config, whose top-level flow_control is taken); --max-wait/--max-queue override",
    )
    p.set_defaults(mix=None)


def _plan_flow(args: argparse.Namespace) -> Any:
    """The simulated proxy's flow control (None: off); ValueError names the file and key."""
    if not args.flow_control:
        return None
    if args.max_wait is None and "max_wait" not in _flow_config(args):
        args.max_wait = round(MAX_WAIT_OF_SLO_TTFT * args.slo_ttft, 3)
    return _validated_flow(args)


def run_plan(args: argparse.Namespace) -> int:
    from lbproxy.bench.plan import PlanOptions, markdown, plan, write_plan
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
            flow=_plan_flow(args),
            slo_ttft=args.slo_ttft,
            slo_itl=args.slo_itl,
            refine=args.refine,
            rounds=args.rounds,
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
