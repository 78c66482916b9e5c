"""lbproxy/proxy/upstream.py against raw backends on 127.0.0.1: keep-alive reuse, body
framing (length, chunks, until close), timeouts, and backpressure through the proxy."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from lbproxy.proxy.upstream import (
    BadUpstreamResponse,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamTimeout,
)
from tests.conftest import proxy_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line[15:])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[Handler], Awaitable[RawBackend]]]:
    servers: list[asyncio.Server] = []

    async def make(handler: Handler) -> RawBackend:
        backend = RawBackend()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        backend.port = server.sockets[0].getsockname()[1]
        return backend

    yield make
    for s in servers:
        s.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(connect_timeout=2.0, first_byte_timeout=5.0, idle_timeout=5.0)
    yield c
    await c.close()


def _h() -> CIMultiDict[str]:
    return CIMultiDict({"content-type": "application/json", "x-request-id": "r1"})


async def test_keep_alive_reuses_one_connection(raw_backend: Any, client: UpstreamClient) -> None:
    backend: RawBackend

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await backend.read_request(reader)
            close = len(backend.requests) == 3
            extra = b"Connection: close\r\n" if close else b""
            writer.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % extra)
            await writer.drain()
            if close:
                return

    backend = await raw_backend(handler)
    base = f"http://127.0.0.1:{backend.port}/prefix"
    for _ in range(4):
        r = await client.request(base, "/v1/completions", b"{}", _h())
        assert r.status == 200 and await r.read() == b"ok"
    # three on the first connection (the third said close), the fourth on a new one
    assert backend.connections == 2
    first = backend.requests[0]
    assert first.startswith(b"POST /prefix/v1/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{backend.port}\r\n".encode() in first
    assert b"Content-Length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")


async def test_body_framings(raw_backend: Any, client: UpstreamClient) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",  # neither length nor chunks
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ncut",  # closed short of its length
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        writer.write(answers[len(backend.requests) - 1])
        await writer.drain()

    backend = await raw_backend(handler)
    base = f"http://127.0.0.1:{backend.port}"
    r = await client.request(base, "/v1/x", b"{}", _h())
    assert await r.read() == b"abcde"
    r = await client.request(base, "/v1/x", b"{}", _h())
    assert await r.read() == b"until close"
    r = await client.request(base, "/v1/x", b"{}", _h())
    with pytest.raises(UpstreamDisconnected):
        await r.read()


async def test_timeouts_first_byte_then_idle(raw_backend: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        if len(backend.requests) == 1:
            await asyncio.sleep(3)  # no head
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"234")
        await writer.drain()
        await asyncio.sleep(3)
        writer.write(b"56789")
        await writer.drain()

    backend = await raw_backend(handler)
    c = UpstreamClient(first_byte_timeout=0.5, idle_timeout=0.5)
    base = f"http://127.0.0.1:{backend.port}"
    try:
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await c.request(base, "/v1/x", b"{}", _h())
        assert time.monotonic() - t0 < 2.5
        r = await c.request(base, "/v1/x", b"{}", _h())
        got: list[bytes] = []
        r.relay_to(got.append)
        t0 = time.monotonic()
        while not r.ended:
            await r.wait()
        assert isinstance(r.error, UpstreamTimeout)
        assert time.monotonic() - t0 < 2.5  # before the 3 s pause ends
        assert b"".join(got) == b"01234"
        r.release()
    finally:
        await c.close()


@pytest.mark.parametrize(("first_byte", "idle"), [(0.5, 30.0), (30.0, 0.5)])
async def test_unequal_first_byte_and_idle_bounds(
    raw_backend: Any, first_byte: float, idle: float
) -> None:
    """One timer serves both bounds: the first byte's never cuts a body that has begun,
    and a short idle bound still cuts a gap under a long first-byte bound."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01")
        await writer.drain()
        await asyncio.sleep(1.0)  # over 0.5 s: a gap between body pieces
        writer.write(b"23456789")
        await writer.drain()

    backend = await raw_backend(handler)
    c = UpstreamClient(first_byte_timeout=first_byte, idle_timeout=idle)
    try:
        r = await c.request(f"http://127.0.0.1:{backend.port}", "/v1/x", b"{}", _h())
        got: list[bytes] = []
        r.relay_to(got.append)
        t0 = time.monotonic()
        while not r.ended:
            await r.wait()
        if idle < 1.0:
            assert isinstance(r.error, UpstreamTimeout)
            assert b"".join(got) == b"01"
        else:
            assert r.error is None
            assert b"".join(got) == b"0123456789"
        assert time.monotonic() - t0 < 5.0
        r.release()
    finally:
        await c.close()


async def test_a_reused_connection_bounds_each_response_by_its_own_timeouts(
    raw_backend: Any,
) -> None:
    """The connection's timer outlives a response: a later response on it with a shorter
    first-byte bound (a P/D leg's) still times out on time, and so does a stall after
    several quick answers."""
    backend: RawBackend

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await backend.read_request(reader)
            if len(backend.requests) in (3, 5):
                await asyncio.sleep(5)  # no answer
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend = await raw_backend(handler)
    c = UpstreamClient(first_byte_timeout=30.0, idle_timeout=30.0)
    base = f"http://127.0.0.1:{backend.port}"
    try:
        for _ in range(2):  # the connection's timer is set for 30 s from here
            r = await c.request(base, "/v1/x", b"{}", _h())
            assert await r.read() == b"ok"
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await c.request(base, "/v1/x", b"{}", _h(), first_byte_timeout=0.5)
        assert time.monotonic() - t0 < 3.0
        assert backend.connections == 1  # the third request went on the reused connection

        c.first_byte_timeout = c.idle_timeout = 0.5
        r = await c.request(base, "/v1/x", b"{}", _h())  # a new connection
        assert await r.read() == b"ok"
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await c.request(base, "/v1/x", b"{}", _h())
        assert time.monotonic() - t0 < 3.0
        assert backend.connections == 2
    finally:
        await c.close()


async def test_connect_error_is_not_sent(client: UpstreamClient) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there
    with pytest.raises(UpstreamConnectError):
        await client.request(f"http://127.0.0.1:{port}", "/v1/x", b"{}", _h())


def test_slow_client_pauses_the_backend(loop_thread: Any, run_proxy: Any) -> None:
    """A client that reads nothing: the proxy stops reading the backend (its buffers stay
    small) and the whole body arrives byte-exact once the client reads."""
    total = 64 * 1024 * 1024
    piece = b"x" * 65536
    sent = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not (await backend.read_request(reader)).startswith(b"POST"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # health, metrics
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent[0] < total:
            writer.write(piece)
            await writer.drain()
            sent[0] += len(piece)

    async def start() -> tuple[RawBackend, asyncio.Server]:
        b = RawBackend()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        b.port = server.sockets[0].getsockname()[1]
        return b, server

    backend, server = loop_thread.run(start())
    try:
        _slow_client(run_proxy, backend, total, sent)
    finally:

        async def stop() -> None:
            server.close()

        loop_thread.run(stop())


def _slow_client(run_proxy: Any, backend: RawBackend, total: int, sent: list[int]) -> None:
    proxy = run_proxy(proxy_config([f"http://127.0.0.1:{backend.port}"]))
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    body = b'{"model": "fake-model", "prompt": "x"}'
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(1.5)
    stalled_at = sent[0]
    assert stalled_at < total // 4, stalled_at  # held back, not buffered by the proxy
    got = 0
    sock.settimeout(20)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    got = len(head.partition(b"\r\n\r\n")[2])
    while got < total:
        chunk = sock.recv(1 << 20)
        assert chunk
        got += len(chunk)
    assert got == total and sent[0] == total
    sock.close()


async def test_a_kept_alive_connection_closed_by_the_backend_is_not_a_failure(
    raw_backend: Any, client: UpstreamClient
) -> None:
    """The backend closes each connection right after its answer (as a server whose
    keep-alive timeout ran out does): the next request, sent on it before lbproxy saw the
    close, goes again on a new connection instead of failing."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    backend = await raw_backend(handler)
    base = f"http://127.0.0.1:{backend.port}"
    for _ in range(3):
        r = await client.request(base, "/v1/x", b"{}", _h())
        assert await r.read() == b"ok"
    assert len(backend.requests) == 3 and backend.connections >= 3


def test_nothing_follows_a_stream_cut_at_the_shutdown_deadline(
    loop_thread: Any, fake_backends: Any, run_proxy: Any
) -> None:
    """The shutdown's cut ends a stream (error event, [DONE], last chunk) from outside the
    relay, while the backend keeps sending: no byte of it may follow the end."""
    (backend,) = fake_backends(1, chunk_delay=0.0005)
    proxy = run_proxy(proxy_config([backend]))
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    body = b'{"model": "fake-model", "prompt": "x", "max_tokens": 20000, "stream": true}'
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    sock.settimeout(10)
    raw = b""
    while raw.count(b"data: ") < 20:
        raw += sock.recv(65536)

    async def cut() -> int:
        return proxy.runner.cut_in_flight()

    assert loop_thread.run(cut()) == 1
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    rest = raw.partition(b"\r\n\r\n")[2]
    decoded = b""
    while True:  # chunked framing, strictly: a stray byte after the end is a failure
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", rest[:200]
            break
        decoded += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
    assert decoded.endswith(b"data: [DONE]\n\n")
    assert b"server_shutting_down" in decoded


async def test_a_head_too_large_or_not_http_is_a_bad_response(
    raw_backend: Any, client: UpstreamClient
) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        writer.write(answers[len(backend.requests) - 1])
        await writer.drain()
        await asyncio.sleep(1)

    backend = await raw_backend(handler)
    for _ in answers:
        with pytest.raises(BadUpstreamResponse):
            await client.request(f"http://127.0.0.1:{backend.port}", "/v1/x", b"{}", _h())


async def test_a_backend_by_name_is_reached_and_its_addresses_kept(
    raw_backend: Any, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        await asyncio.sleep(0.2)  # all requests in flight at once: one connection each
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    backend = await raw_backend(handler)
    base = f"http://localhost:{backend.port}"  # ::1 may come first: refused, then 127.0.0.1
    answers = await asyncio.gather(*(client.request(base, "/v1/x", b"{}", _h()) for _ in range(5)))
    assert [await r.read() for r in answers] == [b"ok"] * 5
    assert backend.connections == 5
    origin = client._origins[base]
    assert "127.0.0.1" in origin.addresses and origin.resolved_at > 0
    assert f"Host: localhost:{backend.port}\r\n".encode() in backend.requests[0]
