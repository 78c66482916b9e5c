"""client_io's request and response over ASGI `receive`/`send` (lbproxy/asgi.py).

The Forwarder writes body pieces synchronously, from the upstream protocol's callback
(forward._BodyRelay), while an ASGI `send` is a coroutine: the pieces go into a queue
that one task per response (`AsgiSink._pump`) hands to `send` in order, each piece as
one `http.response.body` message with `more_body=True`, as it came from the backend
(never re-framed; the ASGI server frames them; the last one ends the body when it is
known to be the last, as for a non-stream answer). The queue's size stands for the
transport's write buffer: over `_HIGH` bytes the backend is no longer read until the
server took it below `_LOW`.

The client leaving (`http.disconnect` after the body was read) cancels the request's
task, as aiohttp's handler_cancellation does, which closes the upstream connection so
that vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from lbproxy.proxy.client_body import buffer_full, check_before_body
from lbproxy.proxy.client_limits import ClientLimits
from lbproxy.proxy.errors import BadRequest, BodyTooLarge, RequestTimeout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The queue of body pieces not yet taken by the server: its write buffer's marks.
_HIGH = 64 * 1024
_LOW = 16 * 1024


def _latin1(s: str) -> bytes:
    return s.encode("latin-1")


def _value(s: str) -> bytes:
    # Header values were decoded as UTF-8 keeping undecodable bytes (headers.py).
    return s.encode("utf-8", "surrogateescape")


def response_head(
    status: int, headers: list[tuple[str, str]], extra: Mapping[str, str], length: int | None
) -> Message:
    """An `http.response.start` message: `headers` minus those `extra` replaces, `extra`,
    and Content-Length when known (else the server frames the body, chunked)."""
    skip = {k.lower() for k in extra}
    out = [(_latin1(k), _value(v)) for k, v in headers if k.lower() not in skip]
    out.extend((_latin1(k), _value(v)) for k, v in extra.items())
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return {"type": "http.response.start", "status": status, "headers": out}


async def send_response(send: Send, resp: web.Response) -> None:
    """An unsent aiohttp Response (an error lbproxy answers) through `send`."""
    body = resp.body if isinstance(resp.body, bytes) else b""
    headers = [
        (k, v)
        for k, v in resp.headers.items()
        if k.lower() not in ("content-length", "transfer-encoding", "connection", "date")
    ]
    if not resp.keep_alive and resp.keep_alive is not None:  # force_close(): body unread
        headers.append(("Connection", "close"))
    await send(response_head(resp.status, headers, {}, len(body)))
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ClientLeft(ConnectionResetError):
    """The client disconnected while its request was being read or answered."""


class AsgiSink:
    """client_io.ResponseSink over ASGI `send` (see the module's docstring). It is its own
    `transport` for forward._BodyRelay: write-buffer size and marks, closing, close.

    The pump starts on the loop's next turn after the first piece; a body that is whole
    by `write_eof` (a non-stream answer) is sent from the request's own task instead,
    with no task of its own."""

    __slots__ = (
        "_drained",
        "_ending",
        "_open",
        "_pump_done",
        "_pump_task",
        "_pumping",
        "_start",
        "_wake",
        "closed",
        "cut",
        "ended",
        "queue",
        "queued",
        "send",
        "sse",
        "status",
        "transport",
    )  # fmt: skip

    def __init__(self, send: Send, status: int, sse: bool, open_: bool) -> None:
        self.send, self.status, self.sse = send, status, sse
        self._open = open_
        self.transport: AsgiSink | None = self if open_ else None
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.closed = not open_  # the client left, or the body was cut
        self.cut = False  # close(): the body must end without its end
        self.ended = False  # the response's last message was sent
        self._ending = False
        self._wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._start: asyncio.Handle | None = None
        self._pumping = self._pump_done = False

    # --- what forward._BodyRelay reads of a transport ---
    def get_write_buffer_limits(self) -> tuple[int, int]:
        return _LOW, _HIGH

    def get_write_buffer_size(self) -> int:
        return self.queued

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        """Cut the body (a backend failed mid-response): what is queued goes, then the
        response is left unfinished, so the server closes the connection."""
        self.cut = self.closed = True
        self._kick()

    # --- client_io.ResponseSink ---
    def write_first(self, chunk: bytes) -> None:
        if self.closed or self._ending:
            raise ConnectionResetError("the response has ended or its client left")
        self.queue.append(chunk)
        self.queued += len(chunk)
        self._kick()

    def sender(self) -> Callable[[bytes], None] | None:
        return None  # write_first is the one way in

    def chunk_transport(self) -> None:
        return None  # the ASGI server frames the body

    async def drain(self) -> None:
        if self.queued > _LOW and not self.closed:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def write(self, data: bytes) -> None:
        self.write_first(data)

    async def write_eof(self) -> None:
        if self._ending or not self._open:
            return
        self._ending = True
        if self._pump_task is None and not self._pumping:  # all here: send it from here
            if self._start is not None:
                self._start.cancel()
                self._start = None
            await self._pump()
            return
        self._kick()
        await self.finished()

    def result(self) -> AsgiSink:
        return self

    async def finished(self) -> None:
        """Until the pump has sent everything it will send."""
        if self._start is not None:  # not started yet: start it now
            self._start.cancel()
            self._start_pump()
        if self._pump_task is not None:
            await asyncio.shield(self._pump_task)

    def end_now(self, tail: bytes) -> None:
        """The shutdown's cut: `tail` (the SSE error event) after what is queued, then the
        body's end."""
        if not self.closed and not self._ending:
            if tail:
                self.write_first(tail)
            self._ending = True
            self._kick()

    def client_left(self) -> None:
        self.closed = True
        self._kick()

    def _kick(self) -> None:
        w = self._wake
        if w is not None:
            self._wake = None
            if not w.done():
                w.set_result(None)
        elif self._open and not (
            self._pumping or self._pump_done or self._start or self._pump_task
        ):
            self._start = asyncio.get_running_loop().call_soon(self._start_pump)
        d = self._drained
        if d is not None and self.closed:
            self._drained = None
            if not d.done():
                d.set_result(None)

    def _start_pump(self) -> None:
        self._start = None
        if self._pump_task is None and not (self._pumping or self._pump_done):
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        send, queue = self.send, self.queue
        loop = asyncio.get_running_loop()
        self._pumping = True
        try:
            while True:
                while queue and not (self.closed and not self.cut):
                    chunk = queue.popleft()
                    if not queue and self._ending and not self.closed:  # the last piece
                        await send({"type": "http.response.body", "body": chunk})
                        self.ended = True
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self.queued -= len(chunk)
                    d = self._drained
                    if d is not None and self.queued <= _LOW:
                        self._drained = None
                        if not d.done():
                            d.set_result(None)
                if self.closed:
                    return  # left, or cut: never a complete-looking body
                if self._ending:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    self.ended = True
                    return
                self._wake = loop.create_future()
                await self._wake
        except OSError:  # the server says the client left
            self.closed = True
        finally:
            self._pumping, self._pump_done = False, True
            self.queue.clear()
            self.queued = 0
            d = self._drained
            if d is not None and not d.done():
                d.set_result(None)


class AsgiRequest:
    """client_io.ClientRequest for an ASGI `http` scope (a POST /v1/* request)."""

    __slots__ = (
        "_receive",
        "_send",
        "_watch",
        "client_max_size",
        "disconnected",
        "headers",
        "held",
        "limits",
        "method",
        "path",
        "raw_target",
        "remote",
        "shutdown_cut",
        "sink",
        "task",
    )  # fmt: skip

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, limits: ClientLimits, max_body: int
    ) -> None:
        self._receive, self._send = receive, send
        self.method = scope["method"]
        self.path = scope["path"]
        raw = scope.get("raw_path") or quote(self.path).encode("latin-1")
        qs = scope.get("query_string") or b""
        self.raw_target = (raw + b"?" + qs if qs else raw).decode("latin-1")
        self.headers = CIMultiDictProxy(
            CIMultiDict(
                (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                for k, v in scope["headers"]
            )
        )
        client = scope.get("client")
        self.remote: str | None = client[0] if client else None
        self.limits = limits
        self.client_max_size = max_body
        self.held = 0  # bytes of the body budget this request holds
        self.sink: AsgiSink | None = None
        self.disconnected = False
        self.shutdown_cut = False  # ended by the shutdown's deadline
        self.task = asyncio.current_task()  # cancelled when the client leaves
        self._watch: asyncio.Task[None] | None = None

    @property
    def content_length(self) -> int | None:
        v = self.headers.get("Content-Length")
        return int(v) if v is not None and v.isdigit() else None

    @property
    def transport(self) -> AsgiSink | None:
        return self.sink.transport if self.sink is not None else None

    async def read(self) -> bytes:
        limits = self.limits
        check_before_body(self, limits)  # 415, 413, 503 from the headers alone
        length = self.content_length
        max_size = self.client_max_size
        if length is not None:
            self._hold(length)
        loop = asyncio.get_running_loop()
        idle, min_rate = limits.body_timeout, limits.body_min_rate
        t0 = loop.time()
        received = 0
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(idle) as deadline:
                while True:
                    msg = await self._receive()
                    if msg["type"] == "http.disconnect":
                        self.disconnected = True
                        raise ClientLeft("the client left while sending its body")
                    piece = msg.get("body", b"")
                    if piece:
                        received += len(piece)
                        if length is None:  # chunked: counted as it arrives
                            if received > max_size:
                                raise BodyTooLarge(
                                    f"request body exceeds the limit of {max_size} bytes"
                                )
                            self._hold(len(piece))
                        chunks.append(piece)
                    if not msg.get("more_body", False):
                        break
                    end = loop.time() + idle  # as client_body: a gap, and an average rate
                    deadline.reschedule(
                        min(end, t0 + idle + received / min_rate) if min_rate else end
                    )
        except TimeoutError:
            rate = f" or under {min_rate} bytes/s on average" if min_rate else ""
            raise RequestTimeout(
                f"the request body arrived too slowly (a gap over {idle:g} s{rate}); "
                "the request is dropped"
            ) from None
        if length is not None and received != length:
            raise BadRequest("request body ended before its Content-Length")
        # From here the client can only leave: watch for it.
        self._watch = loop.create_task(self._watch_disconnect())
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _hold(self, n: int) -> None:
        if not self.limits.budget.take(n):
            raise buffer_full()
        self.held += n

    async def _watch_disconnect(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                break
        sink = self.sink
        if sink is not None and sink.ended:
            return  # answered in full: nothing to stop
        self.disconnected = True
        if sink is not None:
            sink.client_left()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def finish(self) -> None:
        """The request has ended: stop watching, give the body's bytes back."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.held:
            self.limits.budget.give_back(self.held)
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
    ) -> AsgiSink:
        if self.disconnected:
            sink = self.sink = AsgiSink(self._send, status, sse, open_=False)
            return sink
        # `hold` saves a write on lbproxy's own server; an ASGI server writes the head
        # when it gets it either way.
        await self._send(response_head(status, headers, extra, length))
        sink = self.sink = AsgiSink(self._send, status, sse, open_=True)
        return sink
