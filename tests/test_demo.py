"""`lbproxy demo` as a new user runs it: the printed examples pasted into bash, and
`--workload`'s table, which must not depend on how busy the machine is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LBPROXY = [sys.executable, "-m", "lbproxy.cli"]


class Demo:
    """`lbproxy demo --port 0` in a subprocess, its banner collected."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [*LBPROXY, "demo", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while not any("Ctrl-C to stop." in ln for ln in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "no banner:\n" + "".join(self.lines)
            time.sleep(0.05)
        self.banner = "".join(self.lines)
        self.url = re.search(r"OpenAI base URL:\s+(http://\S+)/v1", self.banner).group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def command(self, first: str) -> str:
        """The command that starts with `first`, with its continuation lines, as printed."""
        lines = self.banner.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(first))
        end = start
        while lines[end].endswith("\\"):
            end += 1
        return "\n".join(lines[start : end + 1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    d = Demo()
    try:
        yield d
    finally:
        d.stop()


def test_printed_curl_works_when_pasted_into_bash(demo: Demo) -> None:
    curl = demo.command("curl ")
    r = subprocess.run(
        ["bash", "-c", curl + " -sS -w '\\n%{http_code}'"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    body, status = r.stdout.rsplit("\n", 1)
    assert status == "200", r.stdout
    assert json.loads(body)["choices"][0]["message"]["content"]


def test_python_example_comes_with_its_install_line_and_works(demo: Demo) -> None:
    lines = demo.banner.splitlines()
    python_at = next(i for i, ln in enumerate(lines) if ln.strip().startswith("python -c"))
    assert lines[python_at - 1].strip() == "pip install openai"
    # `python` here is this interpreter, which has openai (the test extra).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", "-c", demo.command("python -c")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_banner_points_at_the_dashboard(demo: Demo) -> None:
    m = re.search(r"Dashboard:\s+(\S+)", demo.banner)
    assert m and m.group(1) == demo.url + "/dashboard"
    r = httpx.get(m.group(1), timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


def _workload(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LBPROXY, "demo", "--workload", "--duration", "20", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _busy_cpus(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_workload_table_is_the_same_on_a_busy_machine() -> None:
    quiet = _workload()
    hogs = _busy_cpus(os.cpu_count() or 2)
    try:
        busy = _workload()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert quiet.returncode == 0 and busy.returncode == 0, quiet.stderr + busy.stderr
    assert busy.stdout == quiet.stdout
    assert "virtual time" in quiet.stdout
    table = [ln for ln in quiet.stdout.splitlines() if ln.startswith("|")]
    assert [ln.split("|")[1].strip() for ln in table[2:]] == ["round-robin", "cache-aware"]
    for row in table[2:]:
        assert row.rstrip("|").rsplit("|", 1)[1].strip() == "0"  # errors
    # The table is printed in one block, nothing (a warning) inside it.
    out = quiet.stdout.splitlines()
    first = out.index(table[0])
    assert out[first : first + len(table)] == table


def test_workload_refuses_speed() -> None:
    r = _workload("--speed", "10")
    assert r.returncode == 2
    assert "virtual time" in r.stderr and "Traceback" not in r.stderr


def _lbproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LBPROXY, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _table(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("|")]


def test_workload_out_writes_results_that_table_prints_again(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _workload("--out", str(out))
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["tool"] == "lbproxy demo --workload"
    assert data["settings"]["command"] == (
        "lbproxy demo --workload --profiles round-robin,cache-aware --rate 8 --duration 20 "
        f"--out {out}"
    )
    again = _lbproxy("demo", "--table", str(out))
    assert again.returncode == 0, again.stderr
    assert _table(again.stdout) == _table(run.stdout) and len(_table(run.stdout)) == 4
    assert data["settings"]["command"] in again.stdout


def test_committed_demo_table_is_what_its_command_prints() -> None:
    # benchmarks/results/demo holds the figures quoted in the docs: its recorded command,
    # run again (without --out), must print the same table.
    shown = _lbproxy("demo", "--table", "benchmarks/results/demo")
    assert shown.returncode == 0, shown.stderr
    command = json.loads((ROOT / "benchmarks/results/demo/results.json").read_text())["settings"][
        "command"
    ]
    words = command.split()
    assert words[:3] == ["lbproxy", "demo", "--workload"] and words[-2] == "--out"
    rerun = _lbproxy(*words[1:-2])
    assert rerun.returncode == 0, rerun.stderr
    assert _table(rerun.stdout) == _table(shown.stdout)
    assert [ln.split("|")[1].strip() for ln in _table(shown.stdout)[2:]] == [
        "round-robin",
        "cache-aware",
    ]


def test_table_of_a_missing_file_is_one_line() -> None:
    r = _lbproxy("demo", "--table", "no/such/dir")
    assert r.returncode == 2
    assert "--table" in r.stderr and "cannot read" in r.stderr and "Traceback" not in r.stderr
