"""Do lbproxy's own scrapes and health checks time out when it is busy?

A cheap streaming backend (`paced_stream_backend.py`, its own process on uvloop, one port
per `--backends`) streams `--stream-chunks` SSE events per request, one every `--tick` s,
and answers a real vLLM `/metrics` page (55 KB) at once. Each lbproxy under test
(`--src LABEL=DIR`: the code in DIR, its own process, run in turns) sits in front of it
with the default scrape settings (every 0.25 s, timeout 0.2 s) and active health checks
every `--health-interval` s with timeout `--health-timeout`. `--concurrency` connections
of `stream_load_client.py` (raw sockets on uvloop, cheap like wrk; a unique prompt of
`--prompt-bytes` per request) stream through it for `--seconds`. Meanwhile this script
reads lbproxy's /metrics every second (scrape age) and, as a control, times the backend's
/metrics itself from a thread of its own: it shows whether the backend was slow.

Reported per lbproxy: scrape errors during the load (timeouts, since the backend answers
at once), successful scrapes, health-check errors and ejections, the worst and median
scrape age seen, streams completed per second, and the control's worst /metrics latency
and how many of its requests took longer than the scrape timeout.

    python benchmarks/signal_freshness.py --src old=/tmp/base --src new=. --seconds 15 \\
        --concurrency 32 --prompt-bytes 30000 --profile precise-cache-aware \\
        --tokenizer default --out benchmarks/results/freshness/precise-32.json
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
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from overhead import wait_up
from prometheus_client.parser import text_string_to_metric_families

BACKEND_PORT = 18911  # the first of --backends ports
PROXY_PORT = 18910
# A real vLLM 0.32 /metrics page (55 KB): what each scrape fetches and parses.
HERE = Path(__file__).resolve().parent
METRICS_PAGE = HERE.parent / "tests/fixtures/vllm-0.32-metrics.txt"
MODEL = "bench-model"
TOKEN = "bench-admin"
SCRAPE_TIMEOUT = 0.2  # lbproxy's default: 0.8 x the 0.25 s interval


def samples(text: str) -> dict[str, float]:
    """Sums over the backends of the samples we read; the worst scrape age."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("lbproxy_backend_ejections"):
                key = f"ejections_{s.labels.get('reason')}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name == "lbproxy_backend_scrape_age_seconds":
                out[s.name] = max(out.get(s.name, 0.0), s.value)
            elif s.name in ("lbproxy_backend_scrape_errors_total", "lbproxy_backend_scrapes_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def proxy_state(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{PROXY_PORT}/metrics") as r:
        page = samples(await r.text())
    async with session.get(
        f"http://127.0.0.1:{PROXY_PORT}/admin/backends",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        rows = (await r.json())["data"]
    errors = sorted({row["health"]["active"]["last_error"] for row in rows} - {None})
    return {"metrics": page, "health_errors": errors}


class DirectProbe:
    """Times GET /metrics on the backend from a thread with its own loop (the control)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        url = f"http://127.0.0.1:{BACKEND_PORT}/metrics"
        async with aiohttp.ClientSession() as s:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                    self.latencies.append(time.perf_counter() - t0)
                except (aiohttp.ClientError, TimeoutError):
                    self.failures += 1
                await asyncio.sleep(0.25)

    def __enter__(self) -> DirectProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def stream_load(args: argparse.Namespace) -> tuple[int, int]:
    """Streams through lbproxy for `args.seconds` from `stream_load_client.py` (its own
    process, raw sockets on uvloop: cheap, like wrk); returns (streams done, failures)."""
    client = HERE / "stream_load_client.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(client),
        str(PROXY_PORT),
        str(args.concurrency),
        str(args.seconds),
        str(args.prompt_bytes),
        MODEL,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    result = json.loads(out.decode().strip().splitlines()[-1])
    return result["done"], result["failed"]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(2.0)  # a few scrapes and health checks before the load
        before = await proxy_state(s)
        ages: list[float] = []

        async def sample_ages() -> None:
            while True:
                await asyncio.sleep(1.0)
                state = await proxy_state(s)
                ages.append(state["metrics"]["lbproxy_backend_scrape_age_seconds"])

        sampler = asyncio.create_task(sample_ages())
        t0 = time.perf_counter()
        with DirectProbe() as probe:
            done, failed = await stream_load(args)
        elapsed = time.perf_counter() - t0
        sampler.cancel()
        after = await proxy_state(s)

    b, a = before["metrics"], after["metrics"]
    lat = sorted(probe.latencies)
    return {
        "scrape_errors": a["lbproxy_backend_scrape_errors_total"]
        - b["lbproxy_backend_scrape_errors_total"],
        "scrapes": a["lbproxy_backend_scrapes_total"] - b["lbproxy_backend_scrapes_total"],
        "health_check_ejections": a.get("ejections_health_check", 0)
        - b.get("ejections_health_check", 0),
        "health_check_errors_seen": after["health_errors"],
        "scrape_age_max_s": max(ages) if ages else None,
        "scrape_age_median_s": statistics.median(ages) if ages else None,
        "streams_per_s": done / elapsed,
        "stream_failures": failed,
        "control_metrics_latency_max_s": lat[-1] if lat else None,
        "control_metrics_latency_p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "control_over_scrape_timeout": sum(x > SCRAPE_TIMEOUT for x in lat) + probe.failures,
        "control_requests": len(lat) + probe.failures,
    }


def run_one(args: argparse.Namespace, label: str, src: Path, config: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "lbproxy.cli", "--log-level", "error", "serve"]
    proxy = subprocess.Popen([*cmd, "--config", config, "--loop", args.loop], cwd=src, env=env)
    try:
        asyncio.run(wait_up(f"http://127.0.0.1:{PROXY_PORT}/health"))
        result = asyncio.run(measure(args))
    finally:
        proxy.terminate()
        proxy.wait(20)
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {"label": label, "src_commit": commit, **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--src", action="append", required=True, help="LABEL=DIR: an lbproxy checkout to run"
    )
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--stream-chunks", type=int, default=200, help="events per stream")
    ap.add_argument("--tick", type=float, default=0.002, help="s between events of a stream")
    ap.add_argument("--backends", type=int, default=8, help="backends (ports of one process)")
    ap.add_argument("--prompt-bytes", type=int, default=2000, help="unique prompt per request")
    ap.add_argument("--profile", default="cache-aware", help="routing profile of the pool")
    ap.add_argument("--tokenizer", help="the pool's tokenizer (precise-cache-aware)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all --src, in turns")
    ap.add_argument("--health-interval", type=float, default=0.5)
    ap.add_argument("--health-timeout", type=float, default=0.2)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    ap.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args()
    sources = [(s.split("=", 1)[0], Path(s.split("=", 1)[1]).resolve()) for s in args.src]

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        cfg.write(
            f"listen: {{host: 127.0.0.1, port: {PROXY_PORT}}}\n"
            f"admin: {{token: {TOKEN}}}\n"
            f"health: {{interval: {args.health_interval}, timeout: {args.health_timeout}}}\n"
            f"pools:\n  - name: bench\n    models: [{MODEL}]\n    routing: {args.profile}\n"
            + (f"    tokenizer: {args.tokenizer}\n" if args.tokenizer else "")
            + "    backends:\n"
        )
        for i in range(args.backends):
            cfg.write(f"      - {{url: 'http://127.0.0.1:{BACKEND_PORT + i}', name: b{i}}}\n")
    backend = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "paced_stream_backend.py"),
            str(BACKEND_PORT),
            str(args.backends),
            str(args.stream_chunks),
            str(METRICS_PAGE),
            str(args.tick),
        ]
    )
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(wait_up(f"http://127.0.0.1:{BACKEND_PORT}/health"))
        for _ in range(args.repeat):
            for label, src in sources:
                rows.append(run_one(args, label, src, cfg.name))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        backend.terminate()
        backend.wait(10)
        os.unlink(cfg.name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "loop": args.loop, "runs": rows}, indent=1)
        )

    print(
        f"\nsignal freshness: {args.backends} backends, {args.concurrency} streams x "
        f"{args.stream_chunks} chunks ({args.prompt_bytes} B unique prompts, {args.profile}) "
        f"for {args.seconds:g} s, event loop {args.loop}, scrape timeout {SCRAPE_TIMEOUT} s, "
        f"health timeout {args.health_timeout} s"
    )
    print(
        "| lbproxy | scrape errors | scrapes | health ejections | scrape age max s | "
        "streams/s | control /metrics max s | control > 0.2 s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['label']} ({r['src_commit']}) | {r['scrape_errors']:.0f} | {r['scrapes']:.0f} "
            f"| {r['health_check_ejections']:.0f} | {r['scrape_age_max_s']:.2f} "
            f"| {r['streams_per_s']:.1f} | {r['control_metrics_latency_max_s']:.3f} "
            f"| {r['control_over_scrape_timeout']}/{r['control_requests']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
