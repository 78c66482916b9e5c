"""Helpers of the replicas tests: `lbproxy serve` subprocesses (with --workers), a real
redis-server on a free port, and reading per-worker samples from /metrics."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Serve:
    """`python -m lbproxy serve` (optionally --workers N), its stderr collected."""

    def __init__(self, config: Path, *extra: str, listening: int = 1) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy", "--log-level", "info", "serve", "--config",
             str(config), "--loop", "asyncio", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_count(r"lbproxy listening on http://", listening, 60)
        m = self.wait_for(r"lbproxy listening on (http://\S+)", 1)
        self.url = m.group(1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    def wait_count(self, pattern: str, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pattern) >= n:
                return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"not {n} x {pattern!r} in the log:\n{''.join(self.lines)}")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        self.wait_count(pattern, 1, timeout)
        for line in list(self.lines):
            if m := re.search(pattern, line):
                return m
        raise AssertionError(pattern)

    def stop(self) -> None:
        if self.proc.poll() is None:  # a supervisor passes SIGTERM on to its workers
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server (Debian's package) on a free port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (apt-get install redis-server)"
        self.exe = exe
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in url's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = []
    for fam in text_string_to_metric_families(text):
        out += [(dict(s.labels), s.value) for s in fam.samples if s.name == name]
    return out


def per_worker(url: str, name: str) -> dict[str, float]:
    """Sum of `name`'s samples by worker label."""
    out: dict[str, float] = {}
    for labels, value in samples(url, name):
        w = labels.get("worker", "")
        out[w] = out.get(w, 0.0) + value
    return out


COMPLETION = {"model": "fake-model", "prompt": "hello", "max_tokens": 1}


def post_fresh(url: str, n: int, body: dict[str, Any] = COMPLETION) -> list[int]:
    """n requests, each on a new connection (the kernel spreads connections, not requests,
    over the workers of `--workers`)."""
    out = []
    for _ in range(n):
        with httpx.Client(base_url=url, timeout=30) as c:
            out.append(c.post("/v1/completions", json=body).status_code)
    return out


def until(check: Callable[[], Any], timeout: float = 15.0, every: float = 0.2) -> Any:
    """`check()`'s first truthy value within `timeout` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
