"""A small fake vLLM server for proxy tests: real HTTP on 127.0.0.1, scripted behaviour.

It records what it received (body digest, headers) and when a client went away, answers
chat / completions / embeddings (streaming or not) in OpenAI's shapes, and can be told
to fail with a status or to stall. Given `metrics_text`, it serves it as `/metrics`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from lbproxy.proxy.aiohttp_compat import bound_port


@dataclass
class Received:
    path: str
    digest: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeBackend:
    name: str
    fail_status: int | None = None  # answer every POST with this status
    chunk_delay: float = 0.0
    stall_before_headers: float = 0.0
    die_after_chunks: int | None = None  # drop the connection mid-stream
    health_status: int | None = None  # /health answers this (default: fail_status, else 200)
    metrics_text: str | None = None  # GET /metrics serves this (None: 404, as before)
    metrics_status: int = 200
    metrics_served: dict[int, int] = field(default_factory=dict)  # status -> /metrics answers
    received: list[Received] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)  # monotonic times
    in_progress: int = 0
    active: int = 0  # POSTs being answered now (stream or not)
    max_active: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(request.path, hashlib.sha256(body).hexdigest(), dict(request.headers), body)
        )
        if self.stall_before_headers:
            await asyncio.sleep(self.stall_before_headers)
        if self.fail_status is not None:
            return web.json_response(
                {
                    "error": {
                        "message": "scripted failure",
                        "type": "ServiceUnavailable",
                        "param": None,
                        "code": self.fail_status,
                    }
                },
                status=self.fail_status,
            )
        req = orjson.loads(body)
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 5)
        kind = request.path.rsplit("/", 1)[-1]
        if kind == "embeddings":
            return web.json_response(
                {
                    "object": "list",
                    "model": req["model"],
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
        if req.get("stream"):
            return await self._stream(request, req, n)
        full = self._full(req, "/chat/" in request.path, n)
        return web.json_response(full, headers={"x-served-by": self.name})

    def _full(self, req: dict[str, Any], chat: bool, n: int) -> dict[str, Any]:
        text = " ".join(f"t{i}" for i in range(n))
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": "length",
                "logprobs": None,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        return {
            "id": f"{self.name}-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": 1,
            "model": req["model"],
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(
        self, request: web.Request, req: dict[str, Any], n: int
    ) -> web.StreamResponse:
        chat = "/chat/" in request.path
        resp = web.StreamResponse(
            headers={"content-type": "text/event-stream", "x-served-by": self.name}
        )
        self.in_progress += 1
        try:
            await resp.prepare(request)
            for i in range(n):
                if self.die_after_chunks is not None and i == self.die_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if chat:
                    delta: dict[str, Any] = {"content": f"t{i} "}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
                    obj = "chat.completion.chunk"
                else:
                    choice = {"index": 0, "text": f"t{i} ", "finish_reason": None}
                    obj = "text_completion"
                if i == n - 1:
                    choice["finish_reason"] = "length"
                chunk = {
                    "id": f"{self.name}-s",
                    "object": obj,
                    "created": 1,
                    "model": req["model"],
                    "choices": [choice],
                }
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(time.monotonic())
            raise
        finally:
            self.in_progress -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": "fake-model",
                        "object": "model",
                        "created": 1,
                        "owned_by": "vllm",
                        "root": "fake-model",
                    }
                ],
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        status = self.health_status or self.fail_status
        return web.Response(status=status or 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is None:
            raise web.HTTPNotFound()
        status = self.metrics_status
        self.metrics_served[status] = self.metrics_served.get(status, 0) + 1
        return web.Response(status=status, text=self.metrics_text, content_type="text/plain")

    async def start(self) -> FakeBackend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{tail:.*}", self._post)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = bound_port(site, self.port)
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await stop_accepting(*site_servers(self.runner))
            await self.runner.cleanup()


async def stop_accepting(*servers: asyncio.AbstractServer | None) -> None:
    """Stop taking connections and let those already accepted be set up, before the servers
    close: in Python 3.11 a connection accepted in the loop turn in which an asyncio.Server
    closes gets a half-built transport, left to the garbage collector and reported as an
    unclosed transport in whichever test runs then (tests/test_raw_server.py)."""
    loop = asyncio.get_running_loop()
    for server in servers:
        for sock in getattr(server, "sockets", None) or ():
            loop.remove_reader(sock.fileno())
    for _ in range(3):  # accepted -> transport built -> connection_made
        await asyncio.sleep(0)


def site_servers(runner: web.BaseRunner) -> list[asyncio.AbstractServer | None]:
    """The asyncio servers behind an aiohttp runner's sites (aiohttp keeps them private)."""
    return [getattr(site, "_server", None) for site in runner.sites]
