"""The P/D tables, from the committed result files (nothing by hand):

    D=benchmarks/results/pd-flow; python benchmarks/pd_flow_table.py $D > $D/TABLE.md
    D=benchmarks/results/pd-prefill-load; python benchmarks/pd_flow_table.py $D > $D/TABLE.md

pd-flow: per rate, flow control off, on before the P/D rules, on after them; then the
issue's targets checked against the figures, and whether the aggregated run is unchanged.

pd-prefill-load (a directory with `before-off-12-s0` and the like): the prefill side's
routing before and after the prefill-load scorer, per workload, rate, flow control and
seed; then, per rate and flow control, whether after beats before on both seeds; then,
when it has a `weights/` directory (fleet files `vN.yaml`, runs `vN-on-20-s0`...), the
prefill profiles that were tried, seed 0, next to `before`; then, when it has
`agg-before-off-12-s0` and the like, aggregated requests' prefills on `both` backends
counted in the prefill load or not (seed 0, on abc-20-pd and on `agg-fleet-min4096.yaml`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RATES = (12, 20, 35)
RUNS = (("off", "off"), ("on-before", "on, before"), ("on-after", "on, after"))
SEEDS = (0, 1)
FLOWS = ("off", "on")
VERSIONS = ("before", "after")
DIVERSE_RATES = (5, 20)  # below the diverse workload's capacity, and far past it


def _step(root: Path, name: str) -> dict[str, Any]:
    results = json.loads((root / name / "results.json").read_text())
    return results["runs"][0]["steps"][0]


def _s(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:,.0f} ms" if v < 10 else f"{v:.1f} s")


def _row(rate: int, label: str, s: dict[str, Any]) -> str:
    return _cells([str(rate), label], s)


def _cells(lead: list[str], s: dict[str, Any]) -> str:
    cells = [
        *lead,
        str(s["completed"]),
        str(s["rejected"]),
        str(s["incomplete"]),
        f"{s['completed_output_tokens_per_s']:,.0f}",
        f"{s['goodput_output_tokens_per_s']:,.0f}",
        f"{s['slo_attainment']:.0%}",
        _s(s["ttft_p50_s"]),
        _s(s["ttft_p90_s"]),
        f"{s['prefix_cache_hit_rate']:.0%}",
    ]
    return "| " + " | ".join(cells) + " |"


def _same_but_wall_time(a: Path, b: Path) -> bool:
    def strip(p: Path) -> Any:
        d = json.loads((p / "results.json").read_text())
        d.pop("created", None)
        for run in d["runs"]:
            for s in run["steps"]:
                s.pop("wall_time_s", None)
            run.pop("wall_time_s", None)
        d.get("settings", {}).pop("wall_time_s", None)
        return json.dumps(d, sort_keys=True)

    return strip(a) == strip(b)


HEAD = (
    "| completed | rejected | cut at drain end | completed tok/s | goodput tok/s "
    "| SLO | TTFT p50 | TTFT p90 | prefix hits |"
)


def _versus(b: list[dict[str, Any]], a: list[dict[str, Any]]) -> str:
    """After against before over the seeds: goodput (higher), TTFT p50 and p90 (lower)."""

    def verdict(key: str, higher: bool) -> str:
        pairs = [(x[key], y[key]) for x, y in zip(b, a, strict=True)]
        if all(y == x for x, y in pairs):
            return "same"
        better = [(y > x) if higher else (y < x) for x, y in pairs]
        worse = [(y < x) if higher else (y > x) for x, y in pairs]
        if all(better):
            return "better on every seed"
        if all(worse):
            return "worse on every seed"
        return "mixed"

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    good = "goodput_output_tokens_per_s"
    return (
        f"goodput {mean(b, good):,.0f} -> {mean(a, good):,.0f} tok/s "
        f"({verdict(good, True)}); "
        f"TTFT p50 {_s(mean(b, 'ttft_p50_s'))} -> {_s(mean(a, 'ttft_p50_s'))} "
        f"({verdict('ttft_p50_s', False)}); "
        f"TTFT p90 {_s(mean(b, 'ttft_p90_s'))} -> {_s(mean(a, 'ttft_p90_s'))} "
        f"({verdict('ttft_p90_s', False)})"
    )


def prefill_load_table(root: Path) -> list[str]:
    out = [
        "# The P/D prefill side before and after the prefill-load scorer (abc-20-pd, cache-aware)",
        "",
        "| workload | rate | flow control | routing | seed " + HEAD,
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [("shared-prefix", "", r) for r in RATES]
    cases += [("diverse-prefix", "diverse-", r) for r in DIVERSE_RATES]
    summary = []
    for workload, prefix, r in cases:
        for fc in FLOWS:
            steps: dict[str, list[dict[str, Any]]] = {}
            for v in VERSIONS:
                steps[v] = [_step(root, f"{prefix}{v}-{fc}-{r}-s{seed}") for seed in SEEDS]
                for seed, s in zip(SEEDS, steps[v], strict=True):
                    out.append(_cells([workload, str(r), fc, v, str(seed)], s))
            summary.append(
                f"- {workload}, {r} req/s, flow control {fc}: "
                + _versus(steps["before"], steps["after"])
            )
    same = _same_but_wall_time(root / "aggregated-before", root / "aggregated-after")
    out += ["", "After against before (means over the seeds; the verdict per seed):", ""]
    out += summary
    out += [
        f"- aggregated pool (abc-20, cache-aware-plus, 85 req/s): results.json "
        f"{'unchanged' if same else 'CHANGED'} but for wall time"
    ]
    return out


def _scorers(fleet: Path) -> str:
    """A fleet file's prefill scorers, as `type weight (params)`."""
    import yaml

    spec = yaml.safe_load(fleet.read_text())["disaggregation"]["prefill_routing"]
    out = []
    for sc in spec["scorers"]:
        extra = ", ".join(f"{k} {v}" for k, v in sc.items() if k not in ("type", "weight"))
        out.append(f"{sc['type']} {sc.get('weight', 1)}" + (f" ({extra})" if extra else ""))
    return ", ".join(out)


def weights_table(root: Path) -> list[str]:
    w = root / "weights"
    variants = sorted(p.stem for p in w.glob("v*.yaml"))
    out = [
        "",
        "## Prefill profiles tried (seed 0; `before` is prefix-hash 3, queue 2, least-request 2)",
        "",
    ]
    out += [f"- {v}: {_scorers(w / f'{v}.yaml')}" for v in variants]
    out += [
        "",
        "| workload | rate | flow control | profile " + HEAD,
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [("shared-prefix", "", r) for r in RATES] + [("diverse-prefix", "diverse-", 20)]
    for workload, prefix, r in cases:
        for fc in FLOWS:
            lead = [workload, str(r), fc]
            out.append(_cells([*lead, "before"], _step(root, f"{prefix}before-{fc}-{r}-s0")))
            for v in variants:
                name = f"{prefix}{v}-{fc}-{r}-s0"
                if (w / name / "results.json").is_file():
                    out.append(_cells([*lead, v], _step(w, name)))
    return out


AGG_FLEETS = (
    ("abc-20-pd", "agg-"),
    ("abc-20-pd, min_prompt_tokens 4096", "agg-min4096-"),
)


def agg_prefill_table(root: Path) -> list[str]:
    """Before and after counting aggregated requests' prefills on `both` backends in the
    prefill load, seed 0; `kept aggregated` is how many requests of the step (warm-up
    included) the P/D decision kept aggregated, the only ones the change concerns."""
    out = [
        "",
        "## Aggregated requests' prefills on `both` backends in the prefill load "
        "(shared-prefix, seed 0)",
        "",
        "| fleet | rate | flow control | routing | kept aggregated " + HEAD,
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for fleet, prefix in AGG_FLEETS:
        if not (root / f"{prefix}before-off-12-s0").is_dir():
            continue
        for r in RATES:
            for fc in FLOWS:
                steps = {}
                for v in VERSIONS:
                    steps[v] = s = _step(root, f"{prefix}{v}-{fc}-{r}-s0")
                    lead = [fleet, str(r), fc, "before" if v == "before" else "counted"]
                    out.append(_cells([*lead, str(s["pd"]["aggregated"])], s))
                names = [root / f"{prefix}{v}-{fc}-{r}-s0" for v in VERSIONS]
                what = (
                    "identical results but for wall time"
                    if _same_but_wall_time(*names)
                    else _versus([steps["before"]], [steps["after"]]).replace(" on every seed", "")
                )
                summary.append(f"- {fleet}, {r} req/s, flow control {fc}: {what}")
    same = _same_but_wall_time(root / "agg-aggregated-before", root / "agg-aggregated-after")
    out += ["", "After against before (seed 0):", "", *summary]
    out.append(
        f"- aggregated pool (abc-20, cache-aware-plus, 85 req/s): results.json "
        f"{'unchanged' if same else 'CHANGED'} but for wall time"
    )
    return out


def main(root: Path) -> None:
    if (root / "before-off-12-s0").is_dir():
        out = prefill_load_table(root)
        if (root / "weights").is_dir():
            out += weights_table(root)
        if (root / "agg-before-off-12-s0").is_dir():
            out += agg_prefill_table(root)
        print("\n".join(out))
        return
    out = [
        "# Flow control on a P/D pool (abc-20-pd, shared-prefix, cache-aware)",
        "",
        "| rate | flow control | completed | rejected | cut at drain end | completed tok/s "
        "| goodput tok/s "
        "| SLO | TTFT p50 | TTFT p90 | prefix hits |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    # Re-runs of later code, flow control off and on: `off-<commit>-R`, `on-<commit>-R`.
    later = sorted(
        d.name.removeprefix("on-").removesuffix("-12")
        for d in root.glob("on-*-12")
        if d.name not in ("on-before-12", "on-after-12") and (root / f"off-{d.name[3:]}").is_dir()
    )
    runs = [*RUNS]
    for c in later:
        runs += [(f"off-{c}", f"off, at {c}"), (f"on-{c}", f"on, at {c}")]
    steps = {(r, n): _step(root, f"{n}-{r}") for r in RATES for n, _ in runs}
    for r in RATES:
        out += [_row(r, label, steps[(r, n)]) for n, label in runs]
    out += _checks(root, steps, "off", "on-after", "after the change")
    for c in later:
        out += _checks(root, steps, f"off-{c}", f"on-{c}", f"at {c}")
    print("\n".join(out))


def _checks(root: Path, steps: dict, off: str, on: str, when: str) -> list[str]:
    """The issue's targets for one pair of runs, flow control off and on."""
    off20, on20 = steps[(20, off)], steps[(20, on)]
    off12, on12 = steps[(12, off)], steps[(12, on)]
    off35, on35 = steps[(35, off)], steps[(35, on)]
    tok = "completed_output_tokens_per_s"
    good = "goodput_output_tokens_per_s"
    checks = [
        (
            "20 req/s: on's completed tok/s within 5% of off's",
            on20[tok] >= 0.95 * off20[tok],
        ),
        (
            "20 req/s: on's SLO attainment >= off's - 5 points",
            on20["slo_attainment"] >= off20["slo_attainment"] - 0.05,
        ),
        (
            "12 req/s: on's TTFT p50 within +50 ms of off's",
            on12["ttft_p50_s"] <= off12["ttft_p50_s"] + 0.05,
        ),
        ("35 req/s: on's goodput above off's", on35[good] > off35[good]),
        (
            "aggregated pool (abc-20, cache-aware-plus, 85 req/s): results.json unchanged "
            "but for wall time",
            _same_but_wall_time(root / "aggregated-before", root / "aggregated-after"),
        ),
    ]
    if on != "on-after":  # the aggregated check is of the change only
        checks = checks[:-1]
    out = ["", f"Targets ({when}):", ""]
    out += [f"- {'met' if ok else 'NOT met'}: {what}" for what, ok in checks]
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/pd-flow"))
