"""Under ASGI, the requests that are not the data path go to lbproxy's aiohttp application.

The operator routes (/health, /ready, /metrics, /dashboard, /admin/*, GET /v1/models,
the 404/405 fallbacks) are aiohttp handlers. Rather than a second implementation, the
ASGI face serves the same `web.Application` on a Unix socket in a private directory
(mode 0700) and relays each such request to it: same handlers, same middlewares, same
status codes and bodies. It costs a local round trip, on routes that are not the hot
path. With middlewares on the app (state.redis), POST /v1/* goes this way too, as it
goes through aiohttp on the native server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

import aiohttp
from aiohttp import web

from lbproxy.proxy.asgi_io import Receive, Scope, Send, response_head
from lbproxy.proxy.headers import HOP_BY_HOP, downstream_headers
from lbproxy.proxy.lifecycle import ProxyRunner

# Not sent to the local application: framing is the client library's, and the ASGI
# server already answered `Expect: 100-continue` when the body was read.
_NOT_SENT = HOP_BY_HOP | {"content-length", "expect"}


class Loopback:
    """The aiohttp application on a private Unix socket, and a client for it."""

    def __init__(self, runner: ProxyRunner, max_body: int) -> None:
        self.runner = runner
        self.max_body = max_body
        self.dir: str | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lbproxy-asgi-")  # 0700: this user only
        path = os.path.join(self.dir, "app.sock")
        await web.UnixSite(self.runner, path).start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay one request; the client leaving closes the local request (whose handler
        aiohttp then cancels)."""
        body, left = await _read_body(receive, self.max_body + 1)
        if left:
            return
        relay = asyncio.get_running_loop().create_task(self._relay(scope, body, send))
        watch = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        try:
            await asyncio.wait((relay, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not relay.done():
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await relay

    async def _relay(self, scope: Scope, body: bytes, send: Send) -> None:
        assert self.session is not None
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _NOT_SENT
        ]
        raw = scope.get("raw_path") or scope["path"].encode()
        qs = scope.get("query_string") or b""
        target = (raw + b"?" + qs if qs else raw).decode("latin-1")
        async with self.session.request(
            scope["method"],
            "http://lbproxy" + target,
            data=body or None,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            length = resp.content_length
            te = resp.headers.get("Transfer-Encoding", "")
            if "chunked" in te.lower():
                length = None
            out = downstream_headers(list(resp.raw_headers))
            await send(response_head(resp.status, out, {}, length))
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive, cap: int) -> tuple[bytes, bool]:
    """The request's body, at most `cap` bytes kept (the application answers 413 past its
    limit); and whether the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"", True
        piece = msg.get("body", b"")
        if piece and size < cap:
            chunks.append(piece)
            size += len(piece)
        if not msg.get("more_body", False):
            return b"".join(chunks), False


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
