"""Client-side limits: header and body timeouts, keep-alive, connection cap, body memory.

Each test opens raw sockets against a real lbproxy and checks what a misbehaving client
gets, and that well-behaved clients keep being served."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from lbproxy.config import ConfigError, parse_config
from tests import raw_http
from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers, start_proxy_from_file, write_config
from tests.test_ops_shutdown import serve  # noqa: F401  (a fixture: lbproxy in a subprocess)

KEY = "client-key-123"
BODY = b'{"model": "fake-model", "prompt": "x", "max_tokens": 1}'


def _post(body: bytes = BODY, *, close: bool = True, key: str | None = None) -> bytes:
    headers = [(b"Content-Type", b"application/json")]
    if close:
        headers.append((b"Connection", b"close"))
    if key is not None:
        headers.append((b"Authorization", b"Bearer " + key.encode()))
    return raw_http.http_request("POST", "/v1/completions", headers, body)


def _one_response(sock) -> raw_http.RawResponse:
    """Read exactly one response with a Content-Length body from a kept-alive socket."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    length = int(head.split("content-length:")[1].split("\r\n")[0])
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        data += sock.recv(65536)
    (resp,) = raw_http.parse_responses(data)
    return resp


def test_slow_request_headers_are_cut_at_the_header_timeout(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"client_header_timeout": 1}))
    with raw_http.connect(proxy.port) as idle, raw_http.connect(proxy.port) as slow:
        t0 = time.monotonic()
        closed = False
        for byte in _post():  # a byte every 0.2 s: the headers never complete in time
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 8:
                break
        assert closed or raw_http.closed_within(slow, 1), "the slow sender is still connected"
        assert time.monotonic() - t0 < 1 + 5
        # a connection that sends nothing at all is closed by then too
        assert raw_http.closed_within(idle, 2)
    (resp,) = raw_http.request(proxy.port, _post())  # others are served
    assert resp.status == 200


def test_a_trickled_body_gets_408_and_frees_the_key_slot(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend],
        auth={"api_keys": [KEY], "max_concurrent_per_key": 1},
        limits={"client_body_timeout": 1},
    )
    proxy = run_proxy(cfg)
    raw = _post(key=KEY)
    with raw_http.connect(proxy.port) as s:
        t0 = time.monotonic()
        s.sendall(raw[:-10])  # the headers and most of the body, then nothing
        answer = raw_http.read_all(s, 10)
        elapsed = time.monotonic() - t0
    (resp,) = raw_http.parse_responses(answer)
    assert resp.status == 408, resp
    assert orjson.loads(resp.body)["error"]["code"] == "request_timeout"
    assert elapsed < 1 + 5
    (resp,) = raw_http.request(proxy.port, raw)  # the key's one slot is free again
    assert resp.status == 200
    assert len(backend.received) == 1


def test_a_body_trickled_without_long_gaps_is_cut_by_the_minimum_rate(
    fake_backends, run_proxy
) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend],
        auth={"api_keys": [KEY], "max_concurrent_per_key": 1},
        limits={"client_body_timeout": 1, "client_body_min_rate": 100},
    )
    proxy = run_proxy(cfg)
    raw = _post(key=KEY)
    head_len = raw.index(b"\r\n\r\n") + 4
    with raw_http.connect(proxy.port) as s:
        t0 = time.monotonic()
        s.sendall(raw[:head_len])
        answer = b""
        for byte in raw[head_len:]:  # 5 bytes/s: no gap reaches the 1 s timeout
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            s.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                answer += s.recv(65536)
            if answer or time.monotonic() - t0 > 8:
                break
        answer += raw_http.read_all(s, 5)
    (resp,) = raw_http.parse_responses(answer)
    assert resp.status == 408, resp
    assert time.monotonic() - t0 < 1 + 5  # 1 s plus (bytes so far / 100) s, not 10 s
    (resp,) = raw_http.request(proxy.port, raw)  # the key's one slot is free again
    assert resp.status == 200


def test_an_idle_keepalive_connection_is_closed(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"client_keepalive_timeout": 1}))
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(close=False))
        assert _one_response(s).status == 200
        t0 = time.monotonic()
        assert raw_http.closed_within(s, 1 + 5)
        assert time.monotonic() - t0 > 0.5  # kept alive for a while, not closed at once


def test_connections_beyond_the_cap_are_refused_while_the_others_work(
    fake_backends, run_proxy
) -> None:
    (backend,) = fake_backends(1)
    n = 3
    proxy = run_proxy(proxy_config([backend], limits={"max_client_connections": n}))
    socks = [raw_http.connect(proxy.port) for _ in range(n)]
    try:
        for s in socks:
            s.sendall(_post(close=False))
            assert _one_response(s).status == 200
        with raw_http.connect(proxy.port) as extra:
            t0 = time.monotonic()
            (resp,) = raw_http.parse_responses(raw_http.read_all(extra, 10))
            assert time.monotonic() - t0 < 5  # at once, without a request
        assert resp.status == 503
        assert resp.headers["retry-after"] == "1"
        assert orjson.loads(resp.body)["error"]["code"] == "too_many_connections"
        for s in socks:  # the first N keep working
            s.sendall(_post(close=False))
            assert _one_response(s).status == 200
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)  # their slots are free again once they are closed
    (resp,) = raw_http.request(proxy.port, _post())
    assert resp.status == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_beyond_the_memory_budget_are_503(fake_backends, run_proxy, chunked) -> None:
    (backend,) = fake_backends(1)
    budget = 100_000
    proxy = run_proxy(proxy_config([backend], limits={"max_buffered_body_bytes": budget}))
    big = b'{"model": "fake-model", "prompt": "' + b"x" * 70_000 + b'", "max_tokens": 1}'

    def head(length: int | None) -> bytes:
        te = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
        return (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + te + b"\r\n\r\n"
        )

    with raw_http.connect(proxy.port) as first:
        if chunked:  # 70 KB of a chunked body held, not finished
            first.sendall(head(None) + b"%x\r\n" % (len(big) - 10) + big[:-10] + b"\r\n")
        else:  # a Content-Length of 70 KB: counted at once, before its body arrives
            first.sendall(head(len(big)) + big[:100])
        time.sleep(0.5)
        with raw_http.connect(proxy.port) as second:
            t0 = time.monotonic()
            second.sendall(head(len(big)))  # no body sent: refused from its headers
            resp = _one_response(second)
            assert time.monotonic() - t0 < 5
        assert resp.status == 503, resp
        assert resp.headers["retry-after"] == "1"
        assert orjson.loads(resp.body)["error"]["code"] == "body_buffer_full"
        if chunked:
            first.sendall(b"a\r\n" + big[-10:] + b"\r\n0\r\n\r\n")
        else:
            first.sendall(big[100:])
        (resp,) = raw_http.parse_responses(raw_http.read_all(first, 10))
        assert resp.status == 200
    (resp,) = raw_http.request(proxy.port, _post(big))  # the budget was given back
    assert resp.status == 200
    assert [r.body for r in backend.received] == [big, big]


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_is_bounded_by_the_body_budget(fake_backends, serve) -> None:  # noqa: F811
    """lbproxy in its own process: six 16 MiB bodies at once under a 32 MiB budget."""
    (backend,) = fake_backends(1)
    mib = 1024 * 1024
    budget = 32 * mib
    proc = serve(proxy_config([backend], limits={"max_buffered_body_bytes": budget}))
    body = b'{"model": "fake-model", "prompt": "' + b"x" * (16 * mib - 100) + b'"}'
    before = _vm_hwm_kib(proc.proc.pid)
    statuses: list[int] = []

    def one() -> None:
        with httpx.Client(timeout=60) as c:
            r = c.post(proc.url + "/v1/completions", content=body)
            statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    grown = (_vm_hwm_kib(proc.proc.pid) - before) * 1024
    assert 200 in statuses and set(statuses) <= {200, 503}, statuses
    # Each body held costs about three times its size (the buffer, the parsed JSON, the
    # socket's send buffer): bounded by the budget, not by six bodies (about 290 MB).
    assert grown < 5 * budget, f"peak RSS grew by {grown / mib:.0f} MiB"


def test_a_reload_reports_client_limits_as_needing_a_restart(fake_backends, loop_thread, tmp_path):
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend], admin={"token": "admin-secret"})
    path = write_config(tmp_path / "lbproxy.yaml", cfg)
    proxy = loop_thread.run(start_proxy_from_file(path))
    try:
        write_config(path, {**cfg, "limits": {"client_body_timeout": 5}})
        r = httpx.post(proxy.url + "/admin/reload", headers=admin_headers(), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["restart_required"] == ["limits.client_body_timeout"]
    finally:
        loop_thread.run(proxy.close())


@pytest.mark.parametrize(
    "limits, key",
    [
        ({"client_body_timeout": 0}, "limits.client_body_timeout"),
        ({"max_client_connections": 0}, "limits.max_client_connections"),
        ({"max_buffered_body_bytes": -1}, "limits.max_buffered_body_bytes"),
        ({"client_body_min_rate": "fast"}, "limits.client_body_min_rate"),
    ],
)
def test_bad_client_limits_name_the_file_and_key(limits, key) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(proxy_config(["http://127.0.0.1:1"], limits=limits), "lbproxy.yaml")
    assert str(err.value).startswith(f"lbproxy.yaml: {key}: "), err.value
