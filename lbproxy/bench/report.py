"""results.json (a stable, versioned schema), its markdown table and its PNG plots.

Schema, version 1 (scripts may rely on every key below; new keys may be added, none
removed or renamed without bumping `schema_version`). Times are seconds, in the target's
time (engine time for a sped-up simulated fleet); a figure with no data is null.

    {
      "schema_version": 1,
      "tool": "lbproxy bench" | "lbproxy simulate" | "lbproxy bench --compare",
      "created": "2026-11-28T15:21:00Z",
      "workload": {"name": "shared-prefix", "api": "completions", "params": {...}},
      "settings": {"rates": [...], "duration_s": 60, "drain_s": 60, "seed": 0, ...},
      "runs": [
        {"profile": "cache-aware",     # routing profile, or a run label
         "label": "cache-aware",       # legend text
         "target": "http://...",       # bench: URL; simulate: fleet file
         "steps": [StepResult, ...]}
      ]
    }

StepResult (see `stats.summarize_step` for how each is computed): rate, duration_s,
requests, completed, incomplete, errors, elapsed_s, requests_per_s, output_tokens_per_s,
output_tokens, completed_output_tokens_per_s, prompt_tokens_per_s, prefix_cache_hit_rate,
ttft_mean_s, ttft_p50_s, ttft_p90_s, ttft_p99_s, itl_mean_s, itl_p50_s, itl_p90_s,
itl_p99_s, e2e_p50_s, e2e_p90_s, e2e_p99_s; and optionally `backends` (requests per
backend name).

Added in the same schema version (absent from older files, so optional to readers):
rejected, delivered_output_tokens_per_s, goodput_output_tokens_per_s, slo_attainment,
slo_ttft_s, slo_itl_s, queue_wait_p50_s, queue_wait_p99_s, and `classes` ({class name:
{requests, completed, incomplete, rejected, errors, ttft_p50_s, ttft_p90_s, ttft_p99_s,
queue_wait_p50_s, queue_wait_p99_s, output_tokens_per_s, completed_output_tokens_per_s,
goodput_output_tokens_per_s, slo_attainment}}, when the run had traffic classes, `--mix`).

Definitions (seconds and tokens; "duration" is the step's arrival window):

- output_tokens_per_s: output tokens of completed and cut requests / duration.
  **Changed meaning**: files written before `delivered_output_tokens_per_s` existed divided
  by elapsed_s (first send to last token or cut); that figure is now
  delivered_output_tokens_per_s. Below capacity the two differ only by the tail.
- requests_per_s: completed requests / duration (**changed**: was / elapsed_s);
  prompt_tokens_per_s: prompt tokens of completed requests / duration (**changed** too).
- completed_output_tokens_per_s: output tokens of requests that finished without error /
  duration (**changed**: was / elapsed_s).
- goodput_output_tokens_per_s: the same, only requests that met the SLO: TTFT <= slo_ttft_s
  (from the request's send, so time queued in lbproxy counts) and mean inter-token latency
  (end - first token) / (output tokens - 1) <= slo_itl_s.
- slo_attainment: requests that met the SLO / all the step's requests (rejected, failed
  and cut ones count as missing it); null for an empty step.
- rejected: requests answered 429 or 503 by lbproxy (shed by flow control); errors: all
  other failures (rejected requests are no longer counted in errors).
- queue_wait_p50_s / _p99_s: time held by lbproxy's flow control before dispatch, over
  the requests where it is known (live: the `x-lbproxy-queue-wait` response header); null
  if none.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
THROUGHPUT_PNG = "throughput.png"
TTFT_PNG = "ttft.png"
GOODPUT_PNG = "goodput.png"
SLO_PNG = "slo.png"


class StepResult(TypedDict):
    rate: float
    duration_s: float
    requests: int
    completed: int
    incomplete: int
    errors: int
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    output_tokens: int
    completed_output_tokens_per_s: float
    prompt_tokens_per_s: float
    prefix_cache_hit_rate: float | None
    ttft_mean_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_mean_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    backends: NotRequired[dict[str, int]]
    rejected: NotRequired[int]
    delivered_output_tokens_per_s: NotRequired[float]
    goodput_output_tokens_per_s: NotRequired[float]
    slo_attainment: NotRequired[float | None]
    slo_ttft_s: NotRequired[float]
    slo_itl_s: NotRequired[float]
    queue_wait_p50_s: NotRequired[float | None]
    queue_wait_p99_s: NotRequired[float | None]
    classes: NotRequired[dict[str, dict[str, float | int | None]]]


class RunResult(TypedDict):
    profile: str
    label: str
    target: str
    steps: list[StepResult]


class Results(TypedDict):
    schema_version: int
    tool: str
    created: str
    workload: dict[str, Any]
    settings: dict[str, Any]
    runs: list[RunResult]


# Keys added after the first files of schema version 1 were written: checked when present.
_ADDED_STEP_KEYS = (
    "rejected",
    "delivered_output_tokens_per_s",
    "goodput_output_tokens_per_s",
    "slo_attainment",
    "slo_ttft_s",
    "slo_itl_s",
    "queue_wait_p50_s",
    "queue_wait_p99_s",
)
# Required in every step.
_STEP_KEYS = tuple(
    k for k in StepResult.__annotations__ if k not in ("backends", "classes", *_ADDED_STEP_KEYS)
)
_NUMBER = (int, float)


def _number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, _NUMBER) and not isinstance(v, bool))


def _expected(v: Any) -> str:
    return f"expected a number or null, got {v!r}"


def new_results(
    tool: str, workload: dict[str, Any], settings: dict[str, Any], runs: list[RunResult]
) -> Results:
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Results(
        schema_version=SCHEMA_VERSION,
        tool=tool,
        created=created,
        workload=workload,
        settings=settings,
        runs=runs,
    )


def validate_results(data: Any, source: str = "results") -> Results:
    """Check the structure (keys and types); ValueError names the offending key."""

    def need(cond: bool, where: str, what: str) -> None:
        if not cond:
            raise ValueError(f"{source}: {where}: {what}")

    need(isinstance(data, dict), "(top level)", "expected an object")
    need(
        data.get("schema_version") == SCHEMA_VERSION,
        "schema_version",
        f"expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}",
    )
    for key, typ in (
        ("tool", str),
        ("created", str),
        ("workload", dict),
        ("settings", dict),
        ("runs", list),
    ):
        need(isinstance(data.get(key), typ), key, f"expected {typ.__name__}")
    for i, run in enumerate(data["runs"]):
        at = f"runs[{i}]"
        need(isinstance(run, dict), at, "expected an object")
        for key in ("profile", "label", "target"):
            need(isinstance(run.get(key), str), f"{at}.{key}", "expected a string")
        need(isinstance(run.get("steps"), list), f"{at}.steps", "expected a list")
        for j, step in enumerate(run["steps"]):
            sat = f"{at}.steps[{j}]"
            need(isinstance(step, dict), sat, "expected an object")
            for key in _STEP_KEYS:
                need(key in step, f"{sat}.{key}", "missing")
            for key in (*_STEP_KEYS, *_ADDED_STEP_KEYS):
                if key in step:
                    need(_number_or_null(step[key]), f"{sat}.{key}", _expected(step[key]))
            classes = step.get("classes", {})
            need(isinstance(classes, dict), f"{sat}.classes", "expected an object")
            for name, figures in classes.items():
                cat = f"{sat}.classes.{name}"
                need(isinstance(figures, dict), cat, "expected an object")
                for key, v in figures.items():
                    need(_number_or_null(v), f"{cat}.{key}", _expected(v))
    return data  # type: ignore[return-value]


def write_results(out_dir: str | Path, results: Results, *, plots: bool = True) -> list[Path]:
    """Write results.json, results.md and (with `plots`) the PNGs; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_results(results)
    paths = [out / RESULTS_FILE, out / MARKDOWN_FILE]
    paths[0].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(results), encoding="utf-8")
    if plots:
        paths += plot(results, out)
    return paths


def load_results(path: str | Path) -> Results:
    """Read results.json from a file or from a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    return validate_results(data, str(p))


_RUN_KINDS = {"lbproxy bench": "live", "lbproxy simulate": "sim"}


def compare_label(run: RunResult, tool: str) -> str:
    """`<label> [live|sim, <profile>]`: every run of a comparison says how it was measured
    (live load against servers, or the simulator in virtual time) and which routing
    profile it used (omitted when the label already names it)."""
    kind = _RUN_KINDS.get(tool)
    if kind is None:  # an earlier comparison: its runs are labelled already
        return run["label"]
    tags = [kind] if run["profile"] in run["label"] else [kind, run["profile"]]
    return f"{run['label']} [{', '.join(tags)}]"


def workload_differences(sources: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What differs between the workloads of compared runs: `key: a (src) vs b (src)`."""

    def flat(wl: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in wl.items() if k != "params"}
        out.update({f"params.{k}": v for k, v in (wl.get("params") or {}).items()})
        return out

    (first_src, first), rest = sources[0], sources[1:]
    base = flat(first)
    diffs = []
    for src, wl in rest:
        other = flat(wl)
        for key in sorted(base.keys() | other.keys()):
            if base.get(key) != other.get(key):
                diffs.append(
                    f"{key}: {base.get(key)!r} ({first_src}) vs {other.get(key)!r} ({src})"
                )
    return diffs


def default_compare_dir(paths: list[str | Path]) -> Path:
    """Where a comparison is written without --out: next to the first input,
    `compare-<input names>` (e.g. runs/rr + runs/ca -> runs/compare-rr-ca)."""
    dirs = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    return dirs[0].parent / ("compare-" + "-".join(d.name for d in dirs))


def compare(paths: list[str | Path], out_dir: str | Path | None = None) -> Results:
    """Put the runs of several result directories on the same axes (and in one table).

    Written to `out_dir` (default: `default_compare_dir`). When the inputs' workloads
    differ, `settings.warnings` says how (the CLI prints it; results.md shows it)."""
    if not paths:
        raise ValueError("--compare needs at least one results directory")
    loaded = [(Path(p), load_results(p)) for p in paths]
    runs: list[RunResult] = []
    seen: set[str] = set()
    for p, res in loaded:
        for run in res["runs"]:
            label = compare_label(run, res["tool"])
            if label in seen:
                label = f"{p.name}: {label}"
            seen.add(label)
            runs.append(
                RunResult(
                    profile=run["profile"], label=label, target=run["target"], steps=run["steps"]
                )
            )
    first = loaded[0][1]
    settings: dict[str, Any] = {
        "sources": [str(p) for p, _ in loaded],
        "workloads": [r["workload"] for _, r in loaded],
    }
    diffs = workload_differences([(str(p), r["workload"]) for p, r in loaded])
    if diffs:
        settings["warnings"] = [
            "the compared runs' workloads differ, so their figures are not comparable: "
            + "; ".join(diffs)
        ]
    results = new_results("lbproxy bench --compare", first["workload"], settings, runs)
    write_results(default_compare_dir(paths) if out_dir is None else out_dir, results)
    return results


# ------------------------------------------------------------------------------ markdown
def _f(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v * scale:,.{digits}f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:,.0f} ms" if v < 10 else f"{v:,.1f} s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def markdown(results: Results) -> str:
    wl = results["workload"]
    params = ", ".join(f"{k}={v}" for k, v in wl.get("params", {}).items())
    lines = [
        f"# {results['tool']}",
        "",
        f"Workload `{wl.get('name')}` ({wl.get('api')}): {params}.",
        "",
    ]
    for warning in results["settings"].get("warnings", []):
        lines += [f"> **Warning**: {warning}", ""]
    for run in results["runs"]:
        lines += [
            f"## {run['label']}",
            "",
            f"Profile `{run['profile']}`, target `{run['target']}`.",
            "",
            "| rate | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p90 "
            "| ITL p99 | e2e p50 | cache hit | done | cut | rejected | errors | done tok/s "
            "| goodput tok/s | SLO met | queue p50 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
            "|---:|---:|---:|",
        ]
        for s in run["steps"]:
            hit = s.get("prefix_cache_hit_rate")
            lines.append(
                f"| {s['rate']:g} | {_f(s['requests_per_s'], digits=2)} "
                f"| {_f(s['output_tokens_per_s'])} | {_ms(s['ttft_p50_s'])} "
                f"| {_ms(s['ttft_p90_s'])} | {_ms(s['ttft_p99_s'])} | {_ms(s['itl_p50_s'])} "
                f"| {_ms(s['itl_p90_s'])} | {_ms(s['itl_p99_s'])} | {_ms(s['e2e_p50_s'])} "
                f"| {_pct(hit)} | {s['completed']} | {s['incomplete']} "
                f"| {s.get('rejected', '-')} | {s['errors']} "
                f"| {_f(s['completed_output_tokens_per_s'])} "
                f"| {_f(s.get('goodput_output_tokens_per_s'))} | {_pct(s.get('slo_attainment'))} "
                f"| {_ms(s.get('queue_wait_p50_s'))} |"
            )
        lines.append("")
        slo = next((s for s in run["steps"] if "slo_ttft_s" in s), None)
        if slo is not None:
            lines += [
                f"Rates per second of the arrival window. SLO: TTFT <= {slo['slo_ttft_s']:g} s, "
                f"mean ITL <= {slo['slo_itl_s'] * 1000:g} ms.",
                "",
            ]
        lines += _class_table(run)
    if len(results["runs"]) > 1:
        lines += _comparison(results["runs"])
    return "\n".join(lines)


def _class_table(run: RunResult) -> list[str]:
    """Per traffic class and rate, when the run had classes."""
    rows = []
    for s in run["steps"]:
        for name, c in s.get("classes", {}).items():
            rows.append(
                f"| {s['rate']:g} | {name} | {c.get('requests')} | {c.get('completed')} "
                f"| {c.get('rejected')} | {c.get('errors')} | {_ms(c.get('ttft_p50_s'))} "
                f"| {_ms(c.get('ttft_p90_s'))} | {_ms(c.get('queue_wait_p50_s'))} "
                f"| {_f(c.get('completed_output_tokens_per_s'))} "
                f"| {_f(c.get('goodput_output_tokens_per_s'))} | {_pct(c.get('slo_attainment'))} |"
            )
    if not rows:
        return []
    return [
        f"### {run['label']}: by traffic class",
        "",
        "| rate | class | requests | done | rejected | errors | TTFT p50 | TTFT p90 | queue p50 "
        "| done tok/s | goodput tok/s | SLO met |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _gain(v: float | None, base: float | None) -> str:
    return f"{(v / base - 1) * 100:+.0f}%" if v is not None and base else "-"


def _comparison(runs: list[RunResult]) -> list[str]:
    """Each run against the first, rate by rate (rates present in both)."""
    base = runs[0]
    by_rate = {s["rate"]: s for s in base["steps"]}
    lines = [f"## Against {base['label']}", ""]
    for run in runs[1:]:
        lines += [
            f"### {run['label']}",
            "",
            "| rate | out tok/s | vs base | goodput tok/s | vs base | TTFT p50 | base TTFT p50 "
            "| TTFT ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in run["steps"]:
            b = by_rate.get(s["rate"])
            if b is None:
                continue
            good, bgood = s.get("goodput_output_tokens_per_s"), b.get("goodput_output_tokens_per_s")
            t, bt = s["ttft_p50_s"], b["ttft_p50_s"]
            ratio = (
                f"{bt / t:.1f}x lower"
                if t and bt and bt >= t
                else (f"{t / bt:.1f}x higher" if t and bt else "-")
            )
            lines.append(
                f"| {s['rate']:g} | {_f(s['output_tokens_per_s'])} "
                f"| {_gain(s['output_tokens_per_s'], b['output_tokens_per_s'])} "
                f"| {_f(good)} | {_gain(good, bgood)} | {_ms(t)} | {_ms(bt)} | {ratio} |"
            )
        lines.append("")
    return lines


# ------------------------------------------------------------------------------ plots
_Series = tuple[tuple[str, str, str | None], ...]  # (step key, line style, legend suffix)
_PLOTS: tuple[tuple[str, str, _Series, bool, tuple[float, float] | None], ...] = (
    (THROUGHPUT_PNG, "output tokens/s", (("output_tokens_per_s", "-", None),), False, None),
    (TTFT_PNG, "TTFT (s)", (("ttft_p50_s", "-", "p50"), ("ttft_p90_s", ":", "p90")), True, None),
    (
        GOODPUT_PNG,
        "goodput (output tokens/s within the SLO)",
        (("goodput_output_tokens_per_s", "-", None),),
        False,
        None,
    ),
    (SLO_PNG, "SLO attainment", (("slo_attainment", "-", None),), False, (0.0, 1.02)),
)


def _slo_text(results: Results) -> str:
    for run in results["runs"]:
        for s in run["steps"]:
            if "slo_ttft_s" in s:
                return f"; SLO TTFT <= {s['slo_ttft_s']:g} s, ITL <= {s['slo_itl_s'] * 1000:g} ms"
    return ""


def plot(results: Results, out_dir: str | Path) -> list[Path]:
    """throughput.png, ttft.png, goodput.png and slo.png: one line per run against the
    offered rate (a run without a figure, from an older file, is left out of its plot)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in threads and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    out = Path(out_dir)
    wl = results["workload"]
    subtitle = f"{wl.get('name')} ({wl.get('api')})"
    slo = _slo_text(results)
    paths = []
    for name, ylabel, series, logy, ylim in _PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        positive = False
        for i, run in enumerate(results["runs"]):
            color = f"C{i % 10}"
            for key, style, tag in series:
                pts = [(s["rate"], s[key]) for s in run["steps"] if s.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                positive = positive or any(y > 0 for y in ys)
                label = run["label"] + (f" {tag}" if tag else "")
                ax.plot(xs, ys, style, marker="o", color=color, label=label, linewidth=1.6)
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        title = f"{ylabel} vs rate: {subtitle}"
        if name in (GOODPUT_PNG, SLO_PNG):
            title += slo
        ax.set_title(title, fontsize=9)
        if logy and positive:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif not logy:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
