#!/usr/bin/env python3
"""One core's memory bandwidth and bf16 matmul rate, the hardware figures a simulator
profile of the CPU vLLM servers is expressed against (their effective efficiencies are
then fitted from the servers' step times by fit_profile.py).

Run with the real-vLLM venv's python (it has torch), pinned to one of the servers' cores
while nothing else runs there:

    taskset -c 0 ~/.cache/lbproxy-real-vllm/venv/bin/python \\
        scripts/real_vllm/measure_machine.py --out benchmarks/results/real-vllm/machine.json

- bandwidth: `torch.Tensor.copy_` of a 256 MiB bf16 tensor (read + write counted), best of 7;
- bf16 FLOP/s: a 1024 x 1024 x 1024 bf16 matmul on one thread, best of 7.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def best(fn: object, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description="one core's copy bandwidth and bf16 matmul rate")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = 128 * 1024 * 1024  # bf16 elements: 256 MiB
    src = torch.ones(n, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = best(lambda: dst.copy_(src))
    bandwidth = 2 * n * 2 / t_copy  # bytes read + written
    m = 1024
    a = torch.randn(m, m, dtype=torch.bfloat16)
    b = torch.randn(m, m, dtype=torch.bfloat16)
    a @ b  # warm-up
    t_mm = best(lambda: a @ b)
    flops = 2 * m**3 / t_mm
    out = {
        "copy_bytes_per_s": bandwidth,
        "bf16_matmul_flops": flops,
        "torch": torch.__version__,
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        ),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
