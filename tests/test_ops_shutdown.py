"""A real `lbproxy serve` process: graceful shutdown on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers, write_config

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


class Serve:
    """`python -m lbproxy.cli serve` with its stderr collected in the background."""

    def __init__(self, config: Path, loop: str = "asyncio") -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy.cli", "--log-level", "info", "serve", "--config",
             str(config), "--loop", loop],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        m = self.wait_for(r"lbproxy listening on (http://\S+)", 60)
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path) -> Iterator[Any]:
    started: list[Serve] = []

    def make(cfg: dict[str, Any], loop: str = "asyncio") -> Serve:
        s = Serve(write_config(tmp_path / "lbproxy.yaml", cfg), loop)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class Stream(threading.Thread):
    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.first = threading.Event()
        self.text = ""
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": self.max_tokens, "stream": True}
        try:
            with (
                httpx.Client(timeout=60) as c,
                c.stream("POST", self.url + "/v1/completions", json=body) as r,
            ):
                for chunk in r.iter_text():
                    self.text += chunk
                    self.first.set()
        except Exception as e:  # a cut stream, when the grace period is over
            self.error = e
        self.first.set()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_lets_the_stream_finish_refuses_new_connections_and_exits_0(
    fake_backends, serve, loop
) -> None:
    pytest.importorskip(loop)
    (backend,) = fake_backends(1, chunk_delay=0.1)
    proc = serve(proxy_config([backend], shutdown_grace=20), loop)
    stream = Stream(proc.url, max_tokens=20)  # about 2 s
    stream.start()
    assert stream.first.wait(10) and stream.error is None
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    deadline = t0 + 3
    while not _refused(proc.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _refused(proc.port), "still accepting connections after SIGTERM"
    assert proc.proc.poll() is None  # still serving the stream in flight
    stream.join(30)
    assert stream.error is None
    assert stream.text.endswith("data: [DONE]\n\n") and '"error"' not in stream.text
    assert stream.text.count("data: ") == 21  # every chunk, then [DONE]
    assert proc.proc.wait(10) == 0
    assert time.monotonic() - t0 < 20
    proc.wait_for(r"SIGTERM: shutting down; 1 requests in flight", 1)
    proc.wait_for(r"lbproxy stopped", 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_grace_is_a_deadline(fake_backends, serve, loop) -> None:
    pytest.importorskip(loop)
    (backend,) = fake_backends(1, chunk_delay=0.1)
    grace = 3.0
    proc = serve(proxy_config([backend], shutdown_grace=grace), loop)
    stream = Stream(proc.url, max_tokens=300)  # about 30 s: longer than the grace
    stream.start()
    assert stream.first.wait(10)
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 0
    # the grace and about a second, not twice the grace (aiohttp's two waits)
    assert time.monotonic() - t0 < grace + 2
    stream.join(10)
    assert stream.error is None, stream.error  # a complete response, not a broken one
    # cut at the deadline, the stream ends as a mid-stream failure does: an error event
    text = stream.text
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    event = [e for e in text.split("\n\n") if e.startswith("data: {")][-1]
    error = orjson.loads(event.removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down"
    assert text.count("data: {") < 100  # cut: far from the 300 tokens
    # the backend saw the client go away (its request is aborted, its KV freed)
    deadline = time.monotonic() + 5
    while not backend.disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.disconnects
    proc.wait_for(r"cut 1 requests still in flight", 1)


def test_a_request_unanswered_at_the_deadline_gets_503(fake_backends, serve) -> None:
    (backend,) = fake_backends(1, stall_before_headers=30)
    proc = serve(proxy_config([backend], shutdown_grace=1))
    out: dict[str, Any] = {}

    def post() -> None:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
        try:
            r = httpx.post(proc.url + "/v1/completions", json=body, timeout=30)
            out.update(status=r.status_code, body=r.json())
        except Exception as e:
            out.update(error=e)

    t = threading.Thread(target=post)
    t.start()
    deadline = time.monotonic() + 10
    while not backend.received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.received  # lbproxy is waiting for the backend's answer
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 0
    t.join(10)
    assert out.get("status") == 503, out
    assert out["body"]["error"]["code"] == "server_shutting_down"


def test_a_second_sigterm_ends_the_process_at_once(fake_backends, serve) -> None:
    (backend,) = fake_backends(1, chunk_delay=0.1)
    proc = serve(proxy_config([backend], shutdown_grace=60))
    stream = Stream(proc.url, max_tokens=300)
    stream.start()
    assert stream.first.wait(10)
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for(r"SIGTERM: shutting down", 10)
    assert proc.proc.poll() is None  # waiting for the stream
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(10) == -signal.SIGTERM


def test_sighup_reloads_and_keeps_serving_on_a_bad_file(fake_backends, serve, tmp_path) -> None:
    b0, b1 = fake_backends(2)
    cfg = proxy_config([b0], admin={"token": "admin-secret"})
    proc = serve(cfg)
    path = tmp_path / "lbproxy.yaml"

    def names() -> list[str]:
        r = httpx.get(proc.url + "/admin/backends", headers=admin_headers(), timeout=10)
        return [b["name"] for b in r.json()["data"]]

    assert names() == ["be0"]
    write_config(path, proxy_config([b0, b1], admin={"token": "admin-secret"}))
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(r"config reloaded from", 10)
    assert names() == ["be0", "be1"]

    path.write_text("pools: [unclosed\n")
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(r"SIGHUP: config not reloaded, the running one stays: .*invalid YAML", 10)
    assert names() == ["be0", "be1"]
    with httpx.Client(base_url=proc.url) as c:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
        assert [c.post("/v1/completions", json=body).status_code for _ in range(4)] == [200] * 4
    assert len(b0.received) == len(b1.received) == 2
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 0
