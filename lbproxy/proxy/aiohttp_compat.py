"""Every use of aiohttp's internals in lbproxy, in one place.

lbproxy needs a few things aiohttp has no public API for. Each is wrapped here in a
small named function or base class, and nothing else in lbproxy touches an aiohttp name
that is private (underscore-prefixed) or lives in a module aiohttp does not document.
`check()` runs at import and raises a RuntimeError naming each internal that the
installed aiohttp lacks, so an upgrade that drops one fails at start-up, not mid-request
(tests/test_aiohttp_compat.py exercises each wrapper against the installed aiohttp).
Tested range: `TESTED_RANGE`, the aiohttp requirement in pyproject.toml.

The internals, and why:

Server side (aiohttp.web_protocol, aiohttp.web_server, aiohttp.web_runner):
- `AppRunner._make_server`, `Server._loop`, `Server._kwargs`: the only way to make the
  server build connections with our RequestHandler subclass (`HookedRunner`); aiohttp
  has no public hook for parse errors or for a connection being opened.
- `Application._make_request(..., _cls=)`: builds requests of our Request subclass with
  the app's settings (`new_request`).
- `RequestHandler._handle_request`: wraps each request's handling, to know the requests
  in flight (the shutdown cuts them) and to release their body budget (`request_started`
  / `request_ended` of `ConnectionHandler`).
- `RequestHandler._manager._connections`, `Server._connections`: how many client
  connections are open (the connection cap).
- `RequestHandler._loop`, `._request_in_progress`, `._messages`, `._waiter`,
  `._request_count`: whether a connection has a request (the header timeout).
- `RequestHandler._parser`, `._upgraded`, `._read_bufsize`: swap the parser for one
  connection's first read, and build a parser with the connection's settings that
  pauses after each message (`max_msg_queue_size`), to keep the requests that came
  before junk in a pipelined read.
- `aiohttp.web_protocol._ErrInfo`: the message the parser hands the handler for a parse
  error (`parse_error_message`).
- `aiohttp.http_parser.HttpRequestParser`, `aiohttp.http_exceptions.LineTooLong`,
  `aiohttp.streams.EMPTY_PAYLOAD`: that parser, its errors, the empty body it uses.
- `RequestHandler._lingering_time`: skip the lingering close (up to 10 s reading a body
  nobody will use) when a client holds its body back or trickles it (`no_lingering_close`).

Requests and responses (aiohttp.web_request, aiohttp.http_writer):
- `BaseRequest.ATTRS`: the attributes a Request subclass may set without a warning.
- `BaseRequest._prepare_hook`: learn the response a request prepared (a shutdown may
  have to end it).
- `BaseRequest._read_bytes`: where `read()` caches the body, reused by our bounded read.
- `BaseRequest._payload_writer`, `StreamWriter._eof`, `StreamWriter.output_size`: what
  has been written to the client (the shutdown's 503 or SSE error event; 100 Continue is
  not the response proper).

Routing (aiohttp.web_urldispatcher):
- `_default_expect_handler`, `ResourceRoute._expect_handler`: replace aiohttp's default
  Expect handling (its text/plain 417 quotes the header) on routes that did not set one.

Sites (aiohttp.web_runner):
- `TCPSite._server`: the port a site listening on port 0 got.

Response bodies (aiohttp.http_writer):
- `StreamWriter._headers_buf`, `._headers_written`, `._send_headers_with_payload`,
  `._write_chunked_payload`, `._write`, `.length`: write a body piece from a protocol
  callback, without `write`'s await (`write_now`: the upstream relay, lbproxy/proxy/upstream.py).
- `StreamResponse._send_headers_immediately`: keep a prepared response's head back until
  its first body bytes, to send both in one write (`hold_head`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

# The aiohttp versions this module is tested with (pyproject.toml requires the same).
# Older ones lack internals: 3.14.3 the handler's `_read_bufsize`, 3.14.0 the parser's
# `max_msg_queue_size`, 3.13 the handler's `_parser`.
TESTED_RANGE = ">=3.14.4,<4"
_TESTED = f"lbproxy is tested with aiohttp{TESTED_RANGE}"

try:
    from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
    from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
    from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
    from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
    from aiohttp.web_urldispatcher import _default_expect_handler
except ImportError as e:  # pragma: no cover - only with an aiohttp that lacks them
    raise ImportError(
        f"lbproxy needs an aiohttp internal that aiohttp {aiohttp.__version__} lacks: {e} "
        f"({_TESTED})"
    ) from e

__all__ = [
    "EMPTY_PAYLOAD",
    "AbstractStreamWriter",
    "ConnectionHandler",
    "HookedRequest",
    "HookedRunner",
    "HttpProcessingError",
    "LineTooLong",
    "RawRequestMessage",
    "RequestHandler",
    "StreamReader",
    "bound_port",
    "check",
    "chunk_sender",
    "hold_head",
    "new_request",
    "no_lingering_close",
    "parse_error_message",
    "payload_writer",
    "replace_default_expect_handlers",
    "send_100_continue",
    "server_connection_count",
    "write_now",
    "writer_ended",
]


# --- Response bodies ------------------------------------------------------------------


def chunk_sender(writer: AbstractStreamWriter, transport: Any) -> Callable[[bytes], None] | None:
    """For a chunked response whose head is out: a function that writes one body piece as
    one chunk, as `write_now` would but with less on the way (the per-chunk path of a
    stream); None when `writer` is anything else (use `write_now`)."""
    w: Any = writer
    if not w.chunked or w._headers_buf or not w._headers_written or w._compress is not None:
        return None

    def send(chunk: bytes) -> None:
        if w._eof or transport.is_closing():
            raise ConnectionResetError("the response has ended or its client left")
        w.output_size += len(chunk)
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))

    return send


def hold_head(resp: web.StreamResponse) -> None:
    """Before `prepare`: the head waits for the first body bytes (one write for both),
    as `web.Response`'s does."""
    resp._send_headers_immediately = False  # type: ignore[attr-defined]


def write_now(writer: AbstractStreamWriter, chunk: bytes) -> None:
    """`StreamWriter.write(chunk)` without its await, for a prepared response of lbproxy
    (no compression, no chunk-sent signal): the buffered head goes with the first piece,
    chunked framing when the response is chunked. Raises ConnectionResetError when the
    client's transport is closing, or when the response was ended by someone else (the
    shutdown's cut, see lifecycle._end_response): nothing may follow its end. Backpressure
    is the caller's (see forward._BodyRelay)."""
    w: Any = writer
    if w._eof:
        raise ConnectionResetError("the response has ended")
    if w.length is not None:  # a sized body: never past the declared length
        if w.length >= len(chunk):
            w.length -= len(chunk)
        else:
            chunk = chunk[: w.length]
            w.length = 0
            if not chunk:
                return
    if w._headers_buf and not w._headers_written:
        w._send_headers_with_payload(chunk, False)
    elif w.chunked:
        w._write_chunked_payload(chunk)
    else:
        w._write(chunk)


# --- Sites and routes ----------------------------------------------------------------


def bound_port(site: web.TCPSite, default: int) -> int:
    """The port `site` (started) listens on; `default` if it has no socket."""
    server = site._server
    sockets = server.sockets if server else []  # type: ignore[union-attr]
    return int(sockets[0].getsockname()[1]) if sockets else default


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def replace_default_expect_handlers(app: web.Application, handler: ExpectHandler) -> None:
    """Give every route of `app` that uses aiohttp's default Expect handling `handler`."""
    for route in app.router.routes():
        if getattr(route, "_expect_handler", None) is _default_expect_handler:
            route._expect_handler = handler  # type: ignore[attr-defined]


# --- Requests ------------------------------------------------------------------------


def no_lingering_close(request: web.BaseRequest) -> None:
    """Close `request`'s connection at once after the answer, without reading (for up to
    10 s) the rest of a body that will not be used."""
    request.protocol._lingering_time = 0.0  # type: ignore[union-attr]


async def send_100_continue(request: web.BaseRequest) -> None:
    """Tell a client that sent `Expect: 100-continue` to send its body (as aiohttp's
    default handler does); the interim answer does not count as the response started."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # type: ignore[attr-defined]


def payload_writer(request: web.BaseRequest) -> AbstractStreamWriter | None:
    """The writer of `request`'s response (None for a request with no connection)."""
    return request._payload_writer


def writer_ended(writer: AbstractStreamWriter) -> bool:
    """Whether the end of the response body was written."""
    return bool(getattr(writer, "_eof", False))


class HookedRequest(web.Request):
    """A Request whose subclass is told of the response it prepares and supplies its body.

    Subclasses list the attributes they add with `request_attrs`, implement
    `read_body()` (called once; `read()` caches it as aiohttp does) and may override
    `response_prepared`."""

    @staticmethod
    def request_attrs(*names: str) -> frozenset[str]:
        """ATTRS for a subclass that sets `names` on its instances."""
        return web.Request.ATTRS | frozenset(names)

    def response_prepared(self, response: web.StreamResponse) -> None:
        """Called when the response to this request is being prepared."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        self.response_prepared(response)
        await super()._prepare_hook(response)

    async def read_body(self) -> bytes:
        raise NotImplementedError

    async def read(self) -> bytes:
        if self._read_bytes is None:
            self._read_bytes = await self.read_body()
        return self._read_bytes


def new_request(
    app: web.Application,
    message: RawRequestMessage,
    payload: StreamReader,
    protocol: RequestHandler,
    writer: AbstractStreamWriter,
    task: asyncio.Task[None],
    cls: type[web.Request],
) -> web.Request:
    """A request of class `cls` with `app`'s settings (what the app builds by default)."""
    return app._make_request(message, payload, protocol, writer, task, _cls=cls)


# --- Connections ---------------------------------------------------------------------


def server_connection_count(server: web.Server) -> int:
    """Client connections `server` has open (without copying its list of them)."""
    return len(server._connections)


class ConnectionHandler(RequestHandler):
    """aiohttp's connection handler with the private state lbproxy reads given names,
    and hooks around each request's handling."""

    __slots__ = ()

    def open_connections(self) -> int:
        """Client connections the server has open (this one not yet counted in
        connection_made)."""
        manager = self._manager
        return len(manager._connections) if manager is not None else 0

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback)

    def has_request(self) -> bool:
        """A request is being handled or is parsed and waiting to be."""
        return bool(self._request_in_progress or self._messages)

    def waiting_for_request(self) -> bool:
        """Idle between requests: the handler waits for the next one's headers."""
        return self._waiter is not None

    def requests_parsed(self) -> int:
        """Requests whose headers have been parsed on this connection."""
        return self._request_count

    def parser(self) -> Any:
        """The connection's request parser; None once it has been upgraded or closed."""
        return None if self._upgraded else self._parser

    def set_parser(self, parser: Any) -> None:
        self._parser = parser

    def new_request_parser(self, max_msg_queue_size: int) -> Any:
        """A request parser with this connection's settings that holds at most
        `max_msg_queue_size` parsed messages (1: feed_data stops after each request
        until `message_consumed()`)."""
        return HttpRequestParser(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=False,
            max_msg_queue_size=max_msg_queue_size,
        )

    def request_started(self, request: web.BaseRequest) -> None:
        """Called in the request's task before it is handled."""

    def request_ended(self, request: web.BaseRequest) -> None:
        """Called in the request's task when its handling has ended, however it ended."""

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        self.request_started(request)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self.request_ended(request)


def parse_error_message(exc: HttpProcessingError, status: int = 400) -> tuple[Any, Any]:
    """What a parser's feed_data returns, as a message, for a request it could not parse:
    the handler answers it with `handle_error`."""
    return _ErrInfo(status=status, exc=exc, message=exc.message), EMPTY_PAYLOAD


class _HookedServer(web.Server):
    _lb_runner: HookedRunner

    def __call__(self) -> RequestHandler:
        return self._lb_runner.connection_handler(self, loop=self._loop, **self._kwargs)


class HookedRunner(web.AppRunner):
    """AppRunner whose subclass builds each connection's handler (`connection_handler`)
    and each request (`make_request`)."""

    def connection_handler(self, server: web.Server, **kwargs: Any) -> RequestHandler:
        return RequestHandler(server, **kwargs)

    def make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return new_request(self.app, message, payload, protocol, writer, task, web.Request)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no public hook for parse errors or new connections, so the server's
        # class is swapped for one that builds our handlers.
        server.__class__ = _HookedServer
        server._lb_runner = self  # type: ignore[attr-defined]
        server.request_factory = self.make_request
        return server


# --- The check -----------------------------------------------------------------------


def check() -> None:
    """Raise RuntimeError naming every internal above that the installed aiohttp lacks."""
    missing: list[str] = []

    def need(obj: object, owner: str, *names: str) -> None:
        missing.extend(f"{owner}.{n}" for n in names if not hasattr(obj, n))

    need(web.AppRunner, "AppRunner", "_make_server")
    need(web.Application, "Application", "_make_request")
    need(RequestHandler, "RequestHandler", "_handle_request")
    need(web.Request, "Request", "_prepare_hook")
    need(web.StreamResponse, "StreamResponse", "_send_headers_immediately")
    attrs = web.Request.ATTRS
    missing.extend(f"Request.{n}" for n in ("_read_bytes", "_payload_writer") if n not in attrs)
    need(web.TCPSite, "TCPSite", "_server")
    need(
        StreamWriter,
        "StreamWriter",
        "_send_headers_with_payload",
        "_write_chunked_payload",
        "_write",
    )
    # Instance state: build the real objects on a loop that never runs.
    loop = asyncio.new_event_loop()
    try:

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response()

        server = web.Server(handler, loop=loop)
        need(server, "Server", "_loop", "_kwargs", "_connections", "request_factory")
        conn = RequestHandler(server, loop=loop)
        need(
            conn,
            "RequestHandler",
            "_manager",
            "_loop",
            "_request_in_progress",
            "_messages",
            "_waiter",
            "_request_count",
            "_parser",
            "_upgraded",
            "_read_bufsize",
            "_lingering_time",
            "max_line_size",
            "max_field_size",
            "max_headers",
        )
        try:
            HttpRequestParser(
                conn,
                loop,
                2**16,
                max_line_size=8190,
                max_field_size=8190,
                max_headers=128,
                payload_exception=RequestPayloadError,
                auto_decompress=False,
                max_msg_queue_size=1,
            )
        except TypeError as e:
            missing.append(f"HttpRequestParser(max_msg_queue_size=...) ({e})")
        try:
            _ErrInfo(status=400, exc=HttpProcessingError(), message="")
        except TypeError as e:
            missing.append(f"web_protocol._ErrInfo(status, exc, message) ({e})")
        writer = StreamWriter(conn, loop)
        need(writer, "StreamWriter", "_eof", "output_size", "_headers_buf", "_headers_written")
        need(writer, "StreamWriter", "length", "chunked", "_compress")
        route = web.Application().router.add_get("/", handler)
        if getattr(route, "_expect_handler", None) is not _default_expect_handler:
            missing.append("ResourceRoute._expect_handler (the default one)")
    finally:
        loop.close()
    if missing:
        raise RuntimeError(
            f"lbproxy relies on aiohttp internals that aiohttp {aiohttp.__version__} lacks: "
            f"{', '.join(missing)} ({_TESTED}; see lbproxy/proxy/aiohttp_compat.py)"
        )


check()
