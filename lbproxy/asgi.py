"""lbproxy as an ASGI 3 application: `uvicorn lbproxy.asgi:app`, or mounted in another.

    LBPROXY_CONFIG=lbproxy.yaml uvicorn lbproxy.asgi:app --host 0.0.0.0 --port 8000

`app` reads the config file named by `LBPROXY_CONFIG` at lifespan startup; `create_app`
takes a path or a parsed Config (for mounting and tests). The lifespan startup builds what
`lbproxy serve` builds (app.setup_proxy: runtime, background tasks: signals thread,
scraper, health checks, discovery, KV events); its shutdown waits up to `shutdown_grace`
for requests in flight, cuts what is left (a 503, or an SSE stream's error event), then
stops the background tasks.

`POST /v1/*` is the data path: the same Forwarder as the native server, reading and
writing through asgi_io (body read once within the limits, response pieces relayed as
they arrive). Every other request goes to the same aiohttp application through a private
Unix socket (asgi_loopback). HTTP parsing, header limits and connections are the ASGI
server's; listen.host/port are not used (the ASGI server's --host/--port are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from aiohttp import web

from lbproxy.config import Config, ConfigError, load_config
from lbproxy.proxy.app import RunningProxy, setup_proxy, start_admin_listener
from lbproxy.proxy.asgi_io import (
    AsgiRequest,
    AsgiSink,
    ClientLeft,
    Receive,
    Scope,
    Send,
    send_response,
)
from lbproxy.proxy.asgi_loopback import Loopback
from lbproxy.proxy.errors import error_body, sse_error_event

__all__ = ["CONFIG_ENV", "LbproxyASGI", "app", "create_app"]

log = logging.getLogger("lbproxy")

CONFIG_ENV = "LBPROXY_CONFIG"

_CUT_EVENT = b"\n\n" + sse_error_event(
    "lbproxy is shutting down: the stream was cut at the end of the shutdown grace period",
    "server_shutting_down",
)


_INTERNAL_ERROR = web.Response(
    status=500,
    body=error_body("internal error in lbproxy", "server_error", "internal_error"),
    content_type="application/json",
)


def _unavailable(message: str, code: str) -> web.Response:
    return web.Response(
        status=503,
        body=error_body(message, "service_unavailable", code),
        content_type="application/json",
    )


class LbproxyASGI:
    """The ASGI application (see the module's docstring)."""

    def __init__(
        self, config_path: str | None = None, config: Config | None = None, seed: int | None = None
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.seed = seed
        self.proxy: RunningProxy | None = None
        self.loopback: Loopback | None = None
        self.direct = False  # POST /v1/* served here (no aiohttp middlewares to run)
        self.in_flight: dict[asyncio.Task[Any], AsgiRequest] = {}
        self._max_body = 0
        self._hup = False

    @property
    def state(self) -> Any:
        """The running ProxyState (pools, forwarder, ...); None before startup."""
        return None if self.proxy is None else self.proxy.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.proxy is None or self.loopback is None:
                await send_response(
                    send,
                    _unavailable(
                        "lbproxy has not started: its ASGI server must run the lifespan "
                        "protocol (uvicorn: --lifespan on)",
                        "not_started",
                    ),
                )
            elif self.direct and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
                await self._forward(scope, receive, send)
            else:
                await self.loopback.serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    # --- the data path --------------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        st = self.proxy.state  # type: ignore[union-attr]
        forwarder = st.forwarder
        req = AsgiRequest(scope, receive, send, self.proxy.runner.limits, self._max_body)  # type: ignore[union-attr]
        task = req.task
        assert task is not None
        self.in_flight[task] = req
        try:
            result = await forwarder.handle(req)
            req.finish()  # no cancelling from here: the response is being finished
            if isinstance(result, web.Response):  # an error lbproxy answers
                with contextlib.suppress(OSError):
                    await send_response(send, result)
            elif isinstance(result, AsgiSink) and result.cut:
                await result.finished()  # left unfinished: the server closes the connection
        except ClientLeft:
            pass
        except asyncio.CancelledError:
            if not req.disconnected:
                # Cancelled by the ASGI server: its graceful shutdown timed out (uvicorn's
                # --timeout-graceful-shutdown). The same cut as at shutdown_grace's end.
                self._cut(req)
            # The client left, or the cut: swallowed, the server's task ends normally.
            if task.cancelling():
                task.uncancel()
            await self._after_cut(req, send)
        except Exception:  # a bug: OpenAI-shaped 500 as on the native server, not the server's
            log.exception("unexpected error answering %s", req.path)
            if req.sink is None:
                with contextlib.suppress(OSError):
                    await send_response(send, _INTERNAL_ERROR)
            else:
                req.sink.close()
                await req.sink.finished()
        finally:
            req.finish()
            del self.in_flight[task]

    @staticmethod
    def _cut(req: AsgiRequest) -> None:
        """End `req` for the shutdown: an SSE stream gets the error event and its end,
        another body is cut (never complete-looking), no response yet becomes a 503
        (`_after_cut`)."""
        req.shutdown_cut = req.disconnected = True
        sink = req.sink
        if sink is not None and sink.sse:
            sink.end_now(_CUT_EVENT)
        elif sink is not None:
            sink.close()

    async def _after_cut(self, req: AsgiRequest, send: Send) -> None:
        """A request ended by the client leaving, or by the shutdown's cut."""
        if not req.shutdown_cut:
            return
        with contextlib.suppress(OSError):
            if req.sink is None:
                await send_response(
                    send,
                    _unavailable(
                        "lbproxy is shutting down and the request was not answered within "
                        "the shutdown grace period; retry it",
                        "server_shutting_down",
                    ),
                )
            else:
                await asyncio.wait_for(req.sink.finished(), 5.0)

    # --- lifespan ---------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # a config error above all: say which and why
                    # The server logs this message (uvicorn: then exits with status 3).
                    text = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
                    await send({"type": "lifespan.startup.failed", "message": text})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as e:
                    await send({"type": "lifespan.shutdown.failed", "message": repr(e)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _load(self) -> Config:
        if self.config is not None:
            return self.config
        path = self.config_path
        if path is None:
            path = os.environ.get(CONFIG_ENV)
            if not path:
                raise ConfigError(
                    f"{CONFIG_ENV} is not set: set it to lbproxy's config file, e.g. "
                    f"{CONFIG_ENV}=lbproxy.yaml uvicorn lbproxy.asgi:app"
                )
            self.config_path = path
            try:
                return load_config(path)
            except ConfigError as e:
                raise ConfigError(f"{CONFIG_ENV}: {e}") from None
        return load_config(path)

    async def startup(self) -> None:
        """Build the runtime and start the background tasks (lifespan startup)."""
        cfg = self._load()
        runner = await setup_proxy(cfg, seed=self.seed, config_path=self.config_path)
        proxy = RunningProxy(runner, "asgi", 0, grace=cfg.shutdown_grace)
        loopback = Loopback(runner, cfg.limits.max_body_bytes)
        try:
            await loopback.start()
            if cfg.admin.separate():
                await start_admin_listener(proxy, cfg)
        except BaseException:
            await loopback.close()
            await proxy.close()
            raise
        self._max_body = cfg.limits.max_body_bytes
        self.direct = not runner.app.middlewares
        self.proxy, self.loopback = proxy, loopback
        self._watch_sighup()

    def _watch_sighup(self) -> None:
        """SIGHUP reloads the config file, as under `lbproxy serve` (main thread only:
        elsewhere, POST /admin/reload)."""
        st = self.proxy.state  # type: ignore[union-attr]
        if st.admin is None or self.config_path is None:
            return

        async def reload() -> None:
            try:
                await st.admin.reload()
            except Exception as e:
                log.error("SIGHUP: config not reloaded, the running one stays: %s", e)

        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
            self._hup = True
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # not the main thread (tests, some embeddings)

    async def shutdown(self) -> None:
        """Wait up to shutdown_grace for the requests in flight, cut what is left, then
        stop the background tasks (lifespan shutdown)."""
        proxy, loopback = self.proxy, self.loopback
        if proxy is None:
            return
        if self._hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.proxy = None  # new requests: 503 not_started
        tasks = list(self.in_flight)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=proxy.grace)
            if pending:
                n = len(pending)
                log.warning("shutdown grace period over: cut %d requests still in flight", n)
                for task in pending:
                    req = self.in_flight.get(task)
                    if req is None:
                        continue
                    self._cut(req)
                    task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        if loopback is not None:
            await loopback.close()
        await proxy.close()
        self.loopback = None


def create_app(
    config_path: str | None = None, config: Config | None = None, *, seed: int | None = None
) -> LbproxyASGI:
    """An lbproxy ASGI application: from `config` if given, else the file `config_path`
    (also what a reload re-reads), else the file named by LBPROXY_CONFIG, read at
    lifespan startup."""
    return LbproxyASGI(config_path, config, seed)


app = create_app()
