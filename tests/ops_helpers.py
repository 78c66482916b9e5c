"""Helpers of the operations tests: fault injection in front of simulated backends, a
server that answers garbage, killing a server, and proxies started from a config file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Self

import aiohttp
import yaml
from aiohttp import web

from lbproxy.config import load_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from tests.fake_backend import site_servers, stop_accepting


class FaultFront:
    """A reverse proxy in front of one backend that injects faults:
    - `metrics`: "pass", "hang" (never answers) or "garbage" (200 with random bytes);
    - `unavailable_until`: before this monotonic time every request (health included)
      gets 503.
    Counts what it forwarded and how many /metrics requests are open at once."""

    def __init__(self, target: str, *, metrics: str = "pass") -> None:
        self.target = target
        self.metrics = metrics
        self.unavailable_until = 0.0
        self.forwarded: list[float] = []  # monotonic times of forwarded POSTs
        self.refused = 0
        self.metrics_open = 0
        self.metrics_open_max = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self.unavailable_until:
            self.refused += 1
            await request.read()
            return web.json_response(
                {"error": {"message": "warming up", "type": "x", "param": None, "code": 503}},
                status=503,
            )
        if request.path == "/metrics" and self.metrics != "pass":
            self.metrics_open += 1
            self.metrics_open_max = max(self.metrics_open_max, self.metrics_open)
            try:
                if self.metrics == "hang":
                    await asyncio.sleep(3600)
                return web.Response(body=os.urandom(2048) + b"\nvllm:num_requests_running{")
            finally:
                self.metrics_open -= 1
        if request.method == "POST":
            self.forwarded.append(time.monotonic())
        assert self._session is not None
        body = await request.read()
        async with self._session.request(
            request.method,
            self.target + request.rel_url.raw_path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as up:
            resp = web.StreamResponse(status=up.status)
            if "Content-Type" in up.headers:
                resp.headers["Content-Type"] = up.headers["Content-Type"]
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def start(self) -> FaultFront:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self._session is not None:
            await self._session.close()


class RawServer:
    """A TCP server on 127.0.0.1 that speaks whatever `_serve` writes (not aiohttp).

    Every connection is closed when its `_serve` ends, however it ends, and every one still
    open when the server closes, tracked from the moment it is accepted; and the server
    stops accepting before it closes (`stop_accepting`: a connection accepted in the turn an
    asyncio.Server closes is left half-built to the garbage collector in Python 3.11, and
    reported as an unclosed transport in whatever test runs then)."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()

    def _protocol(self) -> asyncio.Protocol:
        return _TrackedStream(self._transports, self._connection)

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            await stop_accepting(self._server)
            self._server.close()
        for t in list(self._transports):
            t.close()
        self._transports.clear()


class _TrackedStream(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol (what `asyncio.start_server` uses), its transport kept in
    `transports` from the moment it is accepted until it is lost."""

    def __init__(self, transports: set[asyncio.BaseTransport], handler: Any) -> None:
        self._held_reader = asyncio.StreamReader()  # the base class holds it only weakly
        super().__init__(self._held_reader, handler)
        self._transports = transports
        self._own: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._own = transport
        self._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._own is not None:
            self._transports.discard(self._own)
        super().connection_lost(exc)


class GarbageServer(RawServer):
    """Accepts connections and answers anything with bytes that are not HTTP."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            await reader.read(65536)
            writer.write(b"\x00\xff\x13garbage that is not HTTP at all\r\n\r\n\x00")
            await writer.drain()
        writer.close()


async def kill_server(runner: web.AppRunner) -> None:
    """As if the process died: stop listening and drop every open connection."""
    await stop_accepting(*site_servers(runner))
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is not None:
        for conn in server.connections:
            conn.force_close()


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def start_proxy_from_file(path: Path) -> RunningProxy:
    return await start_proxy(load_config(path), config_path=str(path), seed=0)


def admin_headers(token: str = "admin-secret") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
