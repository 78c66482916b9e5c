"""`kill -HUP` while `lbproxy serve` starts: it must not end the process (SIGHUP's default
action: exit 129, nothing logged); the signal is logged and reloads the config once the
proxy serves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import write_config

ROOT = Path(__file__).resolve().parent.parent


def _catches_sighup(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGHUP (bit 0 of SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


# `python -m lbproxy.cli`, and the `lbproxy` console script's entry point (which holds
# SIGHUP before importing the CLI and its libraries).
ENTRY_POINTS = {
    "module": ["-m", "lbproxy.cli"],
    "console-script": ["-c", "import sys; from lbproxy.console import main; sys.exit(main())"],
}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_sighup_during_start_up_is_logged_and_reloads_once_serving(
    tmp_path: Path, entry: str
) -> None:
    cfg = write_config(tmp_path / "lbproxy.yaml", proxy_config(["http://127.0.0.1:9"]))
    proc = subprocess.Popen(
        [sys.executable, *ENTRY_POINTS[entry], "--log-level", "info", "serve", "--config",
         str(cfg), "--port", "0", "--loop", "asyncio"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if m := re.search(pattern, line):
                    return m
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r}; exit {proc.poll()}; log:\n{''.join(lines)}")

    try:
        # The earliest moment a SIGHUP can be survived at all: its handler is in place.
        deadline = time.monotonic() + 60
        while not _catches_sighup(proc.pid):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "serve never handled SIGHUP"
            time.sleep(0.002)
        proc.send_signal(signal.SIGHUP)

        url = wait_for(r"lbproxy listening on (http://\S+)").group(1)
        wait_for(r"SIGHUP during start-up: reloading the config", 10)
        wait_for(r"config reloaded from", 10)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        reader.join(5)
        assert proc.stderr is not None
        proc.stderr.close()
