"""BENCHMARKS.md's "P/D what-if planner" tables, from the plan.json files under this
directory (`python benchmarks/results/plan/tables.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _flow(s: dict) -> str:
    """Flow control of a plan.json (older ones: null when off)."""
    flow = s.get("flow_control") or {}
    return f"on, {flow['max_wait']:g} s" if flow.get("enabled") else "off"


def main(paths: list[Path]) -> None:
    print("| fleet | workload | rate | SLO ITL | flow control, max_wait "
          "| all-aggregated goodput | best layout | its goodput | gain "
          "| TTFT p50 (agg -> best) | rejected (agg -> best) | found by "
          "| best P/D layout | its gain | candidates, wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        plan = json.loads(p.read_text())
        s = plan["settings"]
        base, best = plan["baseline"], plan["best"]
        b = base["goodput_output_tokens_per_s"]
        local = next((c for c in plan["candidates"] if c["stage"] != "baseline"), None)
        gain = best.get("goodput_vs_baseline")
        lgain = local.get("goodput_vs_baseline") if local else None
        print(
            f"| {Path(s['fleet']).stem} | {s['workload']['name']} | {s['rate']:g} "
            f"| {s['slo_itl_s'] * 1000:g} ms | {_flow(s)} | {_g(b)} "
            f"| {best['layout']}{' (cross-vendor KV)' if best['cross_vendor_kv'] else ''} "
            f"| {_g(best['goodput_output_tokens_per_s'])} "
            f"| {'-' if gain is None else f'x{gain:.2f}'} "
            f"| {_s(base['ttft_p50_s'])} -> {_s(best['ttft_p50_s'])} "
            f"| {base.get('rejected') or 0} -> {best.get('rejected') or 0} "
            f"| {best['stage']} "
            f"| {local['layout'] if local else '-'}"
            f"{' (cross-vendor KV)' if local and local['cross_vendor_kv'] else ''} "
            f"| {'-' if lgain is None else f'x{lgain:.2f}'} "
            f"| {s['candidates_evaluated']}, {s['wall_time_s'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]] or sorted(HERE.glob("*/plan.json"))
    main(args)
