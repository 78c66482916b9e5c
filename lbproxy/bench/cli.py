"""`lbproxy bench` (live load generator) and `lbproxy simulate` (offline fleet simulator).

    lbproxy bench --target http://127.0.0.1:8080 --workload shared-prefix \\
        --rates 5,10,25,50,85 --duration 60 --label cache-aware --out runs/ca
    lbproxy bench --compare runs/rr runs/ca [--out runs/compare]   # default: runs/compare-rr-ca
    lbproxy simulate --fleet configs/fleets/abc-20.yaml --workload shared-prefix \\
        --profiles round-robin,cache-aware --rates 5,10,25,50,85 --out runs/sim
    lbproxy simulate --capacity --fleet configs/fleets/abc-20.yaml --workload shared-prefix \\
        --out runs/capacity

Both write results.json (schema in `lbproxy.bench.report`), results.md and PNG plots;
`--capacity` writes capacity.json and capacity.md (`lbproxy.bench.capacity`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lbproxy.bench.extra import require_bench_extra

# Before numpy is imported below: a runtime-only install gets one line, not a traceback.
require_bench_extra("bench and simulate")

from lbproxy.bench import report  # noqa: E402
from lbproxy.bench.mix import TrafficClass, parse_mix  # noqa: E402
from lbproxy.bench.workloads import (  # noqa: E402
    APIS,
    WORKLOAD_PARAMS,
    WORKLOADS,
    Workload,
    make_workload,
)
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer  # noqa: E402

DEFAULT_DURATION = 60.0  # seconds of arrivals per rate step

_PARAM_HELP = {
    "num_groups": "shared-prefix: system prompts (default 150)",
    "num_prompts_per_group": "shared-prefix: questions per system prompt (default 5)",
    "system_prompt_len": "shared-prefix / multi-turn: system prompt tokens (6000 / 1000)",
    "question_len": "shared-prefix / multi-turn: question tokens (1200 / 200)",
    "output_len": "tokens out per request, exact (ignore_eos) (default 1000; multi-turn 200)",
    "num_prompts": "diverse-prefix: distinct prompts (default 1000)",
    "prompt_len": "diverse-prefix: prompt tokens (default 7200)",
    "num_conversations": "multi-turn: conversations (default 64)",
    "turns": "multi-turn: turns per conversation (default 6)",
}


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rates must be numbers, e.g. 5,10,25; got {text!r}"
        ) from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {text!r}")
    return rates


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _mix(text: str) -> list[TrafficClass]:
    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _add_goodput_args(p: argparse.ArgumentParser, live: bool) -> None:
    from lbproxy.config import FlowControl

    defaults = FlowControl()
    where = (
        "with --fleet: lbproxy's setting; with --target: recorded only (set it in the "
        "target's config)"
        if live
        else "the simulated proxy's setting"
    )
    g = p.add_argument_group("SLO, flow control and traffic classes")
    g.add_argument(
        "--slo-ttft",
        type=_positive,
        default=5.0,
        help="SLO: time to first token, s, queue wait included (default 5)",
    )
    g.add_argument(
        "--slo-itl",
        type=_positive,
        default=0.1,
        help="SLO: mean inter-token latency of a request, s (default 0.1)",
    )
    g.add_argument(
        "--flow-control",
        type=_on_off,
        default=True,
        metavar="on|off",
        help=f"flow control (default on); {where}",
    )
    g.add_argument(
        "--max-wait",
        type=_positive,
        default=None,
        help=f"flow control: seconds a request may wait (default {defaults.max_wait:g})",
    )
    g.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=None,
        help=f"flow control: requests waiting per pool (default {defaults.max_queue})",
    )
    g.add_argument(
        "--flow-config",
        default=None,
        metavar="FILE",
        help="flow control settings: a YAML mapping of flow_control keys (or an lbproxy "
        "config, whose top-level flow_control is taken); --max-wait/--max-queue override",
    )
    g.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds at the start of each step whose arrivals are not counted, so that "
        "figures are of the steady state (default 0; with simulate --capacity: 600)",
    )
    g.add_argument(
        "--mix",
        type=_mix,
        default=None,
        metavar="NAME:SHARE[:PRIORITY],...",
        help="traffic classes sharing each step, e.g. light:1,heavy:5 or high:1:10,low:4; "
        "sent as the x-tenant and x-lbproxy-priority headers",
    )


def _validated_flow(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from lbproxy.config import FlowControl
    from lbproxy.config_errors import format_problems, validation_problems

    try:
        return FlowControl.model_validate(_flow_config(args))
    except ValidationError as e:
        source = args.flow_config or "flow control"
        raise ValueError(format_problems(source, validation_problems(e, FlowControl))) from None


def _goodput_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What results.json's settings record of the SLO, flow control and traffic classes."""
    mix = args.mix
    return {
        "slo_ttft_s": args.slo_ttft,
        "slo_itl_s": args.slo_itl,
        "warmup_s": args.warmup or 0.0,
        "flow_control": _flow_config(args),
        "mix": (
            [{"name": c.name, "share": c.share, "priority": c.priority} for c in mix]
            if mix
            else None
        ),
    }


def _flow_label(label: str, args: argparse.Namespace) -> str:
    """A run's default label says when flow control was off, so on/off compare clearly."""
    return label if args.flow_control else f"{label} (flow off)"


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=list(WORKLOADS), default="shared-prefix")
    g.add_argument(
        "--api",
        choices=APIS,
        default=None,
        help="completions or chat (default: completions; multi-turn: chat)",
    )
    names = sorted({n for ps in WORKLOAD_PARAMS.values() for n in ps})
    for name in names:
        g.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            dest=name,
            help=_PARAM_HELP.get(name),
        )
    g.add_argument(
        "--prompt-format",
        choices=("text", "ids"),
        default="text",
        help="completions prompts as text (default) or as token ids",
    )
    g.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json (default: the fleet's, else the shipped one)",
    )


def _add_ladder_args(
    p: argparse.ArgumentParser,
    required: bool,
    *,
    out_required: bool = True,
    out_help: str = "output directory",
) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--rates",
        type=_rates,
        required=required,
        help="comma-separated requests/s, one step each, e.g. 5,10,25,50,85",
    )
    g.add_argument(
        "--duration",
        type=_positive,
        default=None,
        help="seconds of arrivals per step (default 60; simulate --capacity: 1800)",
    )
    g.add_argument(
        "--drain",
        type=float,
        default=None,
        help="seconds after the arrivals before open requests are cut (default: --duration)",
    )
    g.add_argument("--max-requests", type=int, default=None, help="cap on requests per step")
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")


def configure_bench_parser(bench: argparse.ArgumentParser) -> None:
    """The options of `lbproxy bench` (its one-line help is in `lbproxy.cli`)."""
    bench.description = (
        "Poisson arrivals per rate step, streaming; writes results.json, "
        "results.md, throughput.png and ttft.png. With --compare, plots earlier runs together."
    )
    bench.add_argument("--target", help="base URL of the proxy or server")
    bench.add_argument(
        "--fleet",
        help="instead of --target: start this fleet of simulated servers and lbproxy "
        "(routing --profile) in this process, on ephemeral ports, and bench them",
    )
    bench.add_argument(
        "--speed",
        type=_positive,
        default=None,
        help="with --fleet: engine seconds per wall second (default: the fleet's); "
        "sets --time-scale",
    )
    bench.add_argument(
        "--stream-interval", type=int, default=None, help="with --fleet: tokens per SSE chunk"
    )
    bench.add_argument("--model", help="model name (default: the target's first /v1/models)")
    bench.add_argument("--label", help="run name in results and plots (default: --profile)")
    bench.add_argument(
        "--profile",
        default=None,
        help="the target's routing profile, recorded as the run's profile; with --fleet, "
        "the profile lbproxy routes with (default round-robin)",
    )
    bench.add_argument(
        "--time-scale",
        type=_positive,
        default=1.0,
        help="the target runs this many times faster than real time (a "
        "simulated fleet's speed); results are in target time",
    )
    bench.add_argument("--session-header", default="x-session-id")
    bench.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="draw the runs of these result directories on the same axes",
    )
    _add_workload_args(bench)
    _add_ladder_args(
        bench,
        required=False,
        out_required=False,
        out_help="output directory (required for a run; with --compare, default: "
        "compare-<input names> next to the first input)",
    )
    _add_goodput_args(bench, live=True)
    bench.set_defaults(func=run_bench)


def configure_simulate_parser(sim: argparse.ArgumentParser) -> None:
    """The options of `lbproxy simulate` (its one-line help is in `lbproxy.cli`)."""
    sim.description = (
        "Runs the engine model of every backend of a fleet in virtual time and "
        "routes each arrival with lbproxy's routing code; same outputs as bench."
    )
    sim.add_argument(
        "--fleet", required=True, help="fleet YAML, or a shipped fleet by name (abc-20, demo-3)"
    )
    sim.add_argument(
        "--profiles",
        default="round-robin,cache-aware",
        help="comma-separated routing profiles: built-in names, or YAML files "
        "holding a routing profile or an lbproxy config (first pool)",
    )
    sim.add_argument(
        "--scrape-interval",
        type=_positive,
        default=None,
        help="metrics scrape interval, virtual s (default: the proxy's)",
    )
    sim.add_argument(
        "--metrics-max-age",
        type=_positive,
        default=None,
        help="staleness limit of metrics (default: the proxy's)",
    )
    sim.add_argument(
        "--kv-event-delay",
        type=float,
        default=None,
        help="KV event delivery delay, virtual s (default 0.002)",
    )
    sim.add_argument(
        "--capacity",
        action="store_true",
        help="instead of a ladder: each card type of the fleet alone, saturated, on the "
        "workload; writes capacity.json (the fleet's capacity bound) and capacity.md",
    )
    _add_workload_args(sim)
    _add_ladder_args(sim, required=False)
    _add_goodput_args(sim, live=False)
    sim.set_defaults(func=run_simulate)


# ------------------------------------------------------------------------------ helpers
def _tokenizer(path: str | None) -> Tokenizer:
    return Tokenizer.from_file(path) if path else default_tokenizer()


def _workload(args: argparse.Namespace, tok: Tokenizer) -> Workload:
    params: dict[str, Any] = {"seed": args.seed}
    if args.api is not None:
        params["api"] = args.api
    for ps in WORKLOAD_PARAMS.values():
        for name in ps:
            v = getattr(args, name, None)
            if v is not None:
                params[name] = v
    return make_workload(args.workload, tok, params, prompt_format=args.prompt_format)


class _Progress:
    """A rich progress bar (stderr): one line per rate step."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, label: str, rate: float, total: int) -> Callable[[int], None]:
        bar = self.bar
        if bar is None:
            return lambda n: None
        task = bar.add_task(f"{label} @ {rate:g} req/s", total=total)
        return lambda n: bar.advance(task, n)


def _finish(args: argparse.Namespace, results: report.Results, started: float) -> int:
    paths = report.write_results(args.out, results, plots=not args.no_plots)
    if not args.quiet:
        print(report.markdown(results))
        print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.1f}s")
    return 0


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------ bench
def run_bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.compare:
        out = args.out or report.default_compare_dir(args.compare)
        try:
            results = report.compare(args.compare, out)
        except ValueError as e:
            return _fail(str(e))
        for warning in results["settings"].get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        if not args.quiet:
            print(report.markdown(results))
            print(f"wrote {out}")
        return 0
    if bool(args.target) == bool(args.fleet) or not args.rates:
        return _fail("bench needs --rates and one of --target or --fleet (or --compare DIR ...)")
    if not args.out:
        return _fail("bench needs --out DIR (where results.json, results.md and the plots go)")
    args.duration = args.duration or DEFAULT_DURATION
    if (bad := _bad_warmup(args)) is not None:
        return _fail(bad)
    try:
        tok = _tokenizer(args.tokenizer)
        wl = _workload(args, tok)
        return asyncio.run(_bench(args, wl, started))
    except ValueError as e:
        return _fail(str(e))


async def _bench(args: argparse.Namespace, wl: Workload, started: float) -> int:
    if not args.fleet:
        run, model = await _bench_target(args, wl, args.target, args.time_scale)
    else:
        from lbproxy.bench.loadgen import live_fleet
        from lbproxy.sim.fleet import load_fleet

        fleet = load_fleet(args.fleet)
        args.profile = args.profile or "round-robin"
        args.model = args.model or fleet.model
        speed = args.speed or fleet.backends[0].speed
        args.time_scale = speed
        async with live_fleet(
            fleet,
            args.profile,
            speed=speed,
            stream_interval=args.stream_interval,
            kv_events="precise" in args.profile,
            flow_control=_flow_config(args),
        ) as url:
            run, model = await _bench_target(args, wl, url, speed)
            run["target"] = f"{args.fleet} via lbproxy"
    settings = {
        "rates": args.rates,
        "duration_s": args.duration,
        "drain_s": args.duration if args.drain is None else args.drain,
        "max_requests": args.max_requests,
        "seed": args.seed,
        "time_scale": args.time_scale,
        "model": model,
        **_goodput_settings(args),
    }
    results = report.new_results("lbproxy bench", wl.describe(), settings, [run])
    return _finish(args, results, started)


def _flow_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `flow_control` settings of the run (the section of the lbproxy config that
    `bench --fleet` builds, the simulated proxy's for `simulate`); ValueError names the
    file and key when --flow-config is wrong."""
    flow: dict[str, Any] = {}
    if args.flow_config:
        data = yaml.safe_load(Path(args.flow_config).read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and isinstance(data.get("flow_control"), dict):
            data = data["flow_control"]
        if not isinstance(data, dict):
            raise ValueError(f"{args.flow_config}: expected a mapping of flow_control keys")
        flow.update(data)
    flow["enabled"] = args.flow_control
    if args.max_wait is not None:
        flow["max_wait"] = args.max_wait
    if args.max_queue is not None:
        flow["max_queue"] = args.max_queue
    if args.mix:
        from lbproxy.bench.mix import FLOW_HEADER

        flow["flow_header"] = FLOW_HEADER
    return flow


async def _bench_target(
    args: argparse.Namespace, wl: Workload, target: str, time_scale: float
) -> tuple[report.RunResult, str]:
    from lbproxy.bench.loadgen import LoadOptions, bench_run, discover_model, new_session

    session = new_session()
    try:
        model = args.model or await discover_model(session, target)
        opts = LoadOptions(
            target=target,
            model=model,
            duration=args.duration,
            drain=args.drain,
            time_scale=time_scale,
            max_requests=args.max_requests,
            seed=args.seed,
            session_header=args.session_header,
            slo_ttft=args.slo_ttft,
            slo_itl=args.slo_itl,
            warmup=args.warmup or 0.0,
            mix=args.mix,
        )
        profile = args.profile or "target"
        label = args.label or _flow_label(profile, args)
        with _Progress(not args.quiet) as progress:
            run = await bench_run(
                wl,
                args.rates,
                opts,
                profile=profile,
                label=label,
                progress=progress.step,
                session=session,
            )
    finally:
        await session.close()
    return run, model


# ------------------------------------------------------------------------------ simulate
def load_profile_arg(item: str) -> tuple[str, Any]:
    """A `--profiles` item: a built-in name, or a YAML file with a routing profile (a
    mapping of filters/scorers/picker, or an lbproxy config whose first pool's routing
    is taken). Returns (label, spec)."""
    path = Path(item)
    if not item.endswith((".yaml", ".yml")):
        return item, item
    from lbproxy.routing.profiles import ProfileSpec

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "pools" in data:
        data = data["pools"][0].get("routing", "round-robin")
    elif isinstance(data, dict) and "routing" in data:
        data = data["routing"]
    if isinstance(data, str):
        return data, data
    return path.stem, ProfileSpec.model_validate(data)


def _bad_warmup(args: argparse.Namespace) -> str | None:
    """The step-length check, made before anything runs (not after a long simulation)."""
    w = args.warmup or 0.0
    if not 0.0 <= w < args.duration:
        return f"--warmup must be within [0, --duration) = [0, {args.duration:g}), got {w:g}"
    return None


def run_simulate(args: argparse.Namespace) -> int:
    from lbproxy.bench.simulate import SimOptions, simulate_run
    from lbproxy.sim.fleet import load_fleet

    started = time.perf_counter()
    if args.capacity:
        return _run_capacity(args, started)
    if not args.rates:
        return _fail("simulate needs --rates (or --capacity)")
    args.duration = args.duration or DEFAULT_DURATION
    if (bad := _bad_warmup(args)) is not None:
        return _fail(bad)
    try:
        fleet = load_fleet(args.fleet)
        tok = _tokenizer(args.tokenizer or fleet.tokenizer)
        wl = _workload(args, tok)
        profiles = [load_profile_arg(p.strip()) for p in args.profiles.split(",") if p.strip()]
        if not profiles:
            return _fail("--profiles is empty")
        opts = SimOptions(seed=args.seed)
        if args.scrape_interval is not None:
            opts.scrape_interval = args.scrape_interval
        if args.metrics_max_age is not None:
            opts.metrics_max_age = args.metrics_max_age
        if args.kv_event_delay is not None:
            opts.kv_event_delay = args.kv_event_delay
        opts.__post_init__()
        flow = _validated_flow(args) if args.flow_control else None
        runs = []
        with _Progress(not args.quiet) as progress:
            for label, spec in profiles:
                runs.append(
                    simulate_run(
                        fleet,
                        wl,
                        spec,
                        args.rates,
                        duration=args.duration,
                        drain=args.drain,
                        max_requests=args.max_requests,
                        tokenizer=tok,
                        options=opts,
                        label=_flow_label(label, args),
                        target=str(args.fleet),
                        progress=progress.step,
                        flow=flow,
                        mix=args.mix,
                        slo_ttft=args.slo_ttft,
                        slo_itl=args.slo_itl,
                        warmup=args.warmup or 0.0,
                    )
                )
    except (ValueError, OSError) as e:
        return _fail(str(e))
    settings = {
        "rates": args.rates,
        "duration_s": args.duration,
        "drain_s": args.duration if args.drain is None else args.drain,
        "max_requests": args.max_requests,
        "seed": args.seed,
        "fleet": str(args.fleet),
        "model": fleet.model,
        "scrape_interval_s": opts.scrape_interval,
        "metrics_max_age_s": opts.metrics_max_age,
        "kv_event_delay_s": opts.kv_event_delay,
        **_goodput_settings(args),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    results = report.new_results("lbproxy simulate", wl.describe(), settings, runs)
    return _finish(args, results, started)


def _run_capacity(args: argparse.Namespace, started: float) -> int:
    from lbproxy.bench.capacity import CapacityOptions, capacity, markdown, write_capacity
    from lbproxy.sim.fleet import load_fleet

    try:
        fleet = load_fleet(args.fleet)
        tok = _tokenizer(args.tokenizer or fleet.tokenizer)
        wl = _workload(args, tok)
        opts = CapacityOptions(seed=args.seed)
        if args.duration is not None:
            opts.duration = args.duration
        if args.warmup is not None:
            opts.warmup = args.warmup
        opts.__post_init__()
        with _Progress(not args.quiet) as progress:
            result = capacity(
                fleet,
                wl,
                tok,
                opts,
                progress=lambda card, mode, rate, total: progress.step(
                    f"{card} {mode}", rate, total
                ),
            )
    except (ValueError, OSError) as e:
        return _fail(str(e))
    result["settings"]["fleet"] = str(args.fleet)
    result["settings"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    paths = write_capacity(args.out, result)
    if not args.quiet:
        print(markdown(result))
        print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m lbproxy.bench.cli bench ...`), as `lbproxy bench` /
    `lbproxy simulate` without the rest of lbproxy's CLI."""
    parser = argparse.ArgumentParser(prog="lbproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_bench_parser(sub.add_parser("bench"))
    configure_simulate_parser(sub.add_parser("simulate"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
