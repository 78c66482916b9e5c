"""Process lifecycle: signals, graceful shutdown, and how malformed requests are refused.

Signals (installed by `run_until_signalled`):
- SIGTERM or SIGINT: graceful shutdown. The listeners close at once (new connections are
  refused), idle keep-alive connections are closed, requests in flight (streams included)
  get up to `shutdown_grace` seconds to finish, then whatever is left is cut (its
  upstream connection closed, which makes vLLM abort it; an SSE stream first gets an
  error event, code `server_shutting_down`, and `data: [DONE]`; a request with no
  answer yet gets a 503 with that code), background tasks stop
  and the process exits 0, within about a second of the deadline. A second SIGTERM/SIGINT
  during the grace period kills the process.
- SIGHUP: hot reload of the config file, as POST /admin/reload; an invalid file is logged
  and the running config stays. One received while the proxy starts (`lbproxy.startup_hup`
  notes it) is logged and reloads the config as soon as the proxy serves.

`ProxyRunner` is aiohttp's AppRunner with these changes:
- A request that cannot be parsed (a header or request line over
  `limits.max_header_bytes`, or malformed HTTP) is answered in OpenAI's error shape, 431
  or 400, and logged without its bytes; aiohttp's default is a text/plain 400 and an
  ERROR log that quotes the first 100 bytes of the offending line, which can be an
  Authorization header.
- Client connections are bounded (`ClientLimits`): beyond `limits.max_client_connections`
  a new connection gets a 503 and is closed at once; a connection must deliver complete
  request headers within `limits.client_header_timeout` of opening (or, between
  requests, of its next request's first byte), else it is closed; an idle connection is
  closed after `limits.client_keepalive_timeout`.
- Requests are `ProxyRequest`s (client_body.py): bodies are never decompressed, read
  within a time and memory budget, and given back to the budget when the request ends.

On the main listener, connections start with the native server (native_server.py), which
serves plain `POST /v1/*` requests itself under the same limits and hands any other
request's connection to this runner (`adopt_connection`, not counted twice against the
cap). The shutdown waits for and cuts both kinds of request alike (`in_flight`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from lbproxy import startup_hup
from lbproxy.proxy.aiohttp_compat import (
    AbstractStreamWriter,
    ConnectionHandler,
    HookedRunner,
    HttpProcessingError,
    LineTooLong,
    RawRequestMessage,
    RequestHandler,
    StreamReader,
    new_request,
    parse_error_message,
    payload_writer,
    writer_ended,
)
from lbproxy.proxy.client_body import ProxyRequest
from lbproxy.proxy.client_limits import ClientLimits
from lbproxy.proxy.errors import error_body, sse_error_event

log = logging.getLogger("lbproxy")


def refuse_connection(runner: ProxyRunner, transport: asyncio.BaseTransport, n_open: int) -> None:
    """Over the cap: answer at once and close, so that the connections already open (and
    the process's file descriptors) keep working."""
    runner.refused_connections += 1
    refused = runner.refused_connections
    if refused in (1, 10, 100) or refused % 1000 == 0:  # a flood logs a few lines
        log.warning(
            "refused a connection: %d client connections are open "
            "(limits.max_client_connections); %d refused so far",
            n_open,
            refused,
        )
    cast(asyncio.Transport, transport).write(_FULL)
    transport.close()


class _RequestHandler(ConnectionHandler):
    __slots__ = ("_lb_admitted", "_lb_header_timer", "_lb_runner", "_lb_seen_data")

    _lb_runner: ProxyRunner
    # A connection the native server hands over was counted against the cap when it opened.
    _lb_admitted: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lb_header_timer: asyncio.TimerHandle | None = None
        self._lb_seen_data = False
        runner = self._lb_runner
        if not self._lb_admitted and self.open_connections() >= runner.limits.max_connections:
            refuse_connection(runner, transport, self.open_connections())
            return
        super().connection_made(transport)
        # A new connection must send its request headers within the header timeout.
        self._lb_arm_header_timer()

    def _lb_arm_header_timer(self) -> None:
        timeout = self._lb_runner.limits.header_timeout
        if timeout:
            self._lb_header_timer = self.call_later(timeout, self._lb_header_timeout)

    def _lb_header_timeout(self) -> None:
        self._lb_header_timer = None
        if self.has_request() or self.transport is None:
            return
        log.info(
            "closed a connection from %s: no complete request headers within %gs",
            self.peername,
            self._lb_runner.limits.header_timeout,
        )
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if not self._lb_seen_data:
            self._lb_seen_data = True
            parser = self.parser()
            if data and parser is not None:
                self.set_parser(_FirstFeed(parser, self))  # see _FirstFeed
        # Waiting for a request (not reading a body): its first bytes start the clock.
        waiting = self.waiting_for_request()
        parsed = self.requests_parsed()
        super().data_received(data)
        timer = self._lb_header_timer
        if self.requests_parsed() != parsed:  # its headers are complete
            if timer is not None:
                timer.cancel()
                self._lb_header_timer = None
        elif waiting and timer is None:
            self._lb_arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        timer = self._lb_header_timer
        if timer is not None:
            timer.cancel()
            self._lb_header_timer = None
        super().connection_lost(exc)

    def request_started(self, request: web.BaseRequest) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._lb_runner.in_flight[task] = request

    def request_ended(self, request: web.BaseRequest) -> None:
        task = asyncio.current_task()
        assert task is not None
        del self._lb_runner.in_flight[task]
        if isinstance(request, ProxyRequest):
            request.release_body()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
            status, code = 431, "request_header_fields_too_large"
            text = f"A request header field or the request line is longer than {limit} bytes."
        else:
            status, code = 400, "invalid_request"
            text = "Malformed HTTP request."
        # Never log exc or its message: they quote the offending bytes.
        log.info("refused a request from %s: %s (%s)", request.remote, code, type(exc).__name__)
        resp = web.Response(
            status=status,
            body=error_body(text, "invalid_request_error", code),
            content_type="application/json",
        )
        resp.force_close()
        return resp


class _FirstFeed:
    """The parser for a connection's first bytes, which keeps the requests before junk.

    When bytes that are not HTTP follow complete requests in one read (pipelining), the
    parser raises on the junk and the requests it parsed before are lost: the client
    gets only a 400. On a connection's first read the parser starts at a request
    boundary, so the same bytes are parsed again one request at a time, and the complete
    requests before the junk are answered, then the 400. Later reads are parsed directly
    (their start may be inside a request, so a re-parse could see requests that are not
    there)."""

    __slots__ = ("_handler", "_parser")

    def __init__(self, parser: Any, handler: _RequestHandler) -> None:
        self._parser = parser
        self._handler = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def feed_data(self, data: bytes) -> Any:
        handler = self._handler
        handler.set_parser(self._parser)  # only this first read goes through here
        try:
            return self._parser.feed_data(data)
        except HttpProcessingError as exc:
            messages: list[Any] = _complete_requests(handler, data)
            messages.append(parse_error_message(exc))
            return messages, False, b""


def _complete_requests(handler: _RequestHandler, data: bytes) -> list[Any]:
    """The complete requests at the start of `data`, parsed one at a time."""
    # Pause after each request: what came before junk is kept.
    parser = handler.new_request_parser(max_msg_queue_size=1)
    out: list[Any] = []
    chunk = data
    try:
        while True:
            messages, upgraded, _tail = parser.feed_data(chunk)
            chunk = b""
            if not messages or upgraded:
                break
            for message, payload in messages:
                if not payload.is_eof():  # its body runs into the junk
                    return out
                out.append((message, payload))
            parser.message_consumed()
    except HttpProcessingError:
        pass
    return out


_FULL_BODY = error_body(
    "lbproxy has as many client connections open as it allows; retry shortly",
    "service_unavailable",
    "too_many_connections",
)
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_FULL_BODY), _FULL_BODY)
)


class ProxyRunner(HookedRunner):
    """AppRunner whose connections are bounded by `limits` (see the module's docstring)
    and refuse unparseable requests in OpenAI's error shape."""

    def __init__(
        self, app: web.Application, *, limits: ClientLimits | None = None, **kwargs: Any
    ) -> None:
        limits = limits or ClientLimits()
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        # Bodies are relayed as received and never inflated in lbproxy's memory.
        kwargs.setdefault("auto_decompress", False)
        super().__init__(app, **kwargs)
        self.limits = limits
        self.refused_connections = 0
        # Requests being handled (aiohttp's and the native server's), with their tasks:
        # what a shutdown cuts at its deadline.
        self.in_flight: dict[asyncio.Task[Any], Any] = {}
        # The native server in front of this runner's app (native_server.py), if any:
        # the shutdown waits for its requests too.
        self.native: Any = None
        self._native_grace = float(kwargs.get("shutdown_timeout", 60.0))

    # aiohttp has no public hook for parse errors (they bypass the app and its
    # middlewares), so connections get a handler that answers them; test_ops_auth checks
    # the result against the installed aiohttp.
    def connection_handler(self, server: web.Server, **kwargs: Any) -> RequestHandler:
        handler = _RequestHandler(server, **kwargs)
        handler._lb_runner = self
        handler._lb_admitted = False
        return handler

    def adopt_connection(self) -> asyncio.Protocol:
        """A handler for a connection the native server hands over (already counted
        against the cap); the caller gives it the transport and the bytes read."""
        server = self.server
        assert server is not None
        handler = server()
        handler._lb_admitted = True  # type: ignore[attr-defined]
        return handler

    async def shutdown(self) -> None:
        # Between aiohttp closing its idle connections and waiting for its handlers:
        # the native server's requests get the same grace.
        await super().shutdown()
        if self.native is not None:
            await self.native.drain(self._native_grace)

    def make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        request = new_request(self.app, message, payload, protocol, writer, task, ProxyRequest)
        request._lb_limits = self.limits  # type: ignore[attr-defined]
        return request

    def cut_in_flight(self) -> int:
        """End every request still being handled (the shutdown's deadline): one that has
        no answer yet gets a 503, a stream the SSE error event and its end; each handler
        is cancelled and its connection closed. Cancelling a handler closes its upstream
        connection (vLLM aborts the request)."""
        n = 0
        for task, request in list(self.in_flight.items()):
            if task.done():
                continue
            n += 1
            if isinstance(request, ProxyRequest):
                _end_response(request)
            elif hasattr(request, "end_for_shutdown"):  # native_server.NativeRequest
                request.end_for_shutdown()
            task.cancel()
        return n


_CUT_EVENT = sse_error_event(
    "lbproxy is shutting down: the stream was cut at the end of the shutdown grace period",
    "server_shutting_down",
)


_SHUTTING_DOWN_BODY = error_body(
    "lbproxy is shutting down and the request was not answered within the shutdown grace "
    "period; retry it",
    "service_unavailable",
    "server_shutting_down",
)
SHUTTING_DOWN_RESPONSE = _SHUTTING_DOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_SHUTTING_DOWN_BODY), _SHUTTING_DOWN_BODY)
)


def _end_response(request: ProxyRequest) -> None:
    """Finish what a request cut at the shutdown deadline has sent: a 503 when nothing
    was sent yet (waiting for a backend or in the flow-control queue), the SSE error
    event and the end of the body for a stream being relayed.

    Synchronous, so nothing the (then cancelled) handler writes can come between."""
    resp = request._lb_response
    writer = payload_writer(request)
    transport = request.transport
    if writer is None or transport is None or transport.is_closing():
        return
    if resp is None:
        if writer.output_size == 0:
            transport.write(_SHUTTING_DOWN)
        return
    if not resp.prepared or resp.content_type != "text/event-stream" or writer_ended(writer):
        return
    writer.send_headers()
    data = b"\n\n" + _CUT_EVENT  # a blank line ends an event the backend left open
    if writer.chunked:
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
    elif resp.content_length is None:  # HTTP/1.0: the body ends with the connection
        transport.write(data)
    else:
        return
    writer.set_eof()


async def run_until_signalled(
    close: Callable[[], Awaitable[None]],
    reload: Callable[[], Awaitable[object]] | None,
    *,
    grace: float,
    in_flight: Callable[[], int] = lambda: 0,
) -> None:
    """Serve until SIGTERM/SIGINT, then `close()` (the graceful shutdown); SIGHUP runs
    `reload()`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_stop(sig: signal.Signals) -> None:
        log.info(
            "%s: shutting down; %d requests in flight get up to %gs to finish",
            sig.name,
            in_flight(),
            grace,
        )
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
            signal.signal(s, signal.SIG_DFL)  # a second one ends the process at once
        stop.set()

    async def do_reload() -> None:
        assert reload is not None
        try:
            await reload()
        except Exception as e:  # ConfigError and anything unexpected: keep serving
            log.error("SIGHUP: config not reloaded, the running one stays: %s", e)

    def on_hup() -> None:
        task = loop.create_task(do_reload(), name="lbproxy-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Taken after the handler above is in place, so that no SIGHUP falls in between.
    if startup_hup.take():
        if reload is None:
            log.info("SIGHUP during start-up: no config file to reload, ignored")
        else:
            log.info("SIGHUP during start-up: reloading the config now that lbproxy serves")
            on_hup()
    try:
        await stop.wait()
    finally:
        if reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await close()
    log.info("lbproxy stopped")
