"""Several lbproxy processes: prefix-cache hits across replicas, and `serve --workers`.

`hits`: four simulated vLLM servers (`lbproxy sim`'s engine, in this process, faster
than real time) and a shared-prefix workload (inference-perf's shape, smaller). The
requests are sent in a fixed shuffled order at a fixed concurrency, to one lbproxy
replica, or alternating between two: with independent state, and sharing state through a
real redis-server; and once more sharing, with Redis killed for the middle third of the
run and started again (empty) for the last third. The hit rate is the backends' own
prefix-cache counters (hits / queries, in tokens), not lbproxy's estimate.

    python benchmarks/replicas.py hits --out benchmarks/results/replicas/hits.json

`workers`: `lbproxy serve --workers 2` against `--workers 1`, non-stream, with a load
that costs little next to lbproxy so that lbproxy is what saturates the cores: wrk (C,
64 keep-alive connections, a fixed duration) as the client and nginx (one worker process,
its own config in a temp dir) answering every completion with a fixed JSON body, both
from Debian (`apt-get install -y wrk nginx-light`). Per repeat, in turns: wrk straight to
nginx (the baseline: what the load itself can do), through one worker, through two.
Reported: wrk's requests/s and latency, lbproxy's CPU per request (all its processes,
from /proc), wrk's + nginx's, and how busy the whole machine was; medians.

    python benchmarks/replicas.py workers --out benchmarks/results/replicas/workers-wrk.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import resource
import shutil
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
import overhead  # noqa: E402  (benchmarks/overhead.py: MODEL, wait_up, cpu_seconds)
from nginx_conf import NGINX_HEAD  # noqa: E402

from tests.replicas_support import RedisServer as Redis  # noqa: E402  (one way to run it)
from tests.replicas_support import Serve, free_port  # noqa: E402

MODEL = "granite-4.1-8b"


# ------------------------------------------------------------------------------- hits
async def _hits_case(
    args: argparse.Namespace, replicas: int, redis: Redis | None, outage: bool
) -> dict[str, Any]:
    from lbproxy.bench.workloads import shared_prefix
    from lbproxy.config import parse_config
    from lbproxy.proxy.app import start_proxy
    from lbproxy.sim.server import start_sim_server
    from lbproxy.tokenization.tokenizer import default_tokenizer

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
# nginx answers every completion with one fixed body (overhead.py's mock backend's), from
# its own config in a temp dir: one worker process, no logs. `return` answers a POST too,
# discarding the body, and keeps the connection alive.
NGINX_CONF = (
    NGINX_HEAD
    + """\
  server {{
    listen 127.0.0.1:{port};
    location = /health {{ return 200; }}
    location = /v1/completions {{ default_type application/json; return 200 '{body}'; }}
    location / {{ return 404; }}
  }}
}}
"""
)
COMPLETION = json.dumps(
    {"id": "c", "object": "text_completion", "created": 1, "model": overhead.MODEL,
     "choices": [{"index": 0, "text": " tok" * 16, "finish_reason": "length"}],
     "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}},
    separators=(",", ":"),
)  # fmt: skip
# wrk's request (the body of overhead.py's load) and, at the end, one line of JSON.
WRK_LUA = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
REQUEST = json.dumps({"model": overhead.MODEL, "prompt": "x" * 2000, "max_tokens": 16})


def _cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its children (the supervisor's workers,
    nginx's worker)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return {p: overhead.cpu_seconds(p) for p in (pid, *map(int, kids))}


def _tree_cpu(pid: int) -> float:
    return sum(_cpu_by_process(pid).values())


def _machine_busy() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs, from /proc/stat (steal: time the VM's
    host gave to others)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, steal = v[3] + v[4], v[7]  # idle + iowait; guest time is already in user
    return sum(v) - idle - steal, steal, sum(v)


def _connections_by_process(url: str) -> list[int]:
    """Established connections on the server side of `url`'s port, per process, most first."""
    port = url.split(":")[2].split("/")[0]
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    pids = collections.Counter(m.group(1) for m in re.finditer(r"pid=(\d+)", out))
    return sorted(pids.values(), reverse=True)


def _wrk(url: str, script: Path, args: argparse.Namespace, seconds: int) -> dict[str, Any]:
    """One wrk run; its summary, and its own CPU seconds (wrk is this process's only
    child reaped meanwhile, so RUSAGE_CHILDREN's growth is wrk's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pin = ["taskset", "-c", "0"] if args.pin else []
    cmd = [*pin, "wrk", "-t", str(args.threads), "-c", str(args.concurrency),
           "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), url]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        conns: list[int] = []
        if seconds > 2:  # mid-run: how SO_REUSEPORT spread wrk's connections
            time.sleep(seconds / 2)
            conns = _connections_by_process(url)
        stdout, stderr = p.communicate(timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"wrk failed ({p.returncode}):\n{stdout}\n{stderr}")
    r: dict[str, Any] = json.loads(line[4:])
    r["connections_by_process"] = conns
    r["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return r


def _measure(
    url: str, script: Path, args: argparse.Namespace, lbproxy_pid: int | None, nginx_pid: int
) -> dict[str, Any]:
    lb0 = _cpu_by_process(lbproxy_pid) if lbproxy_pid else {}
    ng0 = _tree_cpu(nginx_pid)
    busy0, steal0, total0 = _machine_busy()
    w = _wrk(url, script, args, args.duration)
    busy1, steal1, total1 = _machine_busy()
    n, wall = w["requests"], w["duration_us"] / 1e6
    row = {
        "requests": n,
        "rps": n / wall,
        "p50_ms": w["p50_us"] / 1e3,
        "p99_ms": w["p99_us"] / 1e3,
        "errors": w["non_2xx"] + w["socket_errors"],
        "load_cpu_ms_per_request": (w["wrk_cpu_s"] + _tree_cpu(nginx_pid) - ng0) / n * 1e3,
        "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
        "machine_steal": (steal1 - steal0) / max(total1 - total0, 1),
        "connections_by_process": w["connections_by_process"],
    }
    if lbproxy_pid:
        used = {p: t - lb0.get(p, 0.0) for p, t in _cpu_by_process(lbproxy_pid).items()}
        row["lbproxy_cpu_ms_per_request"] = sum(used.values()) / n * 1e3
        row["lbproxy_cores"] = sum(used.values()) / wall
        # each process's (with --workers 2 the first is the supervisor): a worker given
        # fewer connections by SO_REUSEPORT shows here
        row["lbproxy_cores_by_process"] = [round(t / wall, 3) for t in used.values()]
    return row


def _brief(r: dict[str, Any]) -> str:
    lb = ""
    if "lbproxy_cores" in r:
        by = "/".join(f"{c:.2f}" for c in r["lbproxy_cores_by_process"])
        lb = (
            f", lbproxy {r['lbproxy_cpu_ms_per_request']:.3f} ms/request on "
            f"{r['lbproxy_cores']:.2f} cores ({by})"
        )
    conns = "/".join(map(str, r["connections_by_process"]))
    return (
        f"{r['rps']:.0f} req/s{lb}, connections {conns}, "
        f"wrk+nginx {r['load_cpu_ms_per_request']:.3f} ms/request, "
        f"machine {r['machine_busy']:.0%} busy"
    )


_SPIN = "import time\nt = time.process_time() + 2\nwhile time.process_time() < t: pass"


def _cpu_scaling() -> float:
    """How many cores' worth two busy processes get at once, against one alone (2.0 on a
    quiet machine with two real cores; less when the cores are shared with others)."""

    def spin(n: int) -> float:
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]
        for p in procs:
            p.wait(60)
        return time.monotonic() - t0

    return 2 * spin(1) / spin(2)


def _pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` and of its children onto one CPU (the --pin diagnostic)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in (pid, *map(int, kids)):
        for tid in Path(f"/proc/{p}/task").iterdir():
            os.sched_setaffinity(int(tid.name), {cpu})


def run_workers(args: argparse.Namespace) -> dict[str, Any]:
    for exe in ("wrk", "nginx"):
        if shutil.which(exe) is None:
            raise SystemExit(f"{exe} is not installed (apt-get install -y wrk nginx-light)")
    tmp = Path(tempfile.mkdtemp(prefix="lbproxy-bench-workers-"))
    backend_port = free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=backend_port, body=COMPLETION))
    script = tmp / "post.lua"
    script.write_text(WRK_LUA.format(body=REQUEST))
    load_cpu = ["taskset", "-c", "0"] if args.pin else []  # wrk's and nginx's, with --pin
    scaling = _cpu_scaling()
    print(f"two busy processes get {scaling:.2f} cores' worth", flush=True)
    nginx_cmd = [*load_cpu, "nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                 "-e", str(tmp / "error.log")]  # fmt: skip
    nginx = subprocess.Popen(nginx_cmd)
    backend = f"http://127.0.0.1:{backend_port}"
    serves: dict[str, Serve] = {}
    try:
        asyncio.run(overhead.wait_up(f"{backend}/health"))
        for n in (1, 2):
            cfg = tmp / f"workers{n}.yaml"
            cfg.write_text(
                f"listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
                f"pools:\n  - name: bench\n    models: [{overhead.MODEL}]\n"
                f"    routing: {args.profile}\n    backends:\n      - {{url: '{backend}'}}\n"
            )
            serves[f"--workers {n}"] = Serve(
                cfg, "--loop", args.loop, "--workers", str(n), listening=n
            )
            if args.pin:
                _pin(serves[f"--workers {n}"].proc.pid, 1)
        urls = {"direct to nginx": f"{backend}/v1/completions"} | {
            name: f"{s.url}/v1/completions" for name, s in serves.items()
        }
        for url in urls.values():  # warm-up: connections, learnt flow-control limits
            _wrk(url, script, args, 2)
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        for i in range(args.repeat):  # in turns: direct, 1 worker, 2 workers
            for name, url in urls.items():
                s = serves.get(name)
                rows[name].append(_measure(url, script, args, s and s.proc.pid, nginx.pid))
                print(f"run {i + 1}, {name}: {_brief(rows[name][-1])}", flush=True)
    finally:
        for s in serves.values():
            s.stop()
        nginx.terminate()
        nginx.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {
        name: {
            k: statistics.median(r[k] for r in rs) for k in rs[0] if not k.endswith("_by_process")
        }
        | {"runs": rs}
        for name, rs in rows.items()
    }
    # Each repeat's ratio to the 1 worker run next to it (the cases ran in turns), median.
    w1 = rows["--workers 1"]
    for name, rs in rows.items():
        out[name]["rps_vs_1_worker"] = statistics.median(
            r["rps"] / one["rps"] for r, one in zip(rs, w1, strict=True)
        )
    out["machine"] = {"cpu_scaling": scaling, "load_average_end": os.getloadavg()[0]}
    print(
        f"\nnon-stream, wrk -t {args.threads} -c {args.concurrency} -d {args.duration}s, nginx "
        f"backend, median of {args.repeat}, "
        f"{'pinned (wrk+nginx: CPU 0, lbproxy: CPU 1), ' if args.pin else ''}"
        f"{_cpus()}; two busy processes got {scaling:.2f} cores' worth; "
        "vs 1 worker: median of each repeat's ratio"
    )
    print(
        "| case | req/s | vs 1 worker | p50 ms | p99 ms | errors | lbproxy CPU ms/request | "
        "lbproxy cores | wrk+nginx CPU ms/request | machine busy | steal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        if name == "machine":
            continue
        lb, cores = r.get("lbproxy_cpu_ms_per_request"), r.get("lbproxy_cores")
        print(
            f"| {name} | {r['rps']:.0f} | {r['rps_vs_1_worker']:.2f}x | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']:.0f} | {'-' if lb is None else f'{lb:.3f}'} | "
            f"{'-' if cores is None else f'{cores:.2f}'} | "
            f"{r['load_cpu_ms_per_request']:.3f} | {r['machine_busy']:.0%} | "
            f"{r['machine_steal']:.0%} |"
        )
    return out


def ceiling(results: dict[str, Any]) -> str:
    """What `--workers 2` could reach on this machine at best: the cores' worth two busy
    processes get, spent on nothing but lbproxy and the load (wrk and nginx) at the CPU per
    request each was measured to cost in the `--workers 2` runs."""
    two, one = results["--workers 2"], results["--workers 1"]
    per_request_ms = two["lbproxy_cpu_ms_per_request"] + two["load_cpu_ms_per_request"]
    rps = results["machine"]["cpu_scaling"] * 1000.0 / per_request_ms
    load_for_1_7 = (
        results["machine"]["cpu_scaling"] * 1000.0 / (1.7 * one["rps"])
        - two["lbproxy_cpu_ms_per_request"]
    )
    return (
        f"ceiling of --workers 2 here: {results['machine']['cpu_scaling']:.2f} cores / "
        f"({two['lbproxy_cpu_ms_per_request']:.3f} ms lbproxy + "
        f"{two['load_cpu_ms_per_request']:.3f} ms wrk+nginx per request) = {rps:.0f} req/s, "
        f"{rps / one['rps']:.2f}x the {one['rps']:.0f} req/s of --workers 1; measured "
        f"{two['rps']:.0f} req/s ({two['rps_vs_1_worker']:.2f}x); 1.7x would need the load "
        f"at most {load_for_1_7:.3f} ms per request"
    )


def _cpus() -> str:
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
    workers.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    workers.add_argument("--concurrency", type=int, default=64, help="wrk connections")
    workers.add_argument("--threads", type=int, default=1, help="wrk threads")
    workers.add_argument("--repeat", type=int, default=3)
    workers.add_argument("--profile", default="round-robin")
    workers.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: wrk and nginx on CPU 0, every lbproxy process on CPU 1",
    )
    workers.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    for p in (hits, workers):
        p.add_argument("--out", help="write the results as JSON to this file")
    bound = sub.add_parser("ceiling", help="what --workers 2 could reach here, from a result")
    bound.add_argument("file", help="a `workers --out` JSON file")
    args = ap.parse_args()
    if args.what == "ceiling":
        print(ceiling(json.loads(Path(args.file).read_text())["results"]))
        return 0
    results = run_hits(args) if args.what == "hits" else run_workers(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
