"""What lbproxy costs on the data path: the same load straight to a backend and through it.

A minimal OpenAI-style backend (its own process) answers at once, so the proxy's cost is
not hidden behind model time. The load generator (this process) runs a fixed number of
requests at a fixed concurrency, first direct, then through lbproxy (its own process),
and reports requests/s, p50/p99 latency and what lbproxy added, and lbproxy's CPU time
per request read from /proc. Repeated `--repeat` times; medians are reported.

    python benchmarks/overhead.py --requests 3000 --concurrency 32 --repeat 3
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

import aiohttp

HERE = Path(__file__).resolve().parent
BACKEND_PORT = 18901
PROXY_PORT = 18900
MODEL = "bench-model"

BACKEND_CODE = r"""
import sys, orjson
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
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(N_STREAM):
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def run_case(args: argparse.Namespace, stream: bool, proxy_pid: int) -> dict[str, float]:
    direct = f"http://127.0.0.1:{BACKEND_PORT}/v1/completions"
    via = f"http://127.0.0.1:{PROXY_PORT}/v1/completions"
    await load(via, 200, args.concurrency, stream)  # warm-up: connections, caches
    rows = []
    for _ in range(args.repeat):
        rps_d, lat_d = await load(direct, args.requests, args.concurrency, stream)
        cpu0 = cpu_seconds(proxy_pid)
        rps_p, lat_p = await load(via, args.requests, args.concurrency, stream)
        cpu = cpu_seconds(proxy_pid) - cpu0
        rows.append(
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
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stream-chunks", type=int, default=500)
    ap.add_argument("--profile", default="round-robin", help="routing profile of the pool")
    ap.add_argument("--uvloop", action="store_true", help="run lbproxy under uvloop")
    args = ap.parse_args()

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        cfg.write(
            f"listen: {{host: 127.0.0.1, port: {PROXY_PORT}}}\n"
            f"pools:\n  - name: bench\n    models: [{MODEL}]\n    routing: {args.profile}\n"
            f"    backends:\n      - {{url: 'http://127.0.0.1:{BACKEND_PORT}'}}\n"
        )
    backend = subprocess.Popen(
        [sys.executable, "-c", BACKEND_CODE, str(BACKEND_PORT), str(args.stream_chunks)]
    )
    proxy_cmd = [
        sys.executable,
        "-m",
        "lbproxy.cli",
        "--log-level",
        "warning",
        "serve",
        "--config",
        cfg.name,
        "--loop",
        "uvloop" if args.uvloop else "asyncio",
    ]
    proxy = subprocess.Popen(proxy_cmd)
    try:
        asyncio.run(wait_up(f"http://127.0.0.1:{BACKEND_PORT}/health"))
        asyncio.run(wait_up(f"http://127.0.0.1:{PROXY_PORT}/health"))
        results = {}
        for name, stream in (("non-stream", False), (f"stream x{args.stream_chunks}", True)):
            n = args.requests if not stream else max(args.requests // 10, 100)
            sub = argparse.Namespace(**{**vars(args), "requests": n})
            results[name] = asyncio.run(run_case(sub, stream, proxy.pid))
            results[name]["requests"] = n
    finally:
        proxy.terminate()
        backend.terminate()
        proxy.wait(10)
        backend.wait(10)
        os.unlink(cfg.name)

    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"\nlbproxy overhead, {args.concurrency} concurrent, profile {args.profile}, "
        f"event loop {loop}, median of {args.repeat}"
    )
    print(
        "| case | requests | direct req/s | via lbproxy req/s | ratio | added p50 ms | "
        "added p99 ms | lbproxy CPU ms/request |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {int(r['requests'])} | {r['direct_rps']:.0f} | {r['proxy_rps']:.0f} | "
            f"{r['proxy_rps'] / r['direct_rps']:.2f} | "
            f"{r['proxy_p50_ms'] - r['direct_p50_ms']:.2f} | "
            f"{r['proxy_p99_ms'] - r['direct_p99_ms']:.2f} | {r['cpu_ms_per_request']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
