"""Failures: disconnects, dead or failing backends, timeouts, mid-stream deaths."""

from __future__ import annotations

import socket
import time

import httpx
import orjson

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_client_disconnect_closes_upstream_within_a_second(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, chunk_delay=0.05)
    proxy = run_proxy(proxy_config([backend]))
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(timeout=10) as c,
        c.stream("POST", proxy.url + "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: ")
        left = time.monotonic()
    # leaving the with-block closed the client connection mid-stream
    deadline = left + 3.0
    while not backend.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.disconnects, "the backend never saw the disconnect"
    assert backend.disconnects[0] - left < 1.5
    assert backend.in_progress == 0


def test_dead_and_failing_backends_are_skipped(fake_backends, run_proxy) -> None:
    good = fake_backends(2)
    failing = fake_backends(1, fail_status=503)[0]
    dead = _closed_port_url()
    # Passive failover only: active checks would eject both before the first request.
    proxy = run_proxy(proxy_config([good[0], dead, failing, good[1]], health={"active": False}))
    with httpx.Client(base_url=proxy.url) as c:
        statuses = [c.post("/v1/completions", json=BODY).status_code for _ in range(40)]
    assert statuses == [200] * 40
    assert len(good[0].received) + len(good[1].received) == 40
    forwarder = proxy.state.forwarder
    assert forwarder is not None
    # round-robin meets the dead and the failing backend once per 4 requests each
    assert 0 < forwarder.retries <= 40 * 2


def test_retries_are_bounded_and_all_down_is_502(fake_backends, run_proxy) -> None:
    failing = fake_backends(4, fail_status=503)
    cfg = proxy_config(failing, health={"active": False})  # the forwarder's own retries
    cfg["limits"] = {"max_attempts": 2}
    proxy = run_proxy(cfg)
    r = httpx.post(proxy.url + "/v1/completions", json=BODY)
    # the last attempt's 503 is relayed as the backend sent it
    assert r.status_code == 503
    assert sum(len(b.received) for b in failing) == 2

    dead = [_closed_port_url() for _ in range(3)]
    proxy2 = run_proxy(proxy_config(dead, health={"active": False}))
    r2 = httpx.post(proxy2.url + "/v1/completions", json=BODY)
    assert r2.status_code == 502
    err = r2.json()["error"]
    assert err["code"] == "upstream_unreachable" and err["type"] == "upstream_error"
    # the request id to quote; which backends failed is for the log only
    assert r2.headers["x-request-id"] in err["message"]
    assert not any(f"be{i}" in err["message"] for i in range(3))


def test_first_byte_timeout_is_504(fake_backends, run_proxy) -> None:
    (slow,) = fake_backends(1, stall_before_headers=3.0)
    cfg = proxy_config([slow])
    cfg["timeouts"] = {"first_byte": 0.5}
    proxy = run_proxy(cfg)
    t0 = time.monotonic()
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, timeout=10)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 2.5


def test_backend_dying_mid_stream_ends_with_error_event(fake_backends, run_proxy) -> None:
    (dying,) = fake_backends(1, die_after_chunks=3)
    proxy = run_proxy(proxy_config([dying]))
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 10, "stream": True}
    with httpx.Client(timeout=10) as c:
        r = c.post(proxy.url + "/v1/completions", json=body)
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 5  # 3 chunks, the error, [DONE]
    err = orjson.loads(events[3].removeprefix("data: "))["error"]
    assert err["code"] == "upstream_disconnected" and "be0" not in err["message"]
    assert r.headers["x-request-id"] in err["message"]
    assert events[4] == "data: [DONE]"


def test_idle_timeout_mid_stream_ends_with_error_event(fake_backends, run_proxy) -> None:
    (stalling,) = fake_backends(1, chunk_delay=2.0)
    cfg = proxy_config([stalling])
    cfg["timeouts"] = {"idle": 0.5}
    proxy = run_proxy(cfg)
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 5, "stream": True}
    r = httpx.post(proxy.url + "/v1/completions", json=body, timeout=10)
    events = [e for e in r.text.split("\n\n") if e]
    assert orjson.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "t0 "
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    assert events[-1] == "data: [DONE]"
