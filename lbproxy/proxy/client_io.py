"""What the data path needs of a client's request, whichever server read it.

Two servers face clients: lbproxy's own protocol (native_server.py) for plain
`POST /v1/*` requests, and aiohttp for everything else (client_body.ProxyRequest); under
an ASGI server (lbproxy/asgi.py), asgi_io.py serves `POST /v1/*`. The Forwarder, auth,
flow control, tracing and the P/D split read a request and write its response only
through `ClientRequest` and `ResponseSink`, which all three implement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDictProxy

from lbproxy.proxy.aiohttp_compat import (
    AbstractStreamWriter,
    chunk_sender,
    hold_head,
    payload_writer,
    write_now,
)


class ResponseSink(Protocol):
    """A response whose head is decided: its body goes out through this."""

    status: int
    # None: the client left before the head could be written.
    transport: asyncio.Transport | None

    def write_first(self, chunk: bytes) -> None:
        """Write a body piece without awaiting (the held head goes along); raises
        ConnectionResetError when the client left or the response was ended."""

    def sender(self) -> Callable[[bytes], None] | None:
        """After `write_first`: a cheaper function for the next pieces, or None (keep
        calling `write_first`)."""

    def chunk_transport(self) -> asyncio.Transport | None:
        """After `write_first`: the transport to which the caller may write the next
        pieces itself, each framed as an HTTP/1.1 chunk, while the sink's `eof` (which a
        sink that returns one has) stays false and the transport is open: the cheapest way
        on, no call per piece. None: use `sender`."""

    async def drain(self) -> None:
        """Return once the client's write buffer is below its low-water mark."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...

    def result(self) -> Any:
        """What the request's handler returns (aiohttp wants its StreamResponse)."""


class ClientRequest(Protocol):
    """A client's request as the data path reads it."""

    method: str
    path: str  # decoded path, no query
    client_max_size: int

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def raw_target(self) -> str:
        """Path and query as the client sent them (what goes upstream)."""

    @property
    def remote(self) -> str | None: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    async def read(self) -> bytes:
        """The body, within the lifecycle's time and memory limits (ProxyError else)."""

    async def start_response(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        extra: Mapping[str, str],
        length: int | None,
        hold: bool,
        sse: bool,
    ) -> ResponseSink:
        """Decide the response's head: `headers` then `extra` (which replace any of
        `headers` by the same name), sized by `length` or chunked when None. `hold`: the
        head waits for the first body piece (one write for both)."""


class AiohttpSink:
    """`ResponseSink` over aiohttp's StreamResponse and its writer."""

    __slots__ = ("resp", "status", "transport", "writer")

    def __init__(
        self,
        resp: web.StreamResponse,
        writer: AbstractStreamWriter | None,
        transport: asyncio.Transport | None,
    ) -> None:
        self.resp, self.status = resp, resp.status
        self.writer = writer
        self.transport = transport if writer is not None else None

    def write_first(self, chunk: bytes) -> None:
        assert self.writer is not None
        write_now(self.writer, chunk)

    def sender(self) -> Callable[[bytes], None] | None:
        assert self.writer is not None
        return chunk_sender(self.writer, self.transport)

    def chunk_transport(self) -> None:
        return None  # aiohttp's writer frames and counts what it sends

    async def drain(self) -> None:
        assert self.writer is not None
        await self.writer.drain()

    async def write(self, data: bytes) -> None:
        await self.resp.write(data)

    async def write_eof(self) -> None:
        await self.resp.write_eof()

    def result(self) -> web.StreamResponse:
        return self.resp


async def start_aiohttp_response(
    request: web.BaseRequest,
    status: int,
    reason: str | None,
    headers: list[tuple[str, str]],
    extra: Mapping[str, str],
    length: int | None,
    hold: bool,
) -> AiohttpSink:
    resp = web.StreamResponse(status=status, reason=reason or None)
    resp.headers.extend(headers)
    for k, v in extra.items():
        resp.headers[k] = v
    if length is not None:
        resp.content_length = length
    if hold:
        hold_head(resp)
    await resp.prepare(request)
    return AiohttpSink(resp, payload_writer(request), request.transport)
