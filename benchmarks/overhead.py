"""What lbproxy costs on the data path: the same load straight to a backend and through it.

A minimal OpenAI-style backend (its own process) answers at once, so the proxy's cost is
not hidden behind model time. The load generator (this process) runs a fixed number of
requests at a fixed concurrency, first direct, then through lbproxy (its own process),
and reports requests/s, p50/p99 latency and what lbproxy added, and lbproxy's CPU time
per request read from /proc. Repeated `--repeat` times; medians are reported.

    python benchmarks/overhead.py --requests 3000 --concurrency 32 --repeat 3

`--flow-control both` runs two lbproxy processes, flow control on and off, and measures
them in turns in the same run (direct, on, off, per repeat); `--out FILE` writes the rows
and medians as JSON, with the command line, the commit of this checkout (lbproxy is
started from it), the date and the machine's load averages before and after.
`--table FILE [FILE ...]` prints the markdown table of result files (one row per case
and file), without running anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
BACKEND_PORT = 18901
PROXY_PORT = 18900
PROXY_PORT_OFF = 18902  # the second proxy of --flow-control both
MODEL = "bench-model"

BACKEND_CODE = r"""
import asyncio, sys, orjson
from aiohttp import web
N_STREAM = int(sys.argv[2])
CHUNK = b"data: " + orjson.dumps({"id": "c", "object": "text_completion", "created": 1,
    "model": "bench-model",
    "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}) + b"\n\n"
FULL = orjson.dumps({"id": "c", "object": "text_completion", "created": 1, "model": "bench-model",
    "choices": [{"index": 0, "text": " tok" * 16, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}})
async def completions(request):
    body = await request.read()
    if b'"stream": true' in body or b'"stream":true' in body:
        # x-chunks / x-pace-ms (benchmarks/dataplane_cost.py): chunk count, pause per chunk
        n = int(request.headers.get("x-chunks", N_STREAM))
        pace = float(request.headers.get("x-pace-ms", 0)) / 1e3
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            if pace:
                await asyncio.sleep(pace)
            await resp.write(CHUNK)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.Response(body=FULL, content_type="application/json")
async def health(request):
    return web.Response()
app = web.Application()
app.router.add_post("/v1/completions", completions)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


async def wait_up(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def load(
    url: str, requests: int, concurrency: int, stream: bool
) -> tuple[float, list[float]]:
    body = json.dumps({"model": MODEL, "prompt": "x" * 2000, "max_tokens": 16, "stream": stream})
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in queue:
            t0 = time.perf_counter()
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as r:
                async for _chunk in r.content.iter_any():
                    pass
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return requests / elapsed, latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run_case(
    args: argparse.Namespace, stream: bool, proxies: list[tuple[str, int, int]]
) -> dict[str, dict[str, float]]:
    """proxies: (label, port, pid). Per repeat: direct, then each proxy in turn."""
    direct = f"http://127.0.0.1:{BACKEND_PORT}/v1/completions"
    for _label, port, _pid in proxies:  # warm-up: connections, caches, learnt limits
        await load(f"http://127.0.0.1:{port}/v1/completions", 200, args.concurrency, stream)
    rows: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in proxies}
    for _ in range(args.repeat):
        rps_d, lat_d = await load(direct, args.requests, args.concurrency, stream)
        for label, port, pid in proxies:
            via = f"http://127.0.0.1:{port}/v1/completions"
            cpu0 = cpu_seconds(pid)
            rps_p, lat_p = await load(via, args.requests, args.concurrency, stream)
            cpu = cpu_seconds(pid) - cpu0
            rows[label].append(
                {
                    "direct_rps": rps_d,
                    "proxy_rps": rps_p,
                    "direct_p50_ms": pct(lat_d, 50) * 1e3,
                    "proxy_p50_ms": pct(lat_p, 50) * 1e3,
                    "direct_p99_ms": pct(lat_d, 99) * 1e3,
                    "proxy_p99_ms": pct(lat_p, 99) * 1e3,
                    "cpu_ms_per_request": cpu / args.requests * 1e3,
                }
            )
    return {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}  # type: ignore[dict-item]
        for label, rs in rows.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stream-chunks", type=int, default=500)
    ap.add_argument("--profile", default="round-robin", help="routing profile of the pool")
    ap.add_argument("--uvloop", action="store_true", help="run lbproxy under uvloop")
    ap.add_argument(
        "--flow-control",
        choices=("on", "off", "both"),
        default="on",
        help="flow control of the pool (both: two proxies measured in turns)",
    )
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--table", nargs="+", metavar="FILE", help="print the table of result files")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return 0

    modes = ["on", "off"] if args.flow_control == "both" else [args.flow_control]
    cfgs: list[tuple[str, int, str]] = []
    for mode, port in zip(modes, (PROXY_PORT, PROXY_PORT_OFF), strict=False):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
            cfg.write(
                f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                f"flow_control: {{enabled: {'true' if mode == 'on' else 'false'}}}\n"
                f"pools:\n  - name: bench\n    models: [{MODEL}]\n    routing: {args.profile}\n"
                f"    backends:\n      - {{url: 'http://127.0.0.1:{BACKEND_PORT}'}}\n"
            )
        cfgs.append((f"flow {mode}", port, cfg.name))
    backend = subprocess.Popen(
        [sys.executable, "-c", BACKEND_CODE, str(BACKEND_PORT), str(args.stream_chunks)]
    )
    loop_name = "uvloop" if args.uvloop else "asyncio"
    serve = [sys.executable, "-m", "lbproxy.cli", "--log-level", "warning", "serve"]
    procs = [
        subprocess.Popen([*serve, "--config", path, "--loop", loop_name])
        for _label, _port, path in cfgs
    ]
    results: dict[str, dict[str, dict[str, float]]] = {}
    load_before = os.getloadavg()
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        asyncio.run(wait_up(f"http://127.0.0.1:{BACKEND_PORT}/health"))
        for _label, port, _path in cfgs:
            asyncio.run(wait_up(f"http://127.0.0.1:{port}/health"))
        proxies = [(label, port, p.pid) for (label, port, _), p in zip(cfgs, procs, strict=True)]
        for name, stream in (("non-stream", False), (f"stream x{args.stream_chunks}", True)):
            n = args.requests if not stream else max(args.requests // 10, 100)
            sub = argparse.Namespace(**{**vars(args), "requests": n})
            for label, r in asyncio.run(run_case(sub, stream, proxies)).items():
                r["requests"] = n
                results[f"{name}, {label}"] = r
    finally:
        for p in (*procs, backend):
            p.terminate()
        for p in (*procs, backend):
            p.wait(10)
        for _label, _port, path in cfgs:
            os.unlink(path)
    result = {
        "command": "python " + " ".join(sys.argv),
        "commit": checkout_commit(),
        "date": date,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "stream_chunks": args.stream_chunks,
            "profile": args.profile,
            "event_loop": loop_name,
            "flow_control": args.flow_control,
        },
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(render([(args.out or "(this run)", result)]))
    return 0


def checkout_commit() -> str:
    """The commit of this checkout ("+dirty" if lbproxy/ has changes)."""

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", str(HERE.parent), *cmd], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lbproxy")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def table(paths: list[str]) -> str:
    return render([(p, json.loads(Path(p).read_text())) for p in paths])


def settings_from_command(command: str) -> dict[str, str]:
    """Profile and event loop of a file written before settings were recorded."""
    words = command.split()
    profile = words[words.index("--profile") + 1] if "--profile" in words else "round-robin"
    return {"profile": profile, "event_loop": "uvloop" if "--uvloop" in words else "asyncio"}


def render(files: list[tuple[str, dict[str, Any]]]) -> str:
    """One header line per file (what ran, when, at what load), then one table row per
    case and file. Files written before the settings were recorded show what they have."""
    lines = []
    for path, f in files:
        st = f.get("settings", {})
        load = f.get("load_before"), f.get("load_after")
        lines.append(
            f"{path}: {f.get('command', '?')}; commit {f.get('commit', '?')}, "
            f"{f.get('date', '?')}"
            + (f", 1-min load {load[0][0]:.2f} -> {load[1][0]:.2f}" if all(load) else "")
            + (f"; median of {st['repeat']}" if "repeat" in st else "")
        )
    lines += [
        "",
        "| case | profile | event loop | requests | direct req/s | via lbproxy req/s | ratio | "
        "added p50 ms | added p99 ms | lbproxy CPU ms/request |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _path, f in files:
        st = f.get("settings") or settings_from_command(f.get("command", ""))
        for name, r in f["results"].items():
            lines.append(
                f"| {name} | {st.get('profile', '?')} | {st.get('event_loop', '?')} | "
                f"{int(r['requests'])} | {r['direct_rps']:.0f} | {r['proxy_rps']:.0f} | "
                f"{r['proxy_rps'] / r['direct_rps']:.2f} | "
                f"{r['proxy_p50_ms'] - r['direct_p50_ms']:.2f} | "
                f"{r['proxy_p99_ms'] - r['direct_p99_ms']:.2f} | {r['cpu_ms_per_request']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
