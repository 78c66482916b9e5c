"""lbproxy's own HTTP/1.1 server for plain `POST /v1/*` requests; aiohttp for the rest.

aiohttp's server side (request and response objects, header multidicts, stream readers,
a task per connection) cost most of a proxied request's CPU. The main listener's
connections start with `NativeConnection`, an asyncio.Protocol that serves natively only
requests whose end is known exactly from their head (native_head.py): `POST /v1/...
HTTP/1.1`, one digits-only Content-Length within the body limits, no Transfer-Encoding,
Expect, Content-Encoding, Upgrade or `Connection: close`, CRLF-only lines, a head within
`limits.max_header_bytes`. Anything else is handed to aiohttp from that request's first
byte (`_hand_over`), so aiohttp's parser, limits and error answers apply to it unchanged
(operator routes, /metrics, GET /v1/models, every odd or malformed request); the
connection then stays with aiohttp.

Native requests behave as aiohttp's: keep-alive (HTTP/1.1's default) and pipelining
(answered in order; read ahead up to `_READ_AHEAD` bytes, then reading pauses), the
header timeout (from the connection's opening, or from the next request's first byte),
the idle keep-alive timeout, the body's time and memory budget (client_body.py's
limits), the connection cap counting both kinds of connection, a client leaving
cancelling its handler (which closes the upstream request), and the shutdown's cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from lbproxy.proxy.aiohttp_compat import server_connection_count
from lbproxy.proxy.client_body import buffer_full
from lbproxy.proxy.errors import RequestTimeout, error_body, sse_error_event
from lbproxy.proxy.lifecycle import SHUTTING_DOWN_RESPONSE, ProxyRunner, refuse_connection
from lbproxy.proxy.native_head import HEAD_END, parse_head, plausible_head_start

if TYPE_CHECKING:
    from lbproxy.proxy.forward import Forwarder

log = logging.getLogger("lbproxy")

# Bytes of pipelined requests read ahead while one is being answered; then reading
# pauses until it is.
_READ_AHEAD = 256 * 1024

_PHRASES = {s.value: s.phrase for s in HTTPStatus}

_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def build_head(
    status: int,
    reason: str | None,
    headers: list[tuple[str, str]],
    extra: Mapping[str, str],
    length: int | None,
    close: bool = False,
) -> bytes:
    """A response head: `headers` (minus those `extra` replaces), `extra`, the framing
    (Content-Length, chunked when `length` is None, none for a status without a body)."""
    lines = [f"HTTP/1.1 {status} {reason or _PHRASES.get(status, '')}\r\n"]
    skip = {k.lower() for k in extra}
    typed = False
    for k, v in headers:
        low = k.lower()
        if low in skip:
            continue
        typed = typed or low == "content-type"
        lines.append(f"{k}: {v}\r\n")
    for k, v in extra.items():
        lines.append(f"{k}: {v}\r\n")
    if not typed:  # as aiohttp does
        lines.append("Content-Type: application/octet-stream\r\n")
    if status in _BODYLESS or status < 200:
        pass
    elif length is None:
        lines.append("Transfer-Encoding: chunked\r\n")
    else:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append(f"Date: {_http_date()}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


_BODYLESS = frozenset({204, 304})
_NOT_COPIED = frozenset({"content-length", "transfer-encoding", "connection", "date"})


def serialize_response(resp: web.Response, close: bool) -> bytes:
    """An unsent aiohttp Response (an error lbproxy answers) as bytes."""
    body = resp.body
    data = body if isinstance(body, bytes) else b""
    headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in _NOT_COPIED]
    return build_head(resp.status, resp.reason, headers, {}, len(data), close) + data


_INTERNAL_ERROR = serialize_response(
    web.Response(
        status=500,
        body=error_body("internal error in lbproxy", "server_error", "internal_error"),
        content_type="application/json",
    ),
    close=True,
)

_CUT_EVENT = b"\n\n" + sse_error_event(
    "lbproxy is shutting down: the stream was cut at the end of the shutdown grace period",
    "server_shutting_down",
)


class NativeSink:
    """client_io.ResponseSink on a native connection's transport."""

    __slots__ = ("chunked", "conn", "eof", "head", "sse", "status", "transport")

    def __init__(
        self,
        conn: NativeConnection,
        transport: asyncio.Transport | None,
        status: int,
        chunked: bool,
        sse: bool,
    ) -> None:
        self.conn, self.transport, self.status = conn, transport, status
        self.chunked, self.sse = chunked, sse
        self.head: bytes | None = None  # a head held for the first body piece
        self.eof = False

    def write_first(self, chunk: bytes) -> None:
        t = self.transport
        if self.eof or t is None or t.is_closing():
            raise ConnectionResetError("the response has ended or its client left")
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk
        if self.head is not None:
            data, self.head = self.head + data, None
        t.write(data)

    def sender(self) -> None:
        return None  # chunked: chunk_transport; else write_first is as cheap

    def chunk_transport(self) -> asyncio.Transport | None:
        return self.transport if self.chunked else None

    async def drain(self) -> None:
        await self.conn.drain()

    async def write(self, data: bytes) -> None:
        self.write_first(data)

    async def write_eof(self) -> None:
        t = self.transport
        if self.eof or t is None:
            return
        self.eof = True
        data = b"0\r\n\r\n" if self.chunked else b""
        if self.head is not None:
            data, self.head = self.head + data, None
        if data and not t.is_closing():
            t.write(data)

    def result(self) -> NativeSink:
        return self

    def cut(self) -> None:
        """The shutdown's deadline: an SSE stream gets the error event and its end."""
        t = self.transport
        if not self.sse or not self.chunked or self.eof or t is None or t.is_closing():
            return
        self.write_first(_CUT_EVENT)
        self.eof = True
        t.write(b"0\r\n\r\n")


class NativeRequest:
    """client_io.ClientRequest for a request read by `NativeConnection`."""

    __slots__ = (
        "_fill",
        "_got",
        "_waiter",
        "body",
        "client_max_size",
        "conn",
        "headers",
        "held",
        "length",
        "path",
        "raw_target",
        "sink",
    )  # fmt: skip

    method = "POST"

    def __init__(
        self, conn: NativeConnection, target: str, headers: list[tuple[str, str]], length: int
    ) -> None:
        self.conn = conn
        self.raw_target = target
        q = target.find("?")
        self.path = target if q < 0 else target[:q]
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.length = length
        self.client_max_size = conn.server.max_body
        self.body: bytes | memoryview | None = None
        self._fill: bytearray | None = None
        self._got = 0
        self._waiter: asyncio.Future[None] | None = None
        self.held = 0  # bytes of the body budget this request holds
        self.sink: NativeSink | None = None

    @property
    def remote(self) -> str | None:
        return self.conn.remote()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    def begin_body(self, data: bytes) -> None:
        """The body did not come whole with the head: fill a buffer of its length."""
        self._fill = bytearray(self.length)
        self._got = 0
        self.feed(data)

    def feed(self, data: bytes) -> bytes:
        """Take the body's bytes from `data`; returns what follows the body."""
        fill = self._fill
        assert fill is not None
        need = self.length - self._got
        piece = data[:need]
        fill[self._got : self._got + len(piece)] = piece
        self._got += len(piece)
        if self._got == self.length:
            self.body = memoryview(fill)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        return data[need:] if len(data) > need else b""

    async def read(self) -> bytes:
        budget = self.conn.server.limits.budget
        if not self.held:
            if not budget.take(self.length):
                raise buffer_full()
            self.held = self.length
        if self.body is None:
            await self._wait_body()
        assert self.body is not None
        return self.body  # type: ignore[return-value]  # a view: parsed, measured, sent

    async def _wait_body(self) -> None:
        limits = self.conn.server.limits
        loop = asyncio.get_running_loop()
        idle, min_rate = limits.body_timeout, limits.body_min_rate
        t0, got0 = loop.time(), self._got
        try:
            async with asyncio.timeout(idle) as deadline:
                while self.body is None:
                    self._waiter = loop.create_future()
                    await self._waiter
                    # As client_body: each gap may last `idle`, the whole body no more
                    # than `idle` plus a second per `min_rate` bytes.
                    end = loop.time() + idle
                    if min_rate:
                        end = min(end, t0 + idle + (self._got - got0) / min_rate)
                    deadline.reschedule(end)
        except TimeoutError:
            rate = f" or under {min_rate} bytes/s on average" if min_rate else ""
            raise RequestTimeout(
                f"the request body arrived too slowly (a gap over {idle:g} s{rate}); "
                "the request is dropped"
            ) from None
        finally:
            self._waiter = None

    def release_body(self) -> None:
        if self.held:
            self.conn.server.limits.budget.give_back(self.held)
            self.held = 0

    async def start_response(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        extra: Mapping[str, str],
        length: int | None,
        hold: bool,
        sse: bool,
    ) -> NativeSink:
        t = self.conn.transport
        if t is not None and t.is_closing():
            t = None
        chunked = length is None and status not in _BODYLESS and status >= 200
        sink = self.sink = NativeSink(self.conn, t, status, chunked, sse)
        if t is not None:
            head = build_head(status, reason, headers, extra, length)
            if hold:
                sink.head = head
            else:
                t.write(head)
        return sink

    def end_for_shutdown(self) -> None:
        """The shutdown's deadline: a 503 if nothing was answered yet, else the cut of
        an SSE stream (lifecycle.ProxyRunner.cut_in_flight)."""
        t = self.conn.transport
        if t is None or t.is_closing():
            return
        if self.sink is None:
            t.write(SHUTTING_DOWN_RESPONSE)
        else:
            self.sink.cut()


class NativeServer:
    """The main listener: builds `NativeConnection`s (the protocol factory)."""

    def __init__(
        self,
        runner: ProxyRunner,
        forwarder: Callable[[], Forwarder | None],
        *,
        max_head: int,
        max_body: int,
    ) -> None:
        self.runner = runner
        self.limits = runner.limits
        self.forwarder = forwarder
        self.max_head = max_head
        self.max_body = max_body
        self.connections: set[NativeConnection] = set()
        self.closing = False
        self.listener: asyncio.Server | None = None
        self.served = 0  # requests served natively, and connections handed to aiohttp
        self.handed_over = 0

    def __call__(self) -> NativeConnection:
        return NativeConnection(self)

    def open_connections(self) -> int:
        """Client connections open on the main listener, native and handed to aiohttp."""
        server = self.runner.server
        return len(self.connections) + (server_connection_count(server) if server else 0)

    async def listen(self, host: str, port: int, reuse_port: bool | None) -> int:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(
            self, host, port, backlog=128, reuse_port=reuse_port
        )
        return int(self.listener.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        """The shutdown's start: refuse new connections, close idle ones; the others
        close once their request is answered."""
        self.closing = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            if conn.req is None:
                conn.close()

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the requests being answered natively."""
        self.stop_listening()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


class NativeConnection(asyncio.Protocol):
    """One client connection while it is lbproxy's own (see the module's docstring)."""

    __slots__ = (
        "_peer",
        "buf",
        "drain_waiter",
        "idle",
        "idle_since",
        "ka_timer",
        "read_paused",
        "req",
        "server",
        "task",
        "timer",
        "transport",
        "write_paused",
    )  # fmt: skip

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.req: NativeRequest | None = None  # the request being answered
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.read_paused = self.write_paused = False
        self.idle = False  # between requests (the keep-alive timer runs)
        # The armed timer is the keep-alive one: kept through the requests that follow
        # (it re-arms itself for what is left when it fires early), not set per request.
        self.ka_timer = False
        self.idle_since = 0.0
        self.drain_waiter: asyncio.Future[None] | None = None
        self._peer: Any = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        server = self.server
        if server.open_connections() >= server.limits.max_connections:
            refuse_connection(server.runner, t, server.open_connections())
            self.transport = None
            return
        server.connections.add(self)
        sock = t.get_extra_info("socket")
        if sock is not None:  # as aiohttp: dead peers are noticed
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._arm(server.limits.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is not None:  # a request is being answered
            if req.body is None and req._fill is not None:
                data = req.feed(data)
                if not data:
                    return
            self.buf += data
            if len(self.buf) > _READ_AHEAD and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self.transport is None:
            return
        self.buf = self.buf + data if self.buf else data
        self._next()

    def eof_received(self) -> bool | None:
        return None  # as aiohttp: a half-closed client is a client that left

    def connection_lost(self, exc: BaseException | None) -> None:
        self._leave()
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client left: its handler (and upstream request) ends
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("the client left"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- helpers ---

    async def drain(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("the client left")
        if self.write_paused:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def remote(self) -> str | None:
        if self._peer is None:
            t = self.transport
            peer = t.get_extra_info("peername") if t is not None else None
            self._peer = peer[0] if isinstance(peer, tuple | list) and peer else ""
        return self._peer or None

    def close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()

    def _arm(self, delay: float, callback: Callable[[], None], idle: bool = False) -> None:
        self.idle = idle
        self.ka_timer = False
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(delay, callback) if delay else None

    def _disarm(self) -> None:
        self.idle = self.ka_timer = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _go_idle(self) -> None:
        """Between requests: the keep-alive clock starts now."""
        self.idle_since = asyncio.get_running_loop().time()
        if self.ka_timer:  # still armed from an earlier idle spell
            self.idle = True
            return
        self._arm(self.server.limits.keepalive_timeout, self._keepalive_timeout, idle=True)
        self.ka_timer = self.timer is not None

    def _leave(self) -> None:
        """This connection is no longer a native one (closed or handed to aiohttp)."""
        self._disarm()
        self.server.connections.discard(self)

    def _header_timeout(self) -> None:
        self.timer = None
        if self.req is None:
            log.info(
                "closed a connection from %s: no complete request headers within %gs",
                self.remote(),
                self.server.limits.header_timeout,
            )
            self.close()

    def _keepalive_timeout(self) -> None:
        self.timer = None
        self.ka_timer = False
        if not self.idle or self.req is not None or self.buf:
            return  # a request came since: its end starts the clock again
        loop = asyncio.get_running_loop()
        due = self.idle_since + self.server.limits.keepalive_timeout
        if loop.time() < due:  # armed in an earlier idle spell: wait for what is left
            self.timer, self.ka_timer = loop.call_at(due, self._keepalive_timeout), True
            return
        self.close()

    def _next(self) -> None:
        """Start the request at the head of `buf`, or hand the connection to aiohttp."""
        buf = self.buf
        server = self.server
        end = buf.find(HEAD_END)
        if end < 0:  # the head is not complete yet
            if len(buf) > server.max_head or not plausible_head_start(buf):
                self._hand_over()
                return
            if self.timer is None or self.ka_timer:
                # Between requests: the next one's first byte starts the header clock.
                self._arm(server.limits.header_timeout, self._header_timeout)
            return
        head_len = end + len(HEAD_END)
        parsed = parse_head(buf, end + 2) if head_len <= server.max_head else None
        if parsed is None:
            self._hand_over()
            return
        target, headers, length = parsed
        if length > server.max_body or not server.limits.budget.room_for(length):
            self._hand_over()  # aiohttp answers 413 / 503 as it does for any request
            return
        if self.ka_timer:
            self.idle = False  # the keep-alive timer stays: it will find a request
        else:
            self._disarm()
        req = self.req = NativeRequest(self, target, headers, length)
        body_end = head_len + length
        if len(buf) >= body_end:
            req.body = memoryview(buf)[head_len:body_end]
            self.buf = buf[body_end:] if len(buf) > body_end else b""
        else:
            self.buf = b""
            req.begin_body(buf[head_len:])
        server.served += 1
        self.task = asyncio.get_running_loop().create_task(self._serve(req))

    def _hand_over(self) -> None:
        """From this request's first byte on, the connection is aiohttp's."""
        t = self.transport
        assert t is not None
        self._leave()
        self.server.handed_over += 1
        handler = self.server.runner.adopt_connection()
        t.set_protocol(handler)
        handler.connection_made(t)
        if self.read_paused:
            self.read_paused = False
            t.resume_reading()
        buf, self.buf = self.buf, b""
        handler.data_received(buf)

    async def _serve(self, req: NativeRequest) -> None:
        server = self.server
        # Set by _next before this first runs (asyncio.current_task is Python code in 3.11).
        task = self.task or asyncio.current_task()
        assert task is not None
        in_flight = server.runner.in_flight
        in_flight[task] = req  # type: ignore[assignment]  # the shutdown may cut it
        keep = True
        try:
            forwarder = server.forwarder()
            assert forwarder is not None
            resp = await forwarder.handle(req)
            if req.sink is None and isinstance(resp, web.Response):
                close = req.body is None or resp.keep_alive is False or server.closing
                keep = not close
                t = self.transport
                if t is not None and not t.is_closing():
                    t.write(serialize_response(resp, close))
        except asyncio.CancelledError:
            keep = False  # the client left, or the shutdown's cut
        except Exception:
            keep = False
            log.exception("unexpected error answering %s", req.path)
            t = self.transport
            if req.sink is None and t is not None and not t.is_closing():
                t.write(_INTERNAL_ERROR)
        finally:
            del in_flight[task]
            req.release_body()
        sink = req.sink
        if sink is not None and not sink.eof:
            keep = False  # a response cut short: the connection cannot go on
        self._done(keep and req.body is not None and not server.closing)

    def _done(self, keep: bool) -> None:
        self.req = None
        self.task = None
        t = self.transport
        if t is None or t.is_closing():
            return
        if not keep:
            t.close()
            return
        if self.read_paused:
            self.read_paused = False
            t.resume_reading()
        if self.buf:
            self._next()  # a pipelined request
        else:
            self._go_idle()
