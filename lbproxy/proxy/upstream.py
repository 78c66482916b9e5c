"""The upstream leg: HTTP/1.1 to backends on `asyncio.Protocol` with httptools' parser.

Why not aiohttp's client: per request it builds request, response, timer, stream-reader
and multidict objects, and every body chunk is a future resolved and a coroutine resumed.
Here a request is one `transport.write` of bytes built from the headers, the response
head is one future, and body bytes go from `data_received` (through the parser) straight
to a sink (the client's transport, see `forward._relay`) with no coroutine in between.

- One keep-alive pool per backend address (`UpstreamClient`), most recently used first,
  so the connections a burst opened go idle and are closed after `keepalive` seconds.
- Timeouts: connect; first byte (request sent -> response head, and on to the first body
  byte); idle (the longest gap between body reads). One timer per response, re-armed only
  when it fires (a read just stamps the time), so a chunk costs no timer work.
- Backpressure: the sink says when the other side's buffer is full; reading from the
  backend is then paused until `resume()` (after the other side drained).
- A response is ended by its length, its last chunk, or (neither given) the backend
  closing. Whatever cut it short before that is a failure (`error`); closing the
  connection is how a request is abandoned (vLLM aborts a request whose connection closes).

Errors subclass aiohttp's client errors so that code written against them (P/D legs,
`upstream_failure.failure_cause`) keeps its meaning.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict
from yarl import URL

__all__ = [
    "BadUpstreamResponse",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamResponse",
    "UpstreamTimeout",
]


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """No connection to the backend (refused, unresolvable): the request was not sent."""


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """No TCP connection within the connect timeout: the request was not sent."""


class UpstreamTimeout(aiohttp.ServerTimeoutError):
    """Sent, then no response head (or body byte) in time."""


class UpstreamDisconnected(aiohttp.ServerDisconnectedError):
    """The backend closed or reset the connection once the request was on its way."""


class BadUpstreamResponse(aiohttp.ClientPayloadError):
    """The backend answered something that is not HTTP/1.1."""


_SSL: ssl.SSLContext | None = None
# How long a backend name's resolved address is used for new connections (seconds).
DNS_TTL = 10.0
# The most header bytes a backend's response may have (aiohttp's client allowed 8190 per
# line): a bound on what a broken backend can make lbproxy hold.
MAX_HEAD_BYTES = 65536
# A request target that needs no normalisation (the usual `/v1/chat/completions`).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9/_.~?=&-]*")


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


class _Origin:
    """Where a backend URL points: address, TLS, Host header and path prefix."""

    __slots__ = (
        "addresses",
        "auth",
        "host",
        "host_header",
        "key",
        "literal",
        "port",
        "prefix",
        "resolved_at",
        "tls",
    )

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.tls = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.tls else 80)
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.prefix = u.path.rstrip("/")
        self.key = (self.host, self.port, self.tls)
        try:
            ipaddress.ip_address(self.host)
            self.literal = True
        except ValueError:
            self.literal = False
        self.addresses = [self.host]  # a name's, once resolved (UpstreamClient._addresses)
        self.resolved_at = -DNS_TTL
        # Credentials in the URL: sent as Basic auth (they are the backend's own).
        self.auth: str | None = None
        if u.username is not None:
            user, password = unquote(u.username), unquote(u.password or "")
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class UpstreamConnection(asyncio.Protocol):
    """One connection to a backend; one request at a time."""

    def __init__(self, client: UpstreamClient, key: tuple[str, int, bool]) -> None:
        self.client = client
        self.key = key
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.used = False  # a request went out on it (so it is a kept-alive one)
        self.received = False  # a byte came back for the request in progress
        self.idle_since = 0.0
        self.resp: UpstreamResponse | None = None
        # The timeout check of its responses: one timer kept across them (it may fire
        # early; the response then sets it again for what is due), not one per response.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None or r.ended:  # bytes nobody asked for: the connection is not reusable
            self.close()
            return
        r.last_read = self.loop.time()
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            r.fail(BadUpstreamResponse("the backend switched protocols"))
        except httptools.HttpParserCallbackError as e:  # ours (the head bound)
            r.fail(BadUpstreamResponse(f"the backend's answer is refused: {e.__context__}"))
        except httptools.HttpParserError as e:
            r.fail(BadUpstreamResponse(f"the backend's answer is not HTTP/1.1: {e}"))
        finally:
            # The body pieces of one read go on as one write (a burst of small chunks
            # is one write to the client, not one each): `flush`, inline, as this runs
            # for every read of a stream.
            b = r.buffered
            if b and r.sink is not None:
                piece = b[0] if len(b) == 1 else b"".join(b)
                b.clear()
                r.sink(piece)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.disarm()
        r = self.resp
        if r is not None and not r.ended:
            if r.head_done and r.until_close:
                r.finish()  # neither length nor chunks: the body ends where the connection does
            else:
                r.fail(UpstreamDisconnected(f"the backend closed the connection ({exc})"))

    def pause_writing(self) -> None:  # a request larger than the socket buffer: fine
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks
    def on_status(self, reason: bytes) -> None:
        assert self.resp is not None
        self.resp.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.resp
        assert r is not None
        r.head_bytes += len(name) + len(value)
        if r.head_bytes > MAX_HEAD_BYTES:  # raising here makes feed_data raise
            raise BadUpstreamResponse(f"response head over {MAX_HEAD_BYTES} bytes")
        r.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.resp
        assert r is not None
        p = self.parser
        r.status = p.get_status_code()
        if r.status < 200:  # 1xx: an interim answer; the real head follows
            r.raw_headers.clear()
            r.reason = ""
            return
        r.keep_alive = p.should_keep_alive()
        r.on_head()

    def on_body(self, body: bytes) -> None:
        r = self.resp
        assert r is not None
        r.got_body = True  # from now on the idle timeout bounds the gaps (see __init__)
        r.buffered.append(body)

    def on_message_complete(self) -> None:
        r = self.resp
        if r is not None and r.status >= 200:
            r.finish()

    def close(self) -> None:
        self.lost = True
        self.disarm()
        if self.transport is not None:
            self.transport.close()

    # -- the responses' timer
    def arm(self, when: float) -> None:
        """Have the current response's timeout checked at `when`, or earlier."""
        t = self.timer
        if t is not None:
            if self.timer_at <= when:
                return
            t.cancel()
        self.timer = self.loop.call_at(when, self._on_timer)
        self.timer_at = when

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        r = self.resp
        if r is not None:
            r.check_timeout()


class UpstreamResponse:
    """A response from a backend: status and headers once `await`ed, then its body either
    read whole (`read`) or handed to a sink as it arrives (`relay_to`)."""

    __slots__ = (
        "_deadline",
        "_waiter",
        "buffered",
        "clen",
        "conn",
        "ctype",
        "ended",
        "error",
        "first_byte_timeout",
        "got_body",
        "head_bytes",
        "head_done",
        "idle_timeout",
        "keep_alive",
        "last_read",
        "loop",
        "paused",
        "raw_headers",
        "reason",
        "sink",
        "status",
        "te",
        "until_close",
    )

    def __init__(self, conn: UpstreamConnection, first_byte: float, idle: float) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        # The first Content-Length, Transfer-Encoding and Content-Type of the head (on_head).
        self.clen: bytes | None = None
        self.te: bytes | None = None
        self.ctype: bytes | None = None
        self.head_bytes = 0
        self.keep_alive = False
        self.until_close = False
        self.head_done = False
        self.ended = False  # the body is complete (or failed: see error)
        self.error: BaseException | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.buffered: list[bytes] = []
        self.last_read = self.loop.time()
        self.got_body = False
        self.first_byte_timeout = first_byte
        self.idle_timeout = idle
        self._waiter: asyncio.Future[None] | None = None
        # One check for both bounds, due at the earlier: it can only come early (then it
        # is set again for what is due), so the first body byte need not re-arm it.
        conn.arm(self.last_read + min(first_byte, idle))
        self._deadline: asyncio.TimerHandle | None = None  # a total time bound, if any
        self.paused = False

    # -- what the connection tells it
    def on_head(self) -> None:
        self.head_done = True
        p = self.conn.parser
        # httptools does not say how the body is framed: a response with neither a length
        # nor chunks (and that can have a body) runs until the connection closes.
        # One pass also keeps what the relay asks of the head (no scan per question).
        clen = te = ctype = None
        chunked = False
        for k, v in self.raw_headers:
            lk = k.lower()
            if lk == b"content-length":
                if clen is None:
                    clen = v
            elif lk == b"transfer-encoding":
                chunked = chunked or b"chunked" in v.lower()
                if te is None:
                    te = v
            elif lk == b"content-type" and ctype is None:
                ctype = v
        self.clen, self.te, self.ctype = clen, te, ctype
        framed = clen is not None or chunked
        self.until_close = not framed and self.status not in (204, 304)
        if self.until_close:
            self.keep_alive = False
        del p
        self._wake()

    def finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._cancel_timers()
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = exc
        self._cancel_timers()
        self.conn.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _cancel_timers(self) -> None:
        # (the connection's timer stays for its next response; it finds none, or this
        # one ended, if it fires first)
        if self._deadline is not None:
            self._deadline.cancel()

    def check_timeout(self) -> None:
        """The connection's timer: fail the response if its backend has been silent
        too long, else have it come back when that could be."""
        if self.ended:
            return
        span = self.idle_timeout if self.got_body else self.first_byte_timeout
        due = self.last_read + span
        if self.loop.time() < due:  # data came since the timer was armed: wait on
            self.conn.arm(due)
            return
        if self.paused:  # reading is paused by us (a slow client): not the backend's fault
            self.conn.arm(self.loop.time() + span)
            return
        what = "a body byte" if self.head_done else "a response"
        self.fail(UpstreamTimeout(f"no {what} from the backend within {span:g}s"))

    def set_total_timeout(self, seconds: float) -> None:
        self._deadline = self.loop.call_later(
            seconds,
            lambda: self.fail(UpstreamTimeout(f"no complete answer within {seconds:g}s")),
        )

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the response head
    async def start(self) -> None:
        """Wait for the head; raises the attempt's error (timeout, reset, garbage)."""
        while not self.head_done and self.error is None:
            await self._wait()
        if not self.head_done:
            assert self.error is not None
            raise self.error

    def header(self, name: bytes) -> bytes | None:
        """One header's raw value (name in lower case), without building the multidict."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None

    @property
    def content_length(self) -> int | None:
        v = self.clen if self.head_done else self.header(b"content-length")
        return int(v) if v is not None else None

    # -- the body
    def relay_to(self, sink: Callable[[bytes], None]) -> None:
        """From now on the body bytes of each read from the backend go to `sink` at once
        (and those already here, now)."""
        self.sink = sink
        if self.buffered:
            self.flush()

    def flush(self) -> None:  # as at the end of UpstreamConnection.data_received
        b = self.buffered
        assert self.sink is not None
        piece = b[0] if len(b) == 1 else b"".join(b)
        b.clear()
        self.sink(piece)

    def pause(self) -> None:
        """The sink's other side is full: stop reading from the backend."""
        t = self.conn.transport
        if not self.paused and t is not None and not self.ended:
            self.paused = True
            t.pause_reading()
            self._wake()

    def resume(self) -> None:
        t = self.conn.transport
        if self.paused:
            self.paused = False
            self.last_read = self.loop.time()  # the pause is not the backend's gap
            if t is not None and not t.is_closing():
                t.resume_reading()

    async def wait(self) -> None:
        """Until the body ended, failed, or reading was paused."""
        if not self.ended and not self.paused:
            await self._wait()

    async def read(self) -> bytes:
        while not self.ended:
            await self._wait()
        if self.error is not None:
            raise self.error
        body = b"".join(self.buffered)
        self.buffered = []
        self.release()
        return body

    def release(self) -> None:
        """Done with the response: a complete one gives its connection back to the pool,
        anything else closes it (which is how a backend learns a request was abandoned)."""
        conn = self.conn
        if conn.resp is not self:
            return
        conn.resp = None
        self._cancel_timers()
        if self.ended and self.error is None and self.keep_alive and not conn.lost:
            conn.client.put_back(conn)
        else:
            self.ended = True
            conn.close()

    def close(self) -> None:
        self.fail(UpstreamDisconnected("closed by lbproxy"))
        self.release()

    # aiohttp.ClientResponse's context-manager use (P/D legs): release at the end.
    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Post:
    """`await client.post(...)` or `async with client.post(...) as r` (as with aiohttp)."""

    __slots__ = ("coro", "resp")

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.resp: UpstreamResponse | None = None

    def __await__(self) -> Any:
        return self.coro.__await__()

    async def __aenter__(self) -> UpstreamResponse:
        self.resp = await self.coro
        return self.resp

    async def __aexit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.release()


class UpstreamClient:
    """Keep-alive connection pools to backends, one per address."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        first_byte_timeout: float = 600.0,
        idle_timeout: float = 300.0,
        keepalive: float = 15.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self._idle: dict[tuple[str, int, bool], list[UpstreamConnection]] = {}
        self._origins: dict[str, _Origin] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    def _origin(self, base: str) -> _Origin:
        o = self._origins.get(base)
        if o is None:
            o = self._origins[base] = _Origin(base)
        return o

    async def _connection(self, o: _Origin, reuse: bool = True) -> UpstreamConnection:
        idle = self._idle.get(o.key)
        while idle and reuse:
            conn = idle.pop()  # the most recently used: the others may idle out
            if not conn.lost:
                return conn
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await self._addresses(o)
                for i, address in enumerate(addresses):  # each address of the name in turn
                    try:
                        _, conn = await self.loop.create_connection(
                            lambda: UpstreamConnection(self, o.key),
                            address,
                            o.port,
                            ssl=_ssl_context() if o.tls else None,
                            server_hostname=o.host if o.tls else None,
                        )
                        break
                    except OSError:
                        if i == len(addresses) - 1:
                            raise
        except TimeoutError:
            o.resolved_at = -DNS_TTL  # resolve again next time
            raise UpstreamConnectTimeout(
                f"no connection to {o.host}:{o.port} within {self.connect_timeout:g}s"
            ) from None
        except OSError as e:
            o.resolved_at = -DNS_TTL
            raise UpstreamConnectError(f"cannot connect to {o.host}:{o.port}: {e}") from e
        return conn

    async def _addresses(self, o: _Origin) -> list[str]:
        """The backend's addresses: a name is resolved at most every DNS_TTL seconds (as
        aiohttp's client did), not for each new connection of a burst."""
        now = self.loop.time()
        if not o.literal and now - o.resolved_at >= DNS_TTL:
            infos = await self.loop.getaddrinfo(o.host, o.port, type=socket.SOCK_STREAM)
            o.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            o.resolved_at = now
        return o.addresses

    async def request(
        self,
        base: str,
        target: str,
        body: bytes,
        headers: CIMultiDict[str],
        *,
        first_byte_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> UpstreamResponse:
        """POST `body` to `base` + `target` (raw path and query) and wait for the head."""
        o = self._origin(base)
        if not _PLAIN_TARGET.fullmatch(target):
            # Percent-encoding normalised as aiohttp's client (yarl) did: `/%76%31/x` goes
            # up as `/v1/x`, a `"` as `%22`.
            target = URL(target).raw_path_qs
        head = [f"POST {o.prefix}{target} HTTP/1.1\r\nHost: {o.host_header}\r\n"]
        auth = o.auth
        for k, v in headers.items():
            if auth is None or k.lower() != "authorization":
                head.append(f"{k}: {v}\r\n")
        if auth is not None:
            head.append(f"Authorization: {auth}\r\n")
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape") + body
        fb = self.first_byte_timeout if first_byte_timeout is None else first_byte_timeout
        conn = await self._connection(o)
        reused = conn.used
        while True:
            conn.used = True
            conn.received = False
            r = conn.resp = UpstreamResponse(conn, fb, self.idle_timeout)
            if total_timeout is not None:
                r.set_total_timeout(total_timeout)
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                await r.start()
                return r
            except UpstreamDisconnected:
                r.release()
                if not reused or conn.received:
                    raise
                # A kept-alive connection the backend closed as we reused it (its idle
                # timeout): it never read the request. Once more, on a new connection.
                conn = await self._connection(o, reuse=False)
                reused = False
            except BaseException:
                r.release()  # not ended: the connection closes (vLLM aborts the request)
                raise

    def post(
        self, url: str, *, data: bytes, headers: CIMultiDict[str], timeout: Any = None
    ) -> _Post:
        """aiohttp.ClientSession.post's shape, for the P/D legs: `timeout` an
        aiohttp.ClientTimeout (`total` bounds the whole answer, `sock_read` the head)."""
        scheme, _, rest = url.partition("://")
        host, slash, target = rest.partition("/")
        first = getattr(timeout, "sock_read", None)
        total = getattr(timeout, "total", None)
        return _Post(
            self.request(
                f"{scheme}://{host}",
                slash + target,
                data,
                headers,
                first_byte_timeout=first,
                total_timeout=total,
            )
        )

    def put_back(self, conn: UpstreamConnection) -> None:
        if self.closed:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive / 2, self._close_idle)

    def _close_idle(self) -> None:
        self._sweep = None
        cutoff = self.loop.time() - self.keepalive
        left = False
        for conns in self._idle.values():
            keep = [c for c in conns if not c.lost and c.idle_since > cutoff]
            for c in conns:
                if c not in keep:
                    c.close()
            conns[:] = keep
            left = left or bool(keep)
        if left:
            self._sweep = self.loop.call_later(self.keepalive / 2, self._close_idle)

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
