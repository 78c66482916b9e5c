"""lbproxy's CPU time per request and per chunk, next to the same load sent direct.

Two backends (overhead.py's minimal OpenAI-style backend, each its own process) answer at
once; lbproxy processes (a round-robin and a cache-aware pool over both backends, for each
checkout measured) run in their own processes. A load generator (this process, raw
asyncio protocol on uvloop, httptools parser) keeps 32 keep-alive connections busy with
a bounded number of requests (and a time bound per run). For each case and repeat, the
load runs direct (to the backends, half the connections each), then through each lbproxy
in turn (interleaved), and lbproxy's CPU time (user + system from /proc) is divided by the
completed requests, and for streams by the chunks relayed. Medians of the repeats; each
repeat starts its turn at the next proxy (rotating), so none is always measured first or last.
With --rate, requests are sent at that rate (each no earlier than its slot) instead of as
fast as the connections are answered: lbproxy's CPU per request depends on the rate (at a
few hundred requests/s it wakes for each one alone), so compare cases at the same rate.

Cases (the issue 15 table):
- small: a short non-stream completion (round-robin and cache-aware)
- stream8: a stream of 8 chunks (+ [DONE]) (round-robin and cache-aware)
- unique7k: a ~7,000-token prompt (~28 KB), unique each time (never sharing a first block),
  non-stream, cache-aware
- paced500: a 500-chunk stream paced 2 ms per chunk (CPU per chunk)
- burst500: 500 chunks back to back (CPU per chunk)

    python benchmarks/dataplane_cost.py --repeat 3 --out benchmarks/results/dataplane/x.json
    python benchmarks/dataplane_cost.py --base ../base-checkout   # this code and a base, in turns
    python benchmarks/dataplane_cost.py --asgi --only small,paced500   # also under uvicorn
    python benchmarks/dataplane_cost.py --only small,unique7k --rate 250   # paced, 250 req/s
    python benchmarks/dataplane_cost.py --nginx --only paced500,burst500   # nginx beside it
    python benchmarks/dataplane_cost.py --nginx --bare --only paced500   # and a bare pipe

With --asgi, each lbproxy also runs as an ASGI application (`uvicorn lbproxy.asgi:app`,
uvloop and httptools, no access log), measured in turns with the native server; its
"CPU vs base" is against the native server of the same checkout.
With --nginx, nginx (the system's, one process, `master_process off`) runs as a reverse
proxy over the same two backends (round-robin, pooled keep-alive upstream connections,
`proxy_buffering off` so that each chunk goes on as it comes, no access log), measured in
turns with lbproxy; without --base, "CPU vs base" is then lbproxy's CPU against nginx's in
the same repeat: the peer's cost on this machine, at this moment, as the baseline.
With --bare, bare_relay.py (a TCP pipe on uvloop that parses nothing: one read and one write
per piece) is measured in turns too: the least any Python relay on uvloop costs here.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nginx_conf import NGINX_HEAD
from overhead import BACKEND_CODE, MODEL, cpu_split, pct, wait_up

ROOT = Path(__file__).resolve().parent.parent
BACKEND_PORTS = (18911, 18912)
FIRST_PROXY_PORT = 18920
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
]


@dataclass(frozen=True)
class Case:
    name: str
    profile: str
    requests: int
    stream: bool = False
    chunks: int = 0  # stream events before [DONE]
    pace_ms: float = 0.0
    prompt_bytes: int = 200
    unique: bool = False  # a new prompt for every request


CASES = (
    Case("small", "round-robin", 4000),
    Case("small", "cache-aware", 4000),
    Case("stream8", "round-robin", 3000, stream=True, chunks=8),
    Case("stream8", "cache-aware", 3000, stream=True, chunks=8),
    Case("unique7k", "cache-aware", 1500, prompt_bytes=28_000, unique=True),
    Case("paced500", "round-robin", 64, stream=True, chunks=500, pace_ms=2.0),
    Case("burst500", "round-robin", 200, stream=True, chunks=500),
)


def prompt(n: int, rng: random.Random) -> str:
    words: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(WORDS) + str(rng.randrange(1000))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


@functools.cache
def _corpus() -> str:
    return prompt(1 << 20, random.Random(0))


class UniquePrompts:
    """Never-seen prompts of `n` bytes, made fast enough that lbproxy, not this generator,
    sets the request rate: a serial number, then `n` bytes of a 1 MB word corpus from a
    random offset. Every prompt differs from every other from its first bytes, so no two
    share a prefix block (as with a prompt drawn word by word, which took ~3 ms here and
    held the unique7k case to ~250 requests/s, a third of lbproxy's idle-loop rate)."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng, self.serial = n, rng, 0
        self.corpus = _corpus()

    def __call__(self) -> str:
        self.serial += 1
        off = self.rng.randrange(len(self.corpus) - self.n)
        head = f"{self.serial} "
        return head + self.corpus[off : off + self.n - len(head)]


def request_bytes(
    case: Case, port: int, rng: random.Random, text: Callable[[], str] | None = None
) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": text() if text is not None else prompt(case.prompt_bytes, rng),
            "max_tokens": max(case.chunks, 16),
            "stream": case.stream,
        }
    ).encode()
    extra = b""
    if case.stream:
        extra = b"x-chunks: %d\r\nx-pace-ms: %g\r\n" % (case.chunks, case.pace_ms)
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (port, extra, len(body), body)
    )


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection: post, read the whole answer, post again."""

    def __init__(self, run: LoadRun, port: int) -> None:
        self.run, self.port = run, port
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        req = self.run.next_request(self.port)
        if req is None:
            self.transport.close()
            return
        wait = self.run.wait()
        if wait > 0:  # --rate: this request's slot is later
            asyncio.get_running_loop().call_later(wait, self.write, req)
        else:
            self.write(req)

    def write(self, req: bytes) -> None:
        assert self.transport is not None
        self.t0 = time.perf_counter()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.run.completed(self.parser.get_status_code(), time.perf_counter() - self.t0)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class LoadRun:
    def __init__(self, case: Case, requests: int, seconds: float, rate: float = 0.0) -> None:
        self.case, self.left, self.end = case, requests, time.monotonic() + seconds
        self.rng = random.Random(1)
        self.unique = UniquePrompts(case.prompt_bytes, self.rng) if case.unique else None
        # --rate: request i is sent no earlier than start + i / rate (0: at once).
        self.rate, self.start, self.issued = rate, 0.0, 0
        self.fixed: dict[int, bytes] = {}
        self.latencies: list[float] = []
        self.failed = 0

    def next_request(self, port: int) -> bytes | None:
        if self.left <= 0 or time.monotonic() > self.end:
            return None
        self.left -= 1
        if self.unique is not None:
            return request_bytes(self.case, port, self.rng, self.unique)
        if port not in self.fixed:
            self.fixed[port] = request_bytes(self.case, port, self.rng)
        return self.fixed[port]

    def wait(self) -> float:
        """Seconds until the next request's slot (always 0 without a rate)."""
        if not self.rate:
            return 0.0
        now = time.perf_counter()
        if not self.issued:
            self.start = now
        self.issued += 1
        return self.start + (self.issued - 1) / self.rate - now

    def completed(self, status: int, latency: float) -> None:
        if status == 200:
            self.latencies.append(latency)
        else:
            self.failed += 1


async def load(
    case: Case, ports: list[int], requests: int, conns: int, seconds: float, rate: float = 0.0
) -> dict:
    loop = asyncio.get_running_loop()
    run = LoadRun(case, requests, seconds, rate)
    t0 = time.perf_counter()
    protos = []
    for i in range(conns):
        port = ports[i % len(ports)]
        _, p = await loop.create_connection(
            lambda port=port: LoadConnection(run, port), "127.0.0.1", port
        )
        protos.append(p)
    await asyncio.wait_for(asyncio.gather(*(p.closed for p in protos)), seconds + 60)
    elapsed = time.perf_counter() - t0
    done = len(run.latencies)
    return {
        "done": done,
        "failed": run.failed,
        "rps": done / elapsed,
        "p50_ms": pct(run.latencies, 50) * 1e3 if done > 1 else 0.0,
        "p99_ms": pct(run.latencies, 99) * 1e3 if done > 1 else 0.0,
    }


# nginx as the reverse proxy a user might otherwise pick, from a config in a temp dir.
# One process (no master), so that its CPU is the pid's.
NGINX_PROXY_CONF = (
    "master_process off;\n"
    + NGINX_HEAD
    + """\
  proxy_temp_path {dir}/proxy;
  upstream backends {{
    {servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
)


def start_nginx(port: int) -> tuple[subprocess.Popen, str]:
    """nginx proxying `port` to the backends; (its process, its temp dir)."""
    d = tempfile.mkdtemp(prefix="dataplane-nginx-")
    servers = " ".join(f"server 127.0.0.1:{p};" for p in BACKEND_PORTS)
    conf = Path(d, "nginx.conf")
    conf.write_text(NGINX_PROXY_CONF.format(dir=d, port=port, servers=servers))
    return subprocess.Popen(["nginx", "-p", d, "-c", str(conf)]), d


def write_config(port: int, profile: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        backends = "".join(f"      - {{url: 'http://127.0.0.1:{p}'}}\n" for p in BACKEND_PORTS)
        cfg.write(
            f"listen: {{host: 127.0.0.1, port: {port}}}\n"
            f"pools:\n  - name: bench\n    models: [{MODEL}]\n    routing: {profile}\n"
            f"    backends:\n{backends}"
        )
    return cfg.name


async def measure(
    args: argparse.Namespace, proxies: dict[tuple[str, str], tuple[int, int]]
) -> dict:
    """proxies: (checkout label, profile) -> (port, pid)."""
    labels = sorted({label for label, _ in proxies})
    rows: dict[str, list[dict]] = {}
    for case in CASES:  # warm-up: connections, caches
        for label in labels:
            port, _ = proxies[(label, case.profile)]
            await load(case, [port], min(case.requests, 100), args.concurrency, args.seconds)
    for rep in range(args.repeat):
        for case in CASES:
            key = f"{case.name} {case.profile}"
            n = max(1, int(case.requests * args.scale))
            direct = await load(
                case, list(BACKEND_PORTS), n, args.concurrency, args.seconds, args.rate
            )
            rows.setdefault(f"{key} | direct", []).append(direct)
            # Each repeat starts at another proxy, so none is always measured in the same
            # place of the turn (right after the direct run, or last).
            k = rep % len(labels)
            for label in labels[k:] + labels[:k]:
                port, pid = proxies[(label, case.profile)]
                user0, sys0 = cpu_split(pid)
                r = await load(case, [port], n, args.concurrency, args.seconds, args.rate)
                user1, sys1 = cpu_split(pid)
                cpu = user1 - user0 + sys1 - sys0
                r["cpu_ms_per_request"] = cpu / max(r["done"], 1) * 1e3
                # In user space (the proxy's own code) rather than in the kernel's sockets.
                r["cpu_user_share"] = (user1 - user0) / cpu if cpu > 0 else 0.0
                if case.stream:
                    r["cpu_us_per_chunk"] = cpu / max(r["done"] * (case.chunks + 1), 1) * 1e6
                rows.setdefault(f"{key} | {label}", []).append(r)
                print(f"repeat {rep + 1} {key} {label}: {json.dumps(r)}", flush=True)
    return {
        k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} | {"runs": rs}
        for k, rs in rows.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every case's request count")
    ap.add_argument("--seconds", type=float, default=30.0, help="time bound of one load run")
    ap.add_argument("--label", default="this", help="name of this checkout in the results")
    ap.add_argument("--base", help="another lbproxy checkout, measured in turns with this one")
    ap.add_argument("--base-label", default="base")
    ap.add_argument("--out", help="write the raw results as JSON to this file")
    ap.add_argument("--table", help="print the table of a results file, run nothing")
    ap.add_argument(
        "--spread", action="store_true", help="with CPU vs base, also its range over the repeats"
    )
    ap.add_argument("--only", help="run only the cases of these names (comma-separated)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second (paced; default 0: each connection as fast as answered)",
    )
    ap.add_argument(
        "--asgi", action="store_true", help="also run this checkout under uvicorn (lbproxy.asgi)"
    )
    ap.add_argument(
        "--nginx", action="store_true", help="also run nginx as a reverse proxy (the baseline)"
    )
    ap.add_argument(
        "--bare",
        action="store_true",
        help="also run bare_relay.py, a TCP pipe on uvloop (the floor of a Python relay)",
    )
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        cmd = saved.get("command", "").split()
        if "--rate" in cmd and not args.rate:  # the rate the file was measured at
            args.rate = float(cmd[cmd.index("--rate") + 1])
        labels = {k.split(" | ")[1] for k in saved["results"]} - {"direct"}
        base = args.base_label if args.base_label in labels else None
        if base is None and "asgi" in labels:  # the ASGI face against the native server
            base = args.label if args.label in labels else None
        if base is None and "nginx" in labels:  # lbproxy against nginx
            base = "nginx"
        print_table(saved["results"], args, base)
        return 0

    if args.nginx and shutil.which("nginx") is None:
        ap.error("--nginx: no nginx on the PATH (Debian: apt-get install nginx-light)")
    if args.only:
        global CASES
        CASES = tuple(c for c in CASES if c.name in args.only.split(","))
    checkouts = [(args.label, ROOT)]
    if args.base:
        checkouts.append((args.base_label, Path(args.base).resolve()))
    backends = [
        subprocess.Popen([sys.executable, "-c", BACKEND_CODE, str(p), "8"]) for p in BACKEND_PORTS
    ]
    procs: list[subprocess.Popen] = []
    configs: list[str] = []
    tmpdirs: list[str] = []
    proxies: dict[tuple[str, str], tuple[int, int]] = {}
    port = FIRST_PROXY_PORT
    try:
        for label, root in checkouts:
            for profile in sorted({c.profile for c in CASES}):
                cfg = write_config(port, profile)
                configs.append(cfg)
                env = {**os.environ, "PYTHONPATH": str(root)}
                cmd = [sys.executable, "-m", "lbproxy.cli", "--log-level", "warning", "serve"]
                p = subprocess.Popen([*cmd, "--config", cfg, "--loop", "uvloop"], cwd=root, env=env)
                procs.append(p)
                proxies[(label, profile)] = (port, p.pid)
                port += 1
                if args.asgi and root == ROOT:  # the same lbproxy as an ASGI application
                    cfg = write_config(port, profile)  # listen: unused, uvicorn's --port is
                    configs.append(cfg)
                    uv = [sys.executable, "-m", "uvicorn", "lbproxy.asgi:app", "--host"]
                    uv += ["127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http"]
                    uv += ["httptools", "--no-access-log", "--log-level", "warning"]
                    p = subprocess.Popen(uv, cwd=root, env={**env, "LBPROXY_CONFIG": cfg})
                    procs.append(p)
                    proxies[("asgi", profile)] = (port, p.pid)
                    port += 1
        if args.nginx:  # one nginx for every case (it does not route by profile)
            p, d = start_nginx(port)
            procs.append(p)
            tmpdirs.append(d)
            for profile in sorted({c.profile for c in CASES}):
                proxies[("nginx", profile)] = (port, p.pid)
            port += 1
        if args.bare:  # one pipe for every case (it parses nothing, so routes nothing)
            bare = [sys.executable, str(ROOT / "benchmarks" / "bare_relay.py"), str(port)]
            p = subprocess.Popen([*bare, *map(str, BACKEND_PORTS)])
            procs.append(p)
            for profile in sorted({c.profile for c in CASES}):
                proxies[("bare", profile)] = (port, p.pid)
            port += 1
        for p in BACKEND_PORTS:
            asyncio.run(wait_up(f"http://127.0.0.1:{p}/health"))
        for port, _ in proxies.values():
            asyncio.run(wait_up(f"http://127.0.0.1:{port}/health"))
        results = uvloop.run(measure(args, proxies))
    finally:
        for p in (*procs, *backends):
            p.terminate()
        for p in (*procs, *backends):
            p.wait(10)
        for c in configs:
            os.unlink(c)
        for d in tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1)
        )
    base = args.base_label if args.base else (args.label if args.asgi else None)
    if base is None and args.nginx:
        base = "nginx"
    print_table(results, args, base)
    return 0


def print_table(results: dict, args: argparse.Namespace, base: str | None) -> None:
    """Medians; with a base checkout also the median of the per-repeat CPU ratios (each
    repeat measured both in turns, so a busy spell of the machine weighs on both)."""
    repeats = max(len(r["runs"]) for r in results.values())  # of the file, with --table
    rate = f", paced at {args.rate:g} requests/s" if args.rate else ""
    print(f"\nlbproxy data-path cost, {args.concurrency} connections{rate}, median of {repeats}")
    print(
        "| case | via | req/s | p50 ms | lbproxy CPU ms/request | lbproxy CPU us/chunk "
        "| CPU vs base | of it in user space (per chunk: user + system) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if any(k.endswith(" | nginx") for k in results):
        print("(in the nginx rows, the CPU columns are nginx's)")
    if any(k.endswith(" | bare") for k in results):
        print("(in the bare rows, the CPU columns are bare_relay.py's: a TCP pipe on uvloop)")
    for key, r in results.items():
        case, via = key.split(" | ")
        cpu = f"{r['cpu_ms_per_request']:.3f}" if "cpu_ms_per_request" in r else ""
        chunk = f"{r['cpu_us_per_chunk']:.1f}" if "cpu_us_per_chunk" in r else ""
        ratio = ""
        if base and via not in (base, "direct") and f"{case} | {base}" in results:
            pairs = zip(r["runs"], results[f"{case} | {base}"]["runs"], strict=True)
            ratios = [a["cpu_ms_per_request"] / b["cpu_ms_per_request"] for a, b in pairs]
            ratio = f"{statistics.median(ratios):.2f}x"
            if args.spread:  # and the lowest and highest of the repeats
                ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        user = f"{r['cpu_user_share']:.0%}" if "cpu_user_share" in r else ""
        if user and "cpu_us_per_chunk" in r:  # and per chunk: user + system microseconds
            u = r["cpu_us_per_chunk"] * r["cpu_user_share"]
            user += f" ({u:.1f} + {r['cpu_us_per_chunk'] - u:.1f} us)"
        print(
            f"| {case} | {via} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {cpu} | {chunk} | {ratio} "
            f"| {user} |"
        )


if __name__ == "__main__":
    sys.exit(main())
