"""The native server's own edges (lbproxy/proxy/native_server.py): plain POST /v1/*
requests are served by lbproxy's protocol, anything else is handed to aiohttp from that
request's first byte; keep-alive, pipelining, clients leaving, the connection cap."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from lbproxy.proxy.native_head import parse_head
from tests import raw_http
from tests.conftest import proxy_config


def _body(n: int = 2, stream: bool = False, pad: int = 0) -> bytes:
    return orjson.dumps(
        {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi" + "x" * pad}],
            "max_tokens": n,
            "stream": stream,
        }
    )


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (extra, len(body), body)
    )


def _complete(data: bytes) -> list[raw_http.RawResponse]:
    """The complete responses at the start of `data` (a partial last one is left out)."""
    out = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return out
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                return out
            body, data = rest[:n], rest[n:]
        else:
            body = b""
            while True:
                size_line, sep, tail = rest.partition(b"\r\n")
                if not sep:
                    return out
                n = int(size_line or b"0", 16)
                if len(tail) < n + 2:
                    return out
                if n == 0:
                    rest = tail[2:]
                    break
                body += tail[:n]
                rest = tail[n + 2 :]
            data = rest
        out.append(raw_http.RawResponse(int(lines[0].split()[1]), headers, body))


def _read(sock: socket.socket, n: int, timeout: float = 10.0) -> list[raw_http.RawResponse]:
    sock.settimeout(timeout)
    data = b""
    while len(got := _complete(data)) < n:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(got)} of {n} responses"
        data += chunk
    return got


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_parse_head_takes_only_plain_requests() -> None:
    ok = b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h\r\nX-A:\tv \r\nContent-Length: 12\r\n\r\n"
    assert parse_head(ok, ok.index(b"\r\n\r\n") + 2) == (
        "/v1/x?a=1",
        [("Host", "h"), ("X-A", "v"), ("Content-Length", "12")],
        12,
    )
    refused = [
        b"GET /v1/x HTTP/1.1\r\nContent-Length: 1\r\n",
        b"POST /v1/x HTTP/1.0\r\nContent-Length: 1\r\n",
        b"POST /v1/%2e%2e/x HTTP/1.1\r\nContent-Length: 1\r\n",
        b"POST /v1/./x HTTP/1.1\r\nContent-Length: 1\r\n",
        b"POST /v1/x HTTP/1.1\r\n",  # no Content-Length
        b"POST /v1/x HTTP/1.1\r\nContent-Length: +1\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding : chunked\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\n Transfer-Encoding: chunked\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Encoding: gzip\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nConnection: close\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nX: a\x00b\r\n",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nHost: a\r\nHost: b\r\n",
    ]
    for head in refused:
        assert parse_head(head, len(head)) is None, head


def test_keep_alive_requests_are_native_and_byte_exact(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    native = proxy.native
    assert native is not None
    bodies = [_body(1), _body(2, pad=5), _body(3, pad=70_000)]  # the last in pieces
    with raw_http.connect(proxy.port) as s:
        for body in bodies:
            s.sendall(_post(body))
            (resp,) = _read(s, 1)
            assert resp.status == 200
            assert resp.headers["content-length"] == str(len(resp.body))
            assert "x-request-id" in resp.headers
    assert [r.digest for r in backend.received] == [hashlib.sha256(b).hexdigest() for b in bodies]
    assert native.served == 3 and native.handed_over == 0


def test_a_body_in_pieces_is_waited_for(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    body = _body(2, pad=3000)
    raw = _post(body)
    with raw_http.connect(proxy.port) as s:
        for i in range(0, len(raw), 1000):
            s.sendall(raw[i : i + 1000])
            time.sleep(0.02)
        (resp,) = _read(s, 1)
    assert resp.status == 200
    assert backend.received[0].body == body
    assert proxy.native is not None and proxy.native.served == 1


def test_pipelined_requests_are_answered_in_order(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    with raw_http.connect(proxy.port) as s:
        s.sendall(b"".join(_post(_body(n)) for n in (3, 1, 2)))
        answers = _read(s, 3)
    tokens = [orjson.loads(r.body)["usage"]["completion_tokens"] for r in answers]
    assert tokens == [3, 1, 2]
    assert proxy.native is not None and proxy.native.served == 3


def test_a_request_aiohttp_must_read_takes_the_connection_over(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    native = proxy.native
    assert native is not None
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_body(4)), _body(4))
    )
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(_body(1)))
        assert _read(s, 1)[0].status == 200
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        (models,) = _read(s, 1)
        assert models.status == 200
        assert orjson.loads(models.body)["data"][0]["id"] == "fake-model"
        s.sendall(_post(_body(2)))  # aiohttp's connection now
        assert _read(s, 1)[0].status == 200
    assert native.served == 1 and native.handed_over == 1
    # In one write: a native request, then one that is not (pipelined).
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(_body(1)) + chunked)
        answers = _read(s, 2)
    assert [orjson.loads(r.body)["usage"]["completion_tokens"] for r in answers] == [1, 4]
    assert native.served == 2 and native.handed_over == 2


def test_a_client_leaving_mid_body_frees_its_budget(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    native = proxy.native
    assert native is not None
    budget = proxy.runner.limits.budget
    body = _body(2, pad=5000)
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(body)[:-3000])
        _wait_for(lambda: budget.used == len(body))  # held while the body is read
    _wait_for(lambda: budget.used == 0 and not native.connections)
    assert backend.received == []


def test_a_client_leaving_mid_stream_closes_the_upstream(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, chunk_delay=0.05)
    proxy = run_proxy(proxy_config([backend]))
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(_body(200, stream=True)))
        s.settimeout(10)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
        t_left = time.monotonic()
    _wait_for(lambda: bool(backend.disconnects))
    assert backend.disconnects[0] - t_left < 5
    assert proxy.native is not None
    _wait_for(lambda: not proxy.native.connections and not proxy.runner.in_flight)


def test_the_connection_cap_counts_both_kinds(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"max_client_connections": 2}))
    native = proxy.native
    assert native is not None
    a = raw_http.connect(proxy.port)
    b = raw_http.connect(proxy.port)
    try:
        a.sendall(_post(_body(1)))  # stays a native connection
        assert _read(a, 1)[0].status == 200
        b.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # aiohttp's now
        assert _read(b, 1)[0].status == 200
        assert len(native.connections) == 1 and native.handed_over == 1
        with raw_http.connect(proxy.port) as c:
            (resp,) = raw_http.parse_responses(raw_http.read_all(c, 10))
        assert resp.status == 503
        assert orjson.loads(resp.body)["error"]["code"] == "too_many_connections"
        a.sendall(_post(_body(1)))  # the two admitted keep working
        assert _read(a, 1)[0].status == 200
        b.sendall(_post(_body(1)))
        assert _read(b, 1)[0].status == 200
    finally:
        a.close()
        b.close()
    _wait_for(lambda: native.open_connections() == 0)
    (resp,) = raw_http.request(proxy.port, _post(_body(1), b"Connection: close\r\n"))
    assert resp.status == 200


def test_a_native_connection_idle_past_keepalive_is_closed(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"client_keepalive_timeout": 1}))
    with raw_http.connect(proxy.port) as s:
        s.sendall(_post(_body(1)))
        assert _read(s, 1)[0].status == 200
        t0 = time.monotonic()
        assert raw_http.closed_within(s, 5)
        assert time.monotonic() - t0 > 0.5


def test_the_keepalive_clock_restarts_after_each_request(fake_backends, run_proxy) -> None:
    """One keep-alive timer serves a connection's requests: each request's end starts
    the clock again, and one longer than the timeout is not cut by it."""
    fast, slow = fake_backends(1)[0], fake_backends(1, stall_before_headers=1.5)[0]
    proxy = run_proxy(proxy_config([fast, slow], limits={"client_keepalive_timeout": 1}))
    with raw_http.connect(proxy.port) as s:
        for _ in range(2):  # a fast and a slow answer, 0.7 s apart each: 1.4 s > 1 s
            s.sendall(_post(_body(1)))
            assert _read(s, 1)[0].status == 200
            time.sleep(0.7)
        s.sendall(_post(_body(1)))
        assert _read(s, 1)[0].status == 200
        t0 = time.monotonic()
        assert raw_http.closed_within(s, 5)
        assert time.monotonic() - t0 > 0.5
    assert len(fast.received) + len(slow.received) == 3 and slow.received


def test_a_bodyless_status_gets_no_body_framing(loop_thread, run_proxy) -> None:
    """A backend's 204 is relayed without Content-Length or chunked framing (no stray
    bytes a keep-alive client would read as the next response)."""

    async def no_content(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", no_content)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = loop_thread.run(start())
    try:
        proxy = run_proxy(proxy_config([f"http://127.0.0.1:{runner.addresses[0][1]}"]))
        with raw_http.connect(proxy.port) as s:
            s.sendall(_post(_body(1)))
            s.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 204")
            assert b"transfer-encoding" not in head.lower()
            s.sendall(_post(_body(1)))  # the same connection goes on
            time.sleep(0.5)
            s.settimeout(5)
            rest += s.recv(65536)
            assert rest.startswith(b"HTTP/1.1 204"), rest[:40]
    finally:
        loop_thread.run(runner.cleanup())
