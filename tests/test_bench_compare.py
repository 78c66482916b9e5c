"""`lbproxy bench --compare`, as a user runs it: every run labelled with how it was measured
(live or sim) and its profile, a warning when the workloads differ, and no --out needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbproxy.bench import report

ROOT = Path(__file__).resolve().parent.parent
FLEET = str(ROOT / "configs" / "fleets" / "a-4.yaml")
WORKLOAD = [
    "--workload", "shared-prefix", "--num-groups", "2", "--num-prompts-per-group", "2",
    "--system-prompt-len", "100", "--output-len", "5", "--rates", "2", "--duration", "3",
    "--quiet", "--no-plots",
]  # fmt: skip


def lbproxy(*argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three result directories: simulated and live runs of one workload, and a simulated
    run of another (a longer question)."""
    base = tmp_path_factory.mktemp("runs")
    commands = {
        "sim": ["simulate", "--fleet", FLEET, "--profiles", "round-robin", "--question-len", "20"],
        "live": ["bench", "--fleet", FLEET, "--speed", "10", "--profile", "cache-aware",
                 "--label", "ca-live", "--question-len", "20"],
        "sim40": ["simulate", "--fleet", FLEET, "--profiles", "cache-aware",
                  "--question-len", "40"],
    }  # fmt: skip
    for name, argv in commands.items():
        r = lbproxy(*argv, *WORKLOAD, "--out", str(base / name))
        assert r.returncode == 0, r.stderr
    return {name: base / name for name in commands}


def test_compare_labels_every_run_and_needs_no_out(runs: dict[str, Path]) -> None:
    r = lbproxy("bench", "--compare", str(runs["sim"]), str(runs["live"]), "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr  # one workload
    written = runs["sim"].parent / "compare-sim-live"  # next to the first input
    assert f"wrote {written}" in r.stdout
    res = report.load_results(written)
    assert [run["label"] for run in res["runs"]] == [
        "round-robin [sim]",
        "ca-live [live, cache-aware]",
    ]
    md = (written / "results.md").read_text()
    assert "## round-robin [sim]" in md and "## ca-live [live, cache-aware]" in md
    assert "Warning" not in md
    assert "## round-robin [sim]" in r.stdout  # the table is printed too


def test_compare_warns_when_workloads_differ(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    r = lbproxy(
        "bench", "--compare", str(runs["sim"]), str(runs["sim40"]), "--out", str(out), "--quiet"
    )
    assert r.returncode == 0, r.stderr
    warning = r.stderr.strip()
    assert warning.startswith("warning: the compared runs' workloads differ")
    assert f"params.question_len: 20 ({runs['sim']}) vs 40 ({runs['sim40']})" in warning
    assert "system_prompt_len" not in warning  # only what differs
    assert "> **Warning**: the compared runs' workloads differ" in (out / "results.md").read_text()
    assert [run["label"] for run in report.load_results(out)["runs"]] == [
        "round-robin [sim]",
        "cache-aware [sim]",
    ]


def test_a_run_still_needs_out() -> None:
    r = lbproxy("bench", "--target", "http://127.0.0.1:9", "--rates", "1")
    assert r.returncode == 2
    assert "bench needs --out DIR" in r.stderr
