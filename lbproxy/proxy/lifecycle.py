"""Process lifecycle: signals, graceful shutdown, and how malformed requests are refused.

Signals (installed by `run_until_signalled`):
- SIGTERM or SIGINT: graceful shutdown. The listeners close at once (new connections are
  refused), idle keep-alive connections are closed, requests in flight (streams included)
  get up to `shutdown_grace` seconds to finish, then whatever is left is cancelled (its
  upstream connection closed, which makes vLLM abort it), background tasks stop and the
  process exits 0. A second SIGTERM/SIGINT during the grace period kills the process.
- SIGHUP: hot reload of the config file, as POST /admin/reload; an invalid file is logged
  and the running config stays.

`ProxyRunner` is aiohttp's AppRunner with one change: a request that cannot be parsed
(a header or request line over `limits.max_header_bytes`, or malformed HTTP) is answered
in OpenAI's error shape, 431 or 400, and logged without its bytes; aiohttp's default is
a text/plain 400 and an ERROR log that quotes the first 100 bytes of the offending line,
which can be an Authorization header.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from lbproxy.proxy.errors import error_body

log = logging.getLogger("lbproxy")


class _RequestHandler(RequestHandler):
    __slots__ = ()

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


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """AppRunner whose connections refuse unparseable requests in OpenAI's error shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no public hook for parse errors (they bypass the app and its
        # middlewares), so the connection handler class is swapped for one that answers
        # them; test_ops_auth checks the result against the installed aiohttp.
        server.__class__ = _Server
        return server


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
    try:
        await stop.wait()
    finally:
        if reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await close()
    log.info("lbproxy stopped")
