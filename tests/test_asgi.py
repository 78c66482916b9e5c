"""lbproxy's ASGI face (lbproxy/asgi.py): `uvicorn lbproxy.asgi:app` as a real process,
its start-up errors, and what only the ASGI side does (body limits as it reads them, the
shutdown's cut). The client-facing behaviour both faces share is tested by the modules
that list PROXY_FACES (test_proxy_*.py, test_flow_proxy.py)."""

from __future__ import annotations

import os
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
import openai
import orjson
import pytest

from tests.conftest import LoopThread, proxy_config
from tests.ops_helpers import write_config

PROXY_FACES = ("native", "asgi")
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _uvicorn(env_config: str | None, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LBPROXY_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    if env_config is not None:
        env["LBPROXY_CONFIG"] = env_config
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "lbproxy.asgi:app", "--host", "127.0.0.1",
         "--port", str(port), "--loop", "uvloop", "--http", "httptools"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT),
    )  # fmt: skip


@pytest.fixture
def uvicorn_proc() -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def make(env_config: str | None, port: int) -> subprocess.Popen[str]:
        p = _uvicorn(env_config, port)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stderr is not None:
            p.stderr.close()


def test_uvicorn_serves_a_completion_and_a_stream_via_the_openai_client(
    fake_backends, tmp_path, uvicorn_proc
) -> None:
    backends = fake_backends(2)
    path = write_config(tmp_path / "lbproxy.yaml", proxy_config(backends))
    port = _free_port()
    proc = uvicorn_proc(str(path), port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # up once /health answers (lifespan startup done)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "uvicorn never answered /health"
        time.sleep(0.1)

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="fake-model", prompt="hello", max_tokens=3)
    assert done.choices[0].text
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices]
    assert len(pieces) == 4 and all(pieces)
    assert sum(len(b.received) for b in backends) == 2
    # operator routes: the same aiohttp handlers
    assert httpx.get(url + "/ready").json()["ready"] is True
    assert "lbproxy_" in httpx.get(url + "/metrics").text
    assert [m.id for m in client.models.list()] == ["fake-model"]

    proc.send_signal(signal.SIGTERM)  # lifespan shutdown: background tasks stop
    # uvicorn re-raises the signal it handled once it has shut down (hence -SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "Application shutdown complete" in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("what", ["unset", "missing file", "invalid key"])
def test_startup_error_names_the_variable_and_exits_non_zero(
    tmp_path, uvicorn_proc, what: str
) -> None:
    if what == "unset":
        env_config = None
    elif what == "missing file":
        env_config = str(tmp_path / "nowhere.yaml")
    else:
        env_config = str(
            write_config(tmp_path / "bad.yaml", {"pools": [{"name": "p", "backends": 5}]})
        )
    proc = uvicorn_proc(env_config, _free_port())
    assert proc.wait(60) != 0
    assert proc.stderr is not None
    errors = [ln for ln in proc.stderr.read().splitlines() if "LBPROXY_CONFIG" in ln]
    assert errors, "no line names LBPROXY_CONFIG"
    line = errors[0]
    if what == "unset":
        assert "LBPROXY_CONFIG is not set" in line
    else:
        assert env_config is not None and env_config in line
    if what == "invalid key":
        assert "backends" in line


def test_a_chunked_body_past_the_limit_is_413(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend])
    cfg["limits"] = {"max_body_bytes": 1000}
    proxy = run_proxy(cfg)

    def body() -> Iterator[bytes]:
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = httpx.post(proxy.url + "/v1/completions", content=body(), timeout=10)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert not backend.received


def _stream_lines(url: str, out: list[bytes], started: threading.Event) -> None:
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 1000, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as r:
        for chunk in r.iter_raw():
            out.append(chunk)
            started.set()


def _cut_event(data: bytes) -> dict[str, Any]:
    events = [e for e in data.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    return orjson.loads(events[-2].removeprefix(b"data: "))  # type: ignore[no-any-return]


@pytest.fixture
def asgi_proxy(loop_thread: LoopThread) -> Iterator[Any]:
    """Start the ASGI face under uvicorn (in the loop thread) with uvicorn options."""
    from lbproxy.config import parse_config
    from tests.asgi_face import AsgiProxy, start_asgi_proxy

    started: list[AsgiProxy] = []

    def make(cfg: dict[str, Any], **uvicorn_kw: Any) -> AsgiProxy:
        p = loop_thread.run(start_asgi_proxy(parse_config(cfg), **uvicorn_kw))
        started.append(p)
        return p

    yield make
    for p in started:
        loop_thread.run(p.close())


def test_shutdown_grace_over_cuts_a_stream_with_the_error_event(
    fake_backends, loop_thread: LoopThread, asgi_proxy
) -> None:
    (slow,) = fake_backends(1, chunk_delay=0.05)
    cfg = proxy_config([slow])
    cfg["shutdown_grace"] = 0.5
    proxy = asgi_proxy(cfg)
    out: list[bytes] = []
    started = threading.Event()
    t = threading.Thread(target=_stream_lines, args=(proxy.url + "/v1/completions", out, started))
    t.start()
    assert started.wait(10)
    t0 = time.monotonic()
    loop_thread.run(proxy.app.shutdown())  # the lifespan shutdown's own drain and cut
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 5  # shutdown_grace 0.5 s, then the cut
    assert _cut_event(b"".join(out))["error"]["code"] == "server_shutting_down"
    deadline = time.monotonic() + 3
    while not slow.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.disconnects, "the upstream request was not closed"


def test_uvicorn_graceful_timeout_cuts_a_stream_and_answers_the_unanswered_503(
    fake_backends, loop_thread: LoopThread, asgi_proxy
) -> None:
    (slow,) = fake_backends(1, chunk_delay=0.05)
    (stalled,) = fake_backends(1, stall_before_headers=30)
    p1 = asgi_proxy(proxy_config([slow]), timeout_graceful_shutdown=1)
    p2 = asgi_proxy(proxy_config([stalled]), timeout_graceful_shutdown=1)
    out: list[bytes] = []
    started = threading.Event()
    t = threading.Thread(target=_stream_lines, args=(p1.url + "/v1/completions", out, started))
    t.start()
    got: list[httpx.Response] = []
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
    t2 = threading.Thread(
        target=lambda: got.append(httpx.post(p2.url + "/v1/completions", json=body, timeout=30))
    )
    t2.start()
    assert started.wait(10)
    deadline = time.monotonic() + 5
    while not stalled.received and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    loop_thread.run(p1.close())  # uvicorn waits 1 s, cancels the request, then lifespan
    loop_thread.run(p2.close())
    t.join(10)
    t2.join(10)
    assert time.monotonic() - t0 < 10  # 1 s each, then the cut
    assert _cut_event(b"".join(out))["error"]["code"] == "server_shutting_down"
    assert got and got[0].status_code == 503
    assert got[0].json()["error"]["code"] == "server_shutting_down"


def test_with_state_redis_the_data_path_goes_through_the_aiohttp_app(
    fake_backends, asgi_proxy
) -> None:
    """state.redis puts a middleware on the aiohttp app: POST /v1/* is then relayed to
    it, as the native server hands it to aiohttp, and still streams byte for byte."""
    from tests.replicas_support import RedisServer

    redis = RedisServer().start()
    try:
        backends = fake_backends(2)
        proxy = asgi_proxy(proxy_config(backends, state={"redis": redis.url}))
        assert proxy.app.direct is False
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 5, "stream": True}
        r = httpx.post(proxy.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e]
        assert len(events) == 6 and events[-1] == "data: [DONE]"
        assert r.headers["x-request-id"]
        r2 = httpx.post(proxy.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r2.status_code == 404 and r2.json()["error"]["code"] == "model_not_found"
        assert sum(len(b.received) for b in backends) == 1
    finally:
        redis.stop()
