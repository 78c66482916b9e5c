#!/usr/bin/env python3
"""Real vLLM vs lbproxy's engine model, into overload, flow control off and on.

    scripts/real_vllm/setup.sh                       # once
    python scripts/real_vllm/overload_check.py       # ~40 min: servers, 4 runs, comparison

1. Starts (or reuses) the two real vLLM 0.32 CPU servers of overload_servers.sh.
2. live-off, live-on: `lbproxy serve` with scripts/real_vllm/overload-lbproxy.yaml
   (round-robin over both servers; flow control as in that file, or `enabled: false`) and
   `lbproxy bench --target` through it: the shared-prefix workload below, one rate step
   each of RATES (DURATION s of Poisson arrivals + DRAIN s, then open requests are cut).
   Each run starts on cold prefix caches (POST /reset_prefix_cache), on a machine where
   no other process uses more than --max-foreign cores (checked before, measured during:
   `foreign_cores` in each run's load.json); /tmp/real-vllm-measuring exists meanwhile.
3. sim-off, sim-on: `lbproxy simulate` of benchmarks/fleets/real-cpu-2.yaml (hardware
   profile configs/hardware/vllm-cpu-tiny.yaml, fitted to the servers' measured step
   times) with the same workload, rates, seed, routing and flow-control settings.
4. compare.md / compare.json: per step, output tok/s, completed tok/s and TTFT p50, live
   against simulated, flow off and on, and whether each is within --tolerance.

Writes OUT/{live-off,live-on,sim-off,sim-on}/results.json (+ results.md, plots) and
OUT/compare.{md,json}; OUT defaults to benchmarks/results/real-vllm. Exit status 0 when
every compared figure is within the tolerance, 1 otherwise. `--phases` picks a subset,
`--rates/--duration/--drain` a reduced ladder (tests/test_real_vllm_overload.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import cpuwatch  # noqa: E402  (next to this file)

REAL_DIR = Path(
    os.environ.get("REAL_VLLM_DIR")
    or os.environ.get("LBPROXY_REAL_VLLM_DIR")
    or Path.home() / ".cache" / "lbproxy-real-vllm"
)
RUN_DIR = REAL_DIR / "run-overload"
SERVERS_SCRIPT = HERE / "overload_servers.sh"
PROXY_CONFIG = HERE / "overload-lbproxy.yaml"
FLEET = REPO / "benchmarks" / "fleets" / "real-cpu-2.yaml"
OUT = REPO / "benchmarks" / "results" / "real-vllm"
URLS = ("http://127.0.0.1:8111", "http://127.0.0.1:8112")

# The workload: inference-perf's shared-prefix shape, scaled to what two CPU servers of
# the tiny model carry. 8 system prompts of 768 tokens x 50 questions of 128 tokens
# (400 distinct prompts, 897 tokens with the BOS), 512 tokens out (ignore_eos); prompts
# sent as token ids (the servers' request_cpu was measured so).
WORKLOAD = [
    "--workload", "shared-prefix", "--num-groups", "8", "--num-prompts-per-group", "50",
    "--system-prompt-len", "768", "--question-len", "128", "--output-len", "512",
]  # fmt: skip
SEED = 0
# req/s: ~0.5x, 1x, 2x and 3x the fleet's capacity on this workload, ~21 req/s (two
# servers of 256 decodes at ~48 ms a step: ~10.7 K tokens/s; scripts/real_vllm/fit.md)
RATES = (10.0, 21.0, 42.0, 63.0)
DURATION = 60.0
DRAIN = 60.0
MAX_WAIT = 10.0  # flow control: seconds a request may wait in lbproxy
SLO = ["--slo-ttft", "5", "--slo-itl", "0.08"]
PHASES = ("live-off", "live-on", "sim-off", "sim-on")
COMPARED = (
    ("output_tokens_per_s", "out tok/s"),
    ("completed_output_tokens_per_s", "completed tok/s"),
    ("ttft_p50_s", "TTFT p50"),
)
# Shown with their difference, not held to the tolerance (the check is the above).
SHOWN = (("goodput_output_tokens_per_s", "goodput tok/s"), ("e2e_p50_s", "e2e p50"))


def log(msg: str) -> None:
    print(f"[overload-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------- servers
def servers_up() -> bool:
    try:
        return all(httpx.get(f"{u}/health", timeout=2).status_code == 200 for u in URLS)
    except httpx.HTTPError:
        return False


def setup_present() -> str | None:
    """None when the real-vLLM setup is there, else why not."""
    if not (REAL_DIR / "venv" / "bin" / "python").exists():
        return f"no vLLM venv in {REAL_DIR} (run scripts/real_vllm/setup.sh)"
    if not (REAL_DIR / "tiny-llama" / "tokenizer.json").is_file():
        return f"no tiny model in {REAL_DIR}/tiny-llama (run scripts/real_vllm/setup.sh)"
    return None


def servers(cmd: str, timeout: float = 1200) -> None:
    env = {**os.environ, "REAL_VLLM_DIR": str(REAL_DIR)}
    done = subprocess.run(
        ["bash", str(SERVERS_SCRIPT), cmd], env=env, timeout=timeout, text=True,
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 and cmd != "status":
        raise RuntimeError(f"overload_servers.sh {cmd} failed:\n{done.stdout}\n{done.stderr}")


def reset_prefix_caches() -> None:
    for u in URLS:
        r = httpx.post(f"{u}/reset_prefix_cache", timeout=30)
        if r.status_code != 200:
            raise RuntimeError(
                f"{u}/reset_prefix_cache: HTTP {r.status_code} (start the servers with "
                "VLLM_SERVER_DEV_MODE=1, as overload_servers.sh does)"
            )


def tokenizer() -> Path:
    return REAL_DIR / "tiny-llama" / "tokenizer.json"


# ------------------------------------------------------------------------- lbproxy
def proxy_config(out: Path, flow: bool) -> Path:
    """overload-lbproxy.yaml, with flow control switched off for the off run."""
    data = yaml.safe_load(PROXY_CONFIG.read_text())
    if not flow:
        data["flow_control"] = {"enabled": False}
    path = out / f"lbproxy-{'on' if flow else 'off'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def lbproxy_serve(config: Path, log_path: Path) -> Iterator[str]:
    data = yaml.safe_load(config.read_text())
    url = f"http://{data['listen']['host']}:{data['listen']['port']}"
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy.cli", "--log-level", "warning", "serve",
             "--config", str(config)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"lbproxy exited ({proc.returncode}); see {log_path}")
                try:
                    if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"lbproxy not ready after 30 s; see {log_path}")
                time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:iteration_tokens_total",
)
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def server_snapshot(url: str) -> dict[str, float]:
    """Histogram sums and counts and the load gauges of one server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        base = name.removesuffix("_sum").removesuffix("_count")
        if (base in HISTOGRAMS and name != base) or name in GAUGES:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@contextmanager
def server_metrics_log(path: Path, every: float = 2.0) -> Iterator[None]:
    """Scrape both servers every `every` s into `path` (JSON lines), for diagnosis: where
    a live request's time goes inside vLLM (its TTFT, queue and prefill histograms)."""
    stop = threading.Event()

    def loop() -> None:
        with path.open("w") as f:
            while not stop.is_set():
                row: dict[str, Any] = {"t": time.time()}
                for u in URLS:
                    try:
                        row[u] = server_snapshot(u)
                    except httpx.HTTPError:
                        row[u] = None
                f.write(json.dumps(row) + "\n")
                f.flush()
                stop.wait(every)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=10)


@contextmanager
def measuring() -> Iterator[None]:
    """/tmp/real-vllm-measuring exists while a wall-clock measurement runs."""
    cpuwatch.MARKER.write_text(f"real-vllm overload check, pid {os.getpid()}\n")
    try:
        yield
    finally:
        cpuwatch.MARKER.unlink(missing_ok=True)


def ladder_args(args: argparse.Namespace) -> list[str]:
    return [
        *WORKLOAD, "--prompt-format", "ids", "--seed", str(SEED), "--tokenizer", str(tokenizer()),
        "--rates", ",".join(f"{r:g}" for r in args.rates),
        "--duration", f"{args.duration:g}", "--drain", f"{args.drain:g}",
        "--max-wait", f"{MAX_WAIT:g}", "--flow-config", str(PROXY_CONFIG), *SLO,
    ]  # fmt: skip


def run_live(args: argparse.Namespace, flow: bool) -> Path:
    name = f"live-{'on' if flow else 'off'}"
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    config = proxy_config(args.out, flow)
    reset_prefix_caches()
    pids = cpuwatch.server_pids(RUN_DIR)
    if args.rt:  # lbproxy and the load generator inherit it from this process
        cpuwatch.realtime(pids)
    keeper = cpuwatch.Keeper() if args.rt else contextlib.nullcontext()
    try:
        load = _bench_live(args, flow, name, out, config, pids, keeper)
    finally:
        if args.rt:
            cpuwatch.normal(pids)
    (out / "load.json").write_text(json.dumps(load, indent=1))
    log(f"{name}: done in {load['wall_s']} s, foreign load {load['foreign_cores_during']} cores")
    return out


def _bench_live(
    args: argparse.Namespace,
    flow: bool,
    name: str,
    out: Path,
    config: Path,
    pids: list[int],
    keeper: Any,
) -> dict[str, Any]:
    with measuring(), keeper, lbproxy_serve(config, out / "lbproxy.log") as url:
        if args.rt:
            before = cpuwatch.busy_others(3.0, pids)
        else:
            before = cpuwatch.wait_quiet(pids, args.max_foreign, args.quiet_wait, log)
        log(f"{name}: other processes use {before:.2f} cores; benching {url}")
        watch = cpuwatch.CpuWatch(pids)
        t0 = time.monotonic()
        cmd = [
            sys.executable, "-m", "lbproxy.cli", "bench", "--target", url,
            "--profile", "round-robin", "--label", f"live ({'flow on' if flow else 'flow off'})",
            "--flow-control", "on" if flow else "off", *ladder_args(args),
            "--out", str(out), "--quiet",
        ]  # fmt: skip
        with server_metrics_log(out / "server-metrics.jsonl"):
            subprocess.run(cmd, cwd=REPO, check=True)
        load = {
            "scheduling": (
                "SCHED_RR 10 (servers, lbproxy, load generator), idle cores kept busy at RR 1"
                if args.rt
                else "CFS"
            ),
            "foreign_cores_before": round(before, 3),
            "foreign_cores_during": round(watch.foreign_cores(), 3),
            "wall_s": round(time.monotonic() - t0, 1),
            "uptime_loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
    return load


def run_sim(args: argparse.Namespace, flow: bool) -> Path:
    name = f"sim-{'on' if flow else 'off'}"
    out = args.out / name
    cmd = [
        sys.executable, "-m", "lbproxy.cli", "simulate", "--fleet", str(FLEET.relative_to(REPO)),
        "--profiles", "round-robin", "--flow-control", "on" if flow else "off",
        *ladder_args(args), "--out", str(out), "--quiet",
    ]  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=REPO, check=True)
    log(f"{name}: done in {time.monotonic() - t0:.0f} s")
    return out


# ------------------------------------------------------------------------- comparison
def _steps(path: Path) -> list[dict[str, Any]]:
    data = json.loads((path / "results.json").read_text())
    return data["runs"][0]["steps"]


def compare(out: Path, tolerance: float) -> dict[str, Any]:
    """Per step and flow setting: live vs sim on the COMPARED figures."""
    rows: list[dict[str, Any]] = []
    for flow in ("off", "on"):
        live, sim = out / f"live-{flow}", out / f"sim-{flow}"
        if not (live / "results.json").is_file() or not (sim / "results.json").is_file():
            continue
        for ls, ss in zip(_steps(live), _steps(sim), strict=True):
            row: dict[str, Any] = {"flow": flow, "rate": ls["rate"]}
            for key, _ in COMPARED + SHOWN:
                a, b = ls.get(key), ss.get(key)
                diff = None if not a or b is None else (b - a) / a
                row[key] = {"live": a, "sim": b, "diff": diff}
            for key in ("rejected", "itl_p50_s", "prefix_cache_hit_rate", "requests",
                        "completed", "incomplete"):  # fmt: skip
                if key in ls or key in ss:
                    row[key] = {"live": ls.get(key), "sim": ss.get(key)}
            row["within"] = all(
                row[k]["diff"] is not None and abs(row[k]["diff"]) <= tolerance for k, _ in COMPARED
            )
            rows.append(row)
    result = {"tolerance": tolerance, "rows": rows, "all_within": all(r["within"] for r in rows)}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    def fmt(key: str, v: float | None) -> str:
        if v is None:
            return "-"
        if key.endswith("_per_s"):
            return f"{v:,.0f}"
        return f"{v * 1000:,.0f} ms" if v < 10 else f"{v:,.1f} s"

    def pct(d: float | None) -> str:
        return "-" if d is None else f"{d * 100:+.1f}%"

    head = "| flow | rate | " + " | ".join(
        f"{label} live / sim | diff" for _, label in COMPARED + SHOWN
    ) + " | within |"  # fmt: skip
    lines = [head, "|---|---:|" + "---:|---:|" * len(COMPARED + SHOWN) + "---|"]
    for r in result["rows"]:
        cells = [
            f"{fmt(k, r[k]['live'])} / {fmt(k, r[k]['sim'])} | {pct(r[k]['diff'])}"
            for k, _ in COMPARED + SHOWN
            if k in r
        ]
        ok = "yes" if r["within"] else "**no**"
        lines.append(f"| {r['flow']} | {r['rate']:g} | " + " | ".join(cells) + f" | {ok} |")
    lines.append("")
    lines.append(
        f"Tolerance {result['tolerance'] * 100:.0f}% per step on "
        + ", ".join(label for _, label in COMPARED)
        + " (diff = sim / live - 1); "
        + ", ".join(label for _, label in SHOWN)
        + " shown, not checked."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="real vLLM vs the engine model, into overload")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=list(RATES))  # fmt: skip
    ap.add_argument("--duration", type=float, default=DURATION)
    ap.add_argument("--drain", type=float, default=DRAIN)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--phases", default=",".join(PHASES), help="subset of " + ",".join(PHASES))
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="wait until other processes use fewer cores than this")  # fmt: skip
    ap.add_argument("--quiet-wait", type=float, default=600.0,
                    help="seconds to wait for that before measuring anyway")  # fmt: skip
    ap.add_argument("--stop-servers", action="store_true", help="stop the servers at the end")
    ap.add_argument(
        "--rt",
        action=argparse.BooleanOptionalAction,
        default=os.geteuid() == 0,
        help="run the servers, lbproxy and the load generator under SCHED_RR while "
        "measuring, idle cores kept busy at a lower RR priority (default: when root), so "
        "that other jobs on the machine, however niced, can neither delay them nor evict "
        "their caches; then --max-foreign is not waited for, only recorded",
    )
    args = ap.parse_args(argv)
    # SIGTERM ends the run through the finally blocks (servers back to normal scheduling)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(p.startswith("live") for p in phases) or "sim" in args.phases:
        why = setup_present()
        if why:
            print(why, file=sys.stderr)
            return 2
    try:
        if any(p.startswith("live") for p in phases) and not servers_up():
            log("starting the servers (overload_servers.sh, 1-3 minutes)")
            servers("start")
        for p in phases:
            flow = p.endswith("-on")
            (run_live if p.startswith("live") else run_sim)(args, flow)
    finally:
        if args.stop_servers:
            servers("stop")
    result = compare(args.out, args.tolerance)
    print(markdown(result))
    shutil.copy(PROXY_CONFIG, args.out / "overload-lbproxy.yaml")
    return 0 if result["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
