"""Several lbproxy processes: prefix-cache hits across replicas, and `serve --workers`.

`hits`: four simulated vLLM servers (`lbproxy sim`'s engine, in this process, faster
than real time) and a shared-prefix workload (inference-perf's shape, smaller). The
requests are sent in a fixed shuffled order at a fixed concurrency, to one lbproxy
replica, or alternating between two: with independent state, and sharing state through a
real redis-server; and once more sharing, with Redis killed for the middle third of the
run and started again (empty) for the last third. The hit rate is the backends' own
prefix-cache counters (hits / queries, in tokens), not lbproxy's estimate.

    python benchmarks/replicas.py hits --out benchmarks/results/replicas/hits.json

`workers`: `lbproxy serve --workers 2` against `--workers 1` through the same fast mock
backend as benchmarks/overhead.py (imported from it): non-stream requests/s and lbproxy's
CPU time per request (all its processes, from /proc), cases measured in turns.

    python benchmarks/replicas.py workers --out benchmarks/results/replicas/workers.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's lbproxy, in-process as in the workers
import overhead  # noqa: E402  (benchmarks/overhead.py: the mock backend and load loop)

from tests.replicas_support import RedisServer as Redis  # noqa: E402  (one way to run it)

MODEL = "granite-4.1-8b"


# ------------------------------------------------------------------------------- hits
async def _hits_case(
    args: argparse.Namespace, replicas: int, redis: Redis | None, outage: bool
) -> dict[str, Any]:
    from lbproxy.bench.workloads import shared_prefix
    from lbproxy.config import parse_config
    from lbproxy.proxy.app import start_proxy
    from lbproxy.sim.server import start_sim_server
    from lbproxy.tokenization import default_tokenizer

    sims = [
        await start_sim_server(profile="vendor-b", model=MODEL, speed=args.speed, seed=i)
        for i in range(4)
    ]
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [
            {
                "name": "sim",
                "models": [MODEL],
                "routing": args.profile,
                "backends": [{"url": h.url, "name": f"sim{i}"} for i, h in enumerate(sims)],
            }
        ],
        "signals": {"metrics_interval": 0.2, "metrics_max_age": 1.0},
    }
    if redis is not None:
        redis.start()
        cfg["state"] = {"redis": redis.url}
    proxies = []
    wl = shared_prefix(
        default_tokenizer(),
        num_groups=args.groups,
        num_prompts_per_group=args.prompts,
        system_prompt_len=args.system_len,
        question_len=64,
        output_len=8,
        seed=11,
    )
    # New groups arrive all through the run (each group's prompts spread over about four
    # groups' time), so that every third of it places new prefixes.
    rng = random.Random(5)
    order = sorted(range(len(wl)), key=lambda i: wl.request(i).group + 4 * rng.random())
    bodies = [wl.request(i).body(MODEL, stream=False) for i in order]
    thirds: list[tuple[int, int]] = []
    errors = 0
    try:
        for i in range(replicas):
            proxies.append(await start_proxy(parse_config(cfg), seed=i))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            n = len(bodies)
            cuts = [0, n // 3, 2 * n // 3, n]
            for part in range(3):
                if outage and part == 1:
                    assert redis is not None
                    redis.stop()
                if outage and part == 2:
                    assert redis is not None
                    redis.start()
                    await asyncio.sleep(1.5)  # lbproxy retries Redis every second
                h0 = sum(h.engine.prefix_cache_hits for h in sims)
                q0 = sum(h.engine.prefix_cache_queries for h in sims)
                todo = iter(range(cuts[part], cuts[part + 1]))

                async def worker(todo: Any = todo) -> None:
                    nonlocal errors
                    for i in todo:
                        url = proxies[i % replicas].url + "/v1/completions"
                        async with s.post(url, json=bodies[i]) as r:
                            await r.read()
                            errors += r.status != 200

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                thirds.append(
                    (
                        sum(h.engine.prefix_cache_hits for h in sims) - h0,
                        sum(h.engine.prefix_cache_queries for h in sims) - q0,
                    )
                )
    finally:
        for p in proxies:
            await p.close()
        for h in sims:
            await h.close()
        if redis is not None:
            redis.stop()
    hits = sum(h for h, _ in thirds)
    queries = sum(q for _, q in thirds)
    return {
        "hit_rate": hits / queries,
        "hit_rate_by_third": [h / q for h, q in thirds],
        "client_errors": errors,
        "requests": len(bodies),
    }


def run_hits(args: argparse.Namespace) -> dict[str, Any]:
    cases = {
        "one replica": (1, False, False),
        "two replicas, independent state": (2, False, False),
        "two replicas, shared Redis": (2, True, False),
        "two replicas, shared Redis, Redis down for the middle third": (2, True, True),
    }
    out: dict[str, Any] = {}
    for name, (n, shared, outage) in cases.items():
        runs = [
            asyncio.run(_hits_case(args, n, Redis() if shared else None, outage))
            for _ in range(args.repeat)
        ]
        out[name] = {
            "hit_rate": statistics.median(r["hit_rate"] for r in runs),
            "hit_rate_by_third": [
                statistics.median(r["hit_rate_by_third"][k] for r in runs) for k in range(3)
            ],
            "client_errors": sum(r["client_errors"] for r in runs),
            "runs": runs,
        }
        print(f"{name}: {out[name]['hit_rate']:.3f} {out[name]['hit_rate_by_third']}", flush=True)
    one = out["one replica"]["hit_rate"]
    print(f"\nprefix-cache hit rate (backends' counters), median of {args.repeat}")
    print("| case | hit rate | vs one replica | by third of the run | client errors |")
    print("|---|---|---|---|---|")
    for name, r in out.items():
        by = " / ".join(f"{x:.3f}" for x in r["hit_rate_by_third"])
        print(
            f"| {name} | {r['hit_rate']:.3f} | {r['hit_rate'] / one:.1%} | {by} | "
            f"{r['client_errors']} |"
        )
    return out


# ---------------------------------------------------------------------------- workers
def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its children (the supervisor's workers)."""
    total = overhead.cpu_seconds(pid)
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return total + sum(overhead.cpu_seconds(int(k)) for k in kids)


def run_workers(args: argparse.Namespace) -> dict[str, Any]:
    backend_port = overhead.BACKEND_PORT
    cases = {"--workers 1": (1, 18910), "--workers 2": (2, 18911)}
    backend = subprocess.Popen(
        [sys.executable, "-c", overhead.BACKEND_CODE, str(backend_port), "1"]
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    paths = []
    try:
        for name, (n, port) in cases.items():
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(
                    f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                    f"pools:\n  - name: bench\n    models: [{overhead.MODEL}]\n"
                    f"    routing: {args.profile}\n"
                    f"    backends:\n      - {{url: 'http://127.0.0.1:{backend_port}'}}\n"
                )
            paths.append(f.name)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "lbproxy", "--log-level", "warning", "serve",
                 "--config", f.name, "--workers", str(n), "--loop", args.loop],
            )  # fmt: skip
        asyncio.run(overhead.wait_up(f"http://127.0.0.1:{backend_port}/health"))
        for _name, (_n, port) in cases.items():
            asyncio.run(overhead.wait_up(f"http://127.0.0.1:{port}/health"))
        time.sleep(2)  # every worker listening
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for _name, (_n, port) in cases.items():  # warm-up
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(overhead.load(url, 300, args.concurrency, False))
        for _ in range(args.repeat):
            for name, (_n, port) in cases.items():
                url = f"http://127.0.0.1:{port}/v1/completions"
                cpu0 = _tree_cpu(procs[name].pid)
                rps, lat = asyncio.run(overhead.load(url, args.requests, args.concurrency, False))
                cpu = _tree_cpu(procs[name].pid) - cpu0
                rows[name].append(
                    {
                        "rps": rps,
                        "p50_ms": overhead.pct(lat, 50) * 1e3,
                        "p99_ms": overhead.pct(lat, 99) * 1e3,
                        "cpu_ms_per_request": cpu / args.requests * 1e3,
                    }
                )
    finally:
        for p in (*procs.values(), backend):
            p.terminate()
        for p in (*procs.values(), backend):
            p.wait(40)
        for path in paths:
            Path(path).unlink()
    out: dict[str, Any] = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
        for name, rs in rows.items()
    }
    one = out["--workers 1"]
    print(f"\nnon-stream, {args.concurrency} concurrent, median of {args.repeat}, {_cpus()}")
    print("| case | req/s | vs 1 worker | p50 ms | p99 ms | lbproxy CPU ms/request |")
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        print(
            f"| {name} | {r['rps']:.0f} | {r['rps'] / one['rps']:.2f}x | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['cpu_ms_per_request']:.3f} |"
        )
    return out


def _cpus() -> str:
    import os

    return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    hits = sub.add_parser("hits", help="prefix-cache hit rate, one vs two replicas")
    hits.add_argument("--groups", type=int, default=24)
    hits.add_argument("--prompts", type=int, default=12, help="prompts per group")
    hits.add_argument("--system-len", type=int, default=1500, help="shared prefix tokens")
    hits.add_argument("--concurrency", type=int, default=8)
    hits.add_argument("--speed", type=float, default=20.0, help="simulator speed-up")
    hits.add_argument("--profile", default="cache-aware")
    hits.add_argument("--repeat", type=int, default=3)
    workers = sub.add_parser("workers", help="serve --workers 2 vs 1, non-stream")
    workers.add_argument("--requests", type=int, default=3000)
    workers.add_argument("--concurrency", type=int, default=64)
    workers.add_argument("--repeat", type=int, default=3)
    workers.add_argument("--profile", default="round-robin")
    workers.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    for p in (hits, workers):
        p.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args()
    results = run_hits(args) if args.what == "hits" else run_workers(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
