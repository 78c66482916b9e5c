"""How fast the real servers stepped during the overload check, against the fitted model.

Reads the servers' own counters that `overload_check.py` sampled every ~2 s during the live
ladders (`<results>/live-{off,on}/server-metrics.jsonl`): per interval and server, the
number of running requests at its end and the mean inter-token latency over it (growth of
`vllm:inter_token_latency_seconds` _sum / _count). For each band of running requests it
prints the median measured latency and what the fitted profile
(`configs/hardware/vllm-cpu-tiny.yaml`) gives for a pure-decode step of that batch on the
check's workload, each request's context taken at its mean: the 897-token prompt (768 of
them shared by the requests of one of 8 groups) plus half of the 512 tokens out. The model
was fitted to steps measured with a client alone on the machine; during the check, lbproxy
and the load generator run on the same two cores.

    python scripts/real_vllm/live_steps.py [--results benchmarks/results/real-vllm]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from lbproxy.sim.hardware import load_profile

PROMPT, SHARED, GROUPS, OUT_MEAN = 897, 768, 8, 256
BANDS = ((1, 50), (50, 100), (100, 150), (150, 200), (200, 257))
MIN_INTERVALS = 3


def intervals(path: Path) -> list[tuple[str, int, float]]:
    """(server, running at the interval's end, mean ITL in seconds) per interval."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for a, b in itertools.pairwise(rows):
        for url, m in b.items():
            if url == "t" or url not in a:
                continue
            count = m["vllm:inter_token_latency_seconds_count"]
            dc = count - a[url]["vllm:inter_token_latency_seconds_count"]
            ds = (
                m["vllm:inter_token_latency_seconds_sum"]
                - a[url]["vllm:inter_token_latency_seconds_sum"]
            )
            if dc > 0 and m["vllm:num_requests_running"] > 0:
                out.append((url, int(m["vllm:num_requests_running"]), ds / dc))
    return out


def model_step(batch: int) -> float:
    prof = load_profile("vllm-cpu-tiny")
    per_request = PROMPT + OUT_MEAN
    unique = batch * (per_request - SHARED) + min(GROUPS, batch) * SHARED
    return prof.step_time(0, batch, batch * per_request, batch, unique_context_tokens=unique)


def table(results: Path) -> str:
    lines = [
        "| ladder | server | running | intervals | ITL measured (median) | model step "
        "| measured / model |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for phase in ("live-off", "live-on"):
        if not (results / phase / "server-metrics.jsonl").exists():  # a re-run of one phase
            continue
        rows = intervals(results / phase / "server-metrics.jsonl")
        for url in sorted({r[0] for r in rows}):
            for lo, hi in BANDS:
                band = [(b, itl) for u, b, itl in rows if u == url and lo <= b < hi]
                if len(band) < MIN_INTERVALS:
                    continue
                itl = statistics.median(x for _, x in band)
                model = statistics.median(model_step(b) for b, _ in band)
                lines.append(
                    f"| {phase} | {url.rsplit(':', 1)[-1]} | {lo}-{hi - 1} | {len(band)} "
                    f"| {itl * 1e3:.1f} ms | {model * 1e3:.1f} ms | {itl / model:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/real-vllm"))
    print(table(ap.parse_args().results))


if __name__ == "__main__":
    main()
