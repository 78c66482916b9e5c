"""BENCHMARKS.md's flow-control tables, from committed result files (nothing by hand).

    python benchmarks/flow_tables.py \\
        --on benchmarks/results/flow/abc-20-on/* benchmarks/results/flow/abc-20-20rps-on \\
        --off benchmarks/results/flow/abc-20-off benchmarks/results/flow/abc-20-20rps-off \\
        --capacity benchmarks/results/capacity/abc-20/capacity.json

prints, per routing profile and rate, flow control off and on side by side, each figure's
fraction of the capacity bound, and the issue's targets checked against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

Step = dict[str, Any]


def _load(path: str) -> dict[str, Any]:
    p = Path(path)
    return json.loads((p / "results.json" if p.is_dir() else p).read_text())


def _by_profile(results: dict[str, Any]) -> dict[str, dict[float, dict[str, Any]]]:
    return {r["profile"]: {s["rate"]: s for s in r["steps"]} for r in results["runs"]}


def _merged(paths: list[str]) -> dict[str, dict[float, dict[str, Any]]]:
    """The steps of several results.json (one profile each, or other rates), by profile."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for path in paths:
        for profile, steps in _by_profile(_load(path)).items():
            out.setdefault(profile, {}).update(steps)
    return {p: dict(sorted(steps.items())) for p, steps in out.items()}


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:,.0f} ms" if v < 10 else f"{v:,.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--on", required=True, nargs="+", help="results dirs (runs merged)")
    ap.add_argument("--off", required=True, nargs="+", help="results dirs (runs merged)")
    ap.add_argument("--capacity", required=True)
    args = ap.parse_args()
    on, off = _merged(args.on), _merged(args.off)
    output_len = _load(args.on[0])["workload"]["params"]["output_len"]
    bound = json.loads(Path(args.capacity).read_text())["bound_output_tokens_per_s"]
    print(f"Bound (capacity.json): {bound:,.0f} output tok/s.\n")
    for profile, steps in on.items():
        print(f"**{profile}**, flow control off / on:\n")
        print(
            "| rate | completed tok/s | goodput tok/s | goodput / bound | SLO met | "
            "TTFT p50 | TTFT p90 | ITL p50 | ITL p90 | rejected | prefix hits |"
        )
        print("|---:|---|---|---|---|---|---|---|---|---|---|")
        for rate, s_on in steps.items():
            s_off = off[profile][rate]

            def pair(key: str, fmt: str, a: Step = s_off, b: Step = s_on) -> str:
                return f"{format(a[key], fmt)} / **{format(b[key], fmt)}**"

            def lat(key: str, a: Step = s_off, b: Step = s_on) -> str:
                return f"{_ms(a[key])} / **{_ms(b[key])}**"

            frac = (
                f"{s_off['goodput_output_tokens_per_s'] / bound:.0%} / "
                f"**{s_on['goodput_output_tokens_per_s'] / bound:.0%}**"
            )
            hits = (
                f"{s_off['prefix_cache_hit_rate'] or 0:.0%} / "
                f"**{s_on['prefix_cache_hit_rate'] or 0:.0%}**"
            )
            print(
                f"| {rate:g} | {pair('completed_output_tokens_per_s', ',.0f')} | "
                f"{pair('goodput_output_tokens_per_s', ',.0f')} | {frac} | "
                f"{pair('slo_attainment', '.0%')} | {lat('ttft_p50_s')} | {lat('ttft_p90_s')} | "
                f"{lat('itl_p50_s')} | {lat('itl_p90_s')} | {pair('rejected', 'd')} | {hits} |"
            )
        print()
    # The targets at 85 req/s.
    plus_on, rr_off = on.get("cache-aware-plus", {}), off.get("round-robin", {})
    if 85.0 in plus_on and 85.0 in rr_off:
        s, r = plus_on[85.0], rr_off[85.0]
        good, done = s["goodput_output_tokens_per_s"], s["completed_output_tokens_per_s"]
        rr_good = r["goodput_output_tokens_per_s"]
        print("Targets at 85 req/s (cache-aware-plus, flow control on):\n")
        print("| target | measured | met |")
        print("|---|---|---|")
        rows = [
            ("goodput >= 60% of the bound", f"{good / bound:.0%}", good >= 0.6 * bound),
            ("completed >= 80% of the bound", f"{done / bound:.0%}", done >= 0.8 * bound),
            (
                "goodput >= 2x round-robin's without flow control",
                f"{good / rr_good:.2f}x" if rr_good else f"{good:,.0f} against 0 tok/s",
                good > 0 and good >= 2 * rr_good,
            ),
        ]
        for name, value, ok in rows:
            print(f"| {name} | {value} | {'yes' if ok else 'no'} |")
    # Below capacity flow control must cost nothing (a gain, where the engines alone
    # over-admit, is no cost): the 25 req/s, and every rate whose offered output is
    # under the bound.
    print("\nFlow control on against off, at 25 req/s and below the bound:\n")
    print(
        "| profile | rate | offered / bound | out tok/s on / off | at most 3% lower | "
        "TTFT p50 on - off | within +50 ms |"
    )
    print("|---|---:|---:|---|---|---|---|")
    for profile, steps in on.items():
        for rate, s_on in steps.items():
            offered = rate * output_len / bound
            if (rate != 25.0 and offered >= 1.0) or rate not in off.get(profile, {}):
                continue
            s_off = off[profile][rate]
            ratio = s_on["output_tokens_per_s"] / s_off["output_tokens_per_s"]
            dt = s_on["ttft_p50_s"] - s_off["ttft_p50_s"]
            print(
                f"| {profile} | {rate:g} | {offered:.0%} | {ratio:.3f} | "
                f"{'yes' if ratio >= 0.97 else 'no'} | "
                f"{dt * 1e3:+,.0f} ms | {'yes' if dt <= 0.05 else 'no'} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
