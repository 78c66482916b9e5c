"""`lbproxy demo`: a simulated heterogeneous fleet with lbproxy in front, in one process.

Without arguments it serves until Ctrl-C and prints how to talk to it. With
`--workload` it instead plays a short shared-prefix load through round-robin and
cache-aware routing in turn (each on a fresh, cold fleet) and prints them side by side:
in virtual time (the offline simulator: the same engine model and lbproxy's routing
code, no wall clock), so the figures do not depend on how busy this machine is.
`--workload --out DIR` also writes DIR/results.json (with the command that made it);
`--table DIR` prints the table again from that file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from lbproxy.config import parse_config
from lbproxy.event_loop import run_loop
from lbproxy.proxy.app import start_proxy
from lbproxy.sim.fleet import FleetSpec, parse_fleet, start_fleet

# The embedded default: one backend of each hardware profile, on ephemeral ports, each
# publishing KV-cache events (so precise-prefix routing works too).
DEMO_FLEET: dict[str, Any] = {
    "model": "granite-4.1-8b",
    "speed": 1.0,
    "backends": [
        {"name": "sim-a", "profile": "vendor-a", "port": 0, "kv_events": "tcp://127.0.0.1:*"},
        {"name": "sim-b", "profile": "vendor-b", "port": 0, "kv_events": "tcp://127.0.0.1:*"},
        {"name": "sim-c", "profile": "vendor-c", "port": 0, "kv_events": "tcp://127.0.0.1:*"},
    ],
}

WORKLOAD_PROFILES = ("round-robin", "cache-aware")


def demo_fleet(speed: float = 1.0) -> FleetSpec:
    fleet = parse_fleet(DEMO_FLEET, "<embedded demo fleet>")
    backends = tuple(dataclasses.replace(b, speed=speed) for b in fleet.backends)
    return dataclasses.replace(fleet, backends=backends)


def _banner(url: str, model: str, routing: str, backends: list[tuple[str, str, str]]) -> str:
    rows = "\n".join(f"    {name:8} {vendor:9} {burl}" for name, vendor, burl in backends)
    # Every command pastes into bash as is: the JSON body stays on one line inside its
    # quotes (a backslash there would be sent as part of the body).
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        '"max_tokens": 32}'
    )
    return f"""
lbproxy demo: {len(backends)} simulated vLLM backends behind lbproxy (routing: {routing})
{rows}

  OpenAI base URL:  {url}/v1      model: {model}
  Dashboard:        {url}/dashboard

  curl {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{body}'

  Python, with the openai package:
  pip install openai
  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); \\
print(c.completions.create(model='{model}', prompt='Hello', max_tokens=16).choices[0].text)"

  Which backend served a request: response header x-lbproxy-backend.
  Backend state: {url}/ready ; each backend's vLLM metrics: <backend url>/metrics
  Ctrl-C to stop.
""".rstrip()


async def serve_demo(host: str, port: int, routing: str, speed: float) -> None:
    fleet = demo_fleet(speed)
    handles = await start_fleet(fleet)
    try:
        backends = []
        for spec, h in zip(fleet.backends, handles, strict=True):
            entry: dict[str, Any] = {"url": h.url, "name": spec.name, "vendor": spec.profile.name}
            if h.kv_events_endpoint:
                entry["kv_events"] = {
                    "endpoint": h.kv_events_endpoint,
                    "topic": spec.kv_events_topic,
                    "mode": "connect",  # the simulator bound it; lbproxy connects
                }
            backends.append(entry)
        cfg = parse_config(
            {
                "listen": {"host": host, "port": port},
                "pools": [
                    {
                        "name": "demo",
                        "models": [fleet.model],
                        "routing": routing,
                        "tokenizer": "default",
                        "backends": backends,
                    }
                ],
                "expose_backend_header": True,
            },
            "<demo>",
        )
        proxy = await start_proxy(cfg)
        try:
            rows = [(b["name"], b["vendor"], b["url"]) for b in backends]
            print(_banner(proxy.url, fleet.model, routing, rows), flush=True)
            await asyncio.Event().wait()
        finally:
            await proxy.close()
    finally:
        for h in handles:
            await h.close()


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The options of `lbproxy demo` (its one-line help is in `lbproxy.cli`)."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="lbproxy's port (0: any free one)")
    p.add_argument("--routing", default="cache-aware", help="routing profile (serve mode)")
    p.add_argument(
        "--speed",
        type=float,
        default=None,
        help="simulated time per wall second (default 1; not with --workload)",
    )
    p.add_argument(
        "--workload",
        action="store_true",
        help="drive a short shared-prefix load through each profile, print a table",
    )
    p.add_argument(
        "--profiles",
        default=",".join(WORKLOAD_PROFILES),
        help="--workload: routing profiles to compare",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="--workload: also write DIR/results.json and results.md",
    )
    p.add_argument(
        "--table",
        default=None,
        metavar="PATH",
        help="print the --workload table from a results.json it wrote (or its directory)",
    )
    p.add_argument("--rate", type=float, default=8.0, help="--workload: requests/s")
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="--workload: seconds of arrivals per profile (virtual time)",
    )
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.table is not None:
        return print_table(args.table)
    if args.out is not None and not args.workload:
        print("lbproxy demo: --out is for --workload", file=sys.stderr)
        return 2
    if args.workload:
        if args.speed is not None:
            print(
                "lbproxy demo: --speed is for the served demo; --workload runs in virtual time",
                file=sys.stderr,
            )
            return 2
        profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
        return run_workload_demo(profiles, rate=args.rate, duration=args.duration, out=args.out)
    try:
        run_loop(serve_demo(args.host, args.port, args.routing, args.speed or 1.0))
    except KeyboardInterrupt:
        print("\nlbproxy demo stopped.", file=sys.stderr)
    except OSError as e:
        print(f"lbproxy demo: {e} (try --port 0)", file=sys.stderr)
        return 2
    return 0


def run_workload_demo(
    profiles: list[str], *, rate: float, duration: float, out: str | None = None
) -> int:
    """Each profile on a fresh demo fleet under the same shared-prefix load, in virtual
    time (flow control on, as `lbproxy serve` runs by default); one table. With `out`,
    the runs also go to out/results.json (lbproxy.bench.report's schema)."""
    from lbproxy.bench.extra import require_bench_extra

    require_bench_extra("demo --workload")
    from lbproxy.bench import report
    from lbproxy.bench.simulate import simulate_run
    from lbproxy.bench.workloads import shared_prefix
    from lbproxy.config import FlowControl
    from lbproxy.tokenization.tokenizer import default_tokenizer

    if not profiles:
        print("lbproxy demo: --profiles is empty", file=sys.stderr)
        return 2
    fleet = demo_fleet()
    tokenizer = default_tokenizer()
    workload = shared_prefix(
        tokenizer,
        num_groups=8,
        num_prompts_per_group=40,
        system_prompt_len=1800,
        question_len=200,
        output_len=100,
        seed=0,
    )
    print(
        f"lbproxy demo --workload: shared-prefix (8 groups, 1,800-token system prompt + "
        f"200-token question, 100 tokens out), {rate:g} req/s for {duration:g} s on 3 "
        "simulated backends (vendor-a, -b, -c), each profile on a fresh fleet; in virtual "
        "time (simulated engines, lbproxy's routing), so this machine's load does not "
        "change the figures.",
        flush=True,
    )
    runs = []
    for profile in profiles:
        try:
            run = simulate_run(
                fleet,
                workload,
                profile,
                [rate],
                duration=duration,
                tokenizer=tokenizer,
                flow=FlowControl(),
            )
        except ValueError as e:
            print(f"lbproxy demo: {profile}: {e}", file=sys.stderr)
            return 2
        runs.append(run)
    results = report.new_results(
        "lbproxy demo --workload",
        workload.describe(),
        {
            "command": _command(profiles, rate, duration, out),
            "rates": [rate],
            "duration_s": duration,
            "fleet": "<embedded demo fleet>",
            "model": fleet.model,
            "flow_control": {"enabled": True},
        },
        runs,
    )
    print(workload_table(results), flush=True)
    if out is not None:
        try:
            paths = report.write_results(out, results, plots=False)
        except OSError as e:
            print(f"lbproxy demo: --out {out}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
    return 0


def _command(profiles: list[str], rate: float, duration: float, out: str | None) -> str:
    """The command line that makes these results, for their file."""
    words = ["lbproxy", "demo", "--workload", "--profiles", ",".join(profiles)]
    words += ["--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    if out is not None:
        words += ["--out", out]
    return shlex.join(words)


def print_table(path: str) -> int:
    """`--table`: the --workload table of a results.json written by `--workload --out`."""
    from lbproxy.bench.report import load_results

    try:
        results = load_results(path)
    except ValueError as e:
        print(f"lbproxy demo: --table: {e}", file=sys.stderr)
        return 2
    if results["tool"] != "lbproxy demo --workload":
        print(
            f"lbproxy demo: --table: {Path(path)}: written by {results['tool']!r}, "
            "not by `lbproxy demo --workload --out`",
            file=sys.stderr,
        )
        return 2
    command = results["settings"].get("command")
    if command:
        print(f"```bash\n{command}\n```\n")
    print(workload_table(results), flush=True)
    return 0


def workload_table(results: Any) -> str:
    """The markdown table of a `--workload` results object: one row per profile."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:,.0f} ms"

    head = (
        "| profile | req/s | output tok/s | TTFT p50 | TTFT p90 | ITL p50 | "
        "prefix-cache hits | requests per backend | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    lines = [head]
    for run in results["runs"]:
        profile, s = run["profile"], run["steps"][0]
        hit = s.get("prefix_cache_hit_rate")
        per_backend = ", ".join(f"{k} {v}" for k, v in sorted(s.get("backends", {}).items()))
        lines.append(
            f"| {profile} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:,.0f} | "
            f"{ms(s['ttft_p50_s'])} | {ms(s['ttft_p90_s'])} | {ms(s['itl_p50_s'])} | "
            f"{'-' if hit is None else f'{hit:.0%}'} | {per_backend} | {s['errors']} |"
        )
    return "\n".join(lines)
