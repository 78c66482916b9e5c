"""Reading a client's request body within bounds: size, time, shared memory, encoding.

lbproxy holds each request's body in memory until the request ends (it is parsed to
route and re-sent on a retry), so what bodies may cost is bounded here:

- `limits.max_body_bytes` per body: a larger Content-Length is refused (413) before a
  byte of the body is read; a chunked body is refused when it grows past it.
- `limits.max_buffered_body_bytes` for all bodies held at once: a body that would take
  the total past it is refused at once with 503 and Retry-After (by its Content-Length,
  or chunk by chunk for a chunked body). A body is counted until its request has ended.
- `limits.client_body_timeout`: the longest gap between two pieces of a body, and
  `limits.client_body_min_rate`: the slowest average rate (the whole body gets the
  timeout plus a second per that many bytes); then 408 and the connection is closed
  (the key's concurrency slot is released with the request).
- A body is read into one buffer of its Content-Length and handed on as a view of it,
  never copied (aiohttp's own read grows a buffer chunk by chunk, then copies it; the
  client library copies a bytearray again when it sends it).
- Bodies are never decompressed (the server runs with auto_decompress off): a body with a
  Content-Encoding other than identity is refused with 415, since lbproxy must parse the
  JSON to route it and vLLM does not accept compressed request bodies either.

Errors that leave the body unread close the connection after the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDictProxy

from lbproxy.proxy.aiohttp_compat import HookedRequest, no_lingering_close
from lbproxy.proxy.client_io import AiohttpSink, start_aiohttp_response
from lbproxy.proxy.client_limits import ClientLimits
from lbproxy.proxy.errors import (
    BadRequest,
    BodyBufferFull,
    BodyTooLarge,
    RequestTimeout,
    UnsupportedContentEncoding,
)


class RequestHead(Protocol):
    """What the checks before the body read: aiohttp's request, or asgi_io.AsgiRequest."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def client_max_size(self) -> int: ...


def _encoding_refused(request: RequestHead) -> str | None:
    """The first Content-Encoding other than identity, else None."""
    for value in request.headers.getall("Content-Encoding", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token != "identity":
                return token
    return None


def check_before_body(request: RequestHead, limits: ClientLimits) -> None:
    """Refuse, before reading a byte of the body, what its headers already rule out."""
    encoding = _encoding_refused(request)
    if encoding is not None:
        raise UnsupportedContentEncoding(
            f"request bodies with Content-Encoding {encoding[:40]!a} are not accepted: "
            "send the JSON body uncompressed"
        )
    length = request.content_length
    if length is None:
        return
    if length > request.client_max_size:
        raise BodyTooLarge(f"request body exceeds the limit of {request.client_max_size} bytes")
    if not limits.budget.room_for(length):
        raise buffer_full()


def buffer_full() -> BodyBufferFull:
    return BodyBufferFull(
        "lbproxy is holding as many request bodies as its memory budget allows; retry shortly"
    )


class ProxyRequest(HookedRequest):
    """aiohttp's Request with a bounded `read()` (see the module's docstring)."""

    ATTRS = HookedRequest.request_attrs("_lb_limits", "_lb_held", "_lb_response")
    _lb_limits: ClientLimits
    _lb_held: int = 0  # bytes of the budget this request holds
    _lb_response: web.StreamResponse | None = None  # once prepared (a shutdown may cut it)

    def response_prepared(self, response: web.StreamResponse) -> None:
        self._lb_response = response

    # --- client_io.ClientRequest (what the data path reads and writes) ---

    @property
    def raw_target(self) -> str:
        return self.rel_url.raw_path_qs

    async def start_response(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        extra: Mapping[str, str],
        length: int | None,
        hold: bool,
        sse: bool,
    ) -> AiohttpSink:
        return await start_aiohttp_response(self, status, reason, headers, extra, length, hold)

    async def read_body(self) -> bytes:
        return await self._read_bounded()

    def release_body(self) -> None:
        """Give the body's bytes back to the budget (when the request has ended)."""
        if self._lb_held:
            self._lb_limits.budget.give_back(self._lb_held)
            self._lb_held = 0

    def _hold(self, n: int) -> None:
        if not self._lb_limits.budget.take(n):
            raise buffer_full()
        self._lb_held += n

    async def _read_bounded(self) -> bytes:
        limits = self._lb_limits
        check_before_body(self, limits)
        payload = self.content
        length = self.content_length
        max_size = self.client_max_size
        loop = asyncio.get_running_loop()
        idle, min_rate = limits.body_timeout, limits.body_min_rate
        t0 = loop.time()
        received = 0

        def next_deadline() -> float:
            # The next gap may last `idle`, but the whole body gets no more than `idle`
            # plus a second per `min_rate` bytes received: a trickle cannot last forever.
            end = loop.time() + idle
            return min(end, t0 + idle + received / min_rate) if min_rate else end

        try:
            async with asyncio.timeout(idle) as deadline:
                if length is not None:
                    self._hold(length)
                    buf = bytearray(length)
                    view = memoryview(buf)
                    while received < length:
                        chunk = await payload.readany()
                        if not chunk:
                            raise BadRequest("request body ended before its Content-Length")
                        view[received : received + len(chunk)] = chunk
                        received += len(chunk)
                        deadline.reschedule(next_deadline())
                else:  # chunked (or no body): counted as it arrives
                    buf = bytearray()
                    while chunk := await payload.readany():
                        if received + len(chunk) > max_size:
                            raise BodyTooLarge(
                                f"request body exceeds the limit of {max_size} bytes"
                            )
                        self._hold(len(chunk))
                        buf += chunk
                        received += len(chunk)
                        deadline.reschedule(next_deadline())
                    view = memoryview(buf)
        except TimeoutError:
            # No lingering close (aiohttp reads what is left for up to 10 s): this client
            # has been trickling long enough.
            no_lingering_close(self)
            rate = f" or under {min_rate} bytes/s on average" if min_rate else ""
            raise RequestTimeout(
                f"the request body arrived too slowly (a gap over {idle:g} s{rate}); "
                "the request is dropped"
            ) from None
        # A view of the buffer, not a copy: bytes() would double the peak, and the client
        # library slices what it sends (a bytearray slice is a copy, a view's is not).
        # Callers only parse it, measure it and send it.
        return view  # type: ignore[return-value]

    async def text(self) -> str:
        return bytes(await self.read()).decode(self.charset or "utf-8")
