"""Prefix-cache hit rate of new prefix groups at low concurrency, over seeds.

    python benchmarks/placement_hits.py > benchmarks/results/placement/hits.md

Three equal backends with small caches (benchmarks/fleets/placement-3.yaml: 11,200 tokens
each), 6 groups of 4,000-token system prompts, 0.15 req/s: two groups fit in one cache,
three do not, so where the router puts each new group decides the hit rate. Runs
`lbproxy simulate` (virtual time) once per seed and prints each seed's hit rate, the mean
and the worst.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SEEDS = range(10)
COMMAND = (
    "simulate --fleet benchmarks/fleets/placement-3.yaml --workload shared-prefix "
    "--num-groups 6 --system-prompt-len 4000 --question-len 200 --output-len 200 "
    "--profiles cache-aware --rates 0.15 --duration 400 --no-plots --quiet"
)


def main() -> int:
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            out = Path(tmp) / str(seed)
            args = [sys.executable, "-m", "lbproxy", *COMMAND.split(), "--seed", str(seed)]
            subprocess.run([*args, "--out", str(out)], check=True)
            step = json.loads((out / "results.json").read_text())["runs"][0]["steps"][0]
            rates.append(step["prefix_cache_hit_rate"])
    print(f"`lbproxy {COMMAND} --seed S`, S = 0-9:\n")
    print("| seed | prefix-cache hits |\n|---:|---:|")
    for seed, r in zip(SEEDS, rates, strict=True):
        print(f"| {seed} | {r:.1%} |")
    print(f"\nmean {statistics.mean(rates):.1%}, worst {min(rates):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
