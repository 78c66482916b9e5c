"""lbproxy's ASGI face (lbproxy/asgi.py) under a real uvicorn, for the tests that run
against both faces (`PROXY_FACES` in a test module, see conftest.run_proxy)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from lbproxy.asgi import LbproxyASGI, create_app
from lbproxy.config import Config


class AsgiProxy:
    """What the tests read of a RunningProxy (url, state, close), for uvicorn serving
    `create_app(config=...)` on 127.0.0.1 inside the running loop."""

    def __init__(
        self, app: LbproxyASGI, server: uvicorn.Server, task: asyncio.Task[Any], port: int
    ):
        self.app, self.server, self.task = app, server, task
        self.host, self.port = "127.0.0.1", port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where /admin/* is served: its own listener (admin.port) or the main one."""
        proxy = self.app.proxy
        if proxy is None or proxy.admin_runner is None:
            return self.url
        return proxy.admin_url

    @property
    def state(self) -> Any:
        return self.app.state

    @property
    def runner(self) -> Any:
        """The aiohttp runner behind the operator routes (its app holds OBS, STATE)."""
        assert self.app.proxy is not None
        return self.app.proxy.runner

    async def close(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


async def start_asgi_proxy(cfg: Config, *, seed: int | None = 0, **uvicorn_kw: Any) -> AsgiProxy:
    app = create_app(config=cfg, seed=seed)
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (without it, the
    # head and body writes of a response meet the client's delayed ACK: 40 ms each).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level="warning",
        http=uvicorn_kw.pop("http", "httptools"),
        **uvicorn_kw,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("uvicorn stopped during startup")
        await asyncio.sleep(0.01)
    return AsgiProxy(app, server, task, port)
