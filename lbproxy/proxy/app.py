"""The lbproxy server: the aiohttp application, its background tasks and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from lbproxy.config import Config
from lbproxy.proxy.errors import error_body
from lbproxy.proxy.forward import Forwarder, ForwardSettings
from lbproxy.proxy.kv_feed import build_subscriber
from lbproxy.proxy.pools import PoolTable
from lbproxy.signals.discovery import ModelDiscovery
from lbproxy.signals.health import HealthChecker
from lbproxy.signals.kv_subscriber import KVEventSubscriber
from lbproxy.signals.scraper import MetricsScraper

log = logging.getLogger("lbproxy")


@dataclass
class ProxyState:
    config: Config
    pools: PoolTable
    session: aiohttp.ClientSession | None = None
    forwarder: Forwarder | None = None
    health: HealthChecker | None = None
    discovery: ModelDiscovery | None = None
    scraper: MetricsScraper | None = None
    kv_subscriber: KVEventSubscriber | None = None
    started: float = field(default_factory=time.time)


STATE = web.AppKey("lbproxy_state", ProxyState)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    cards = st.discovery.cards if st.discovery else {}
    data = []
    for model in st.pools.served_models():
        card = cards.get(model) or {
            "id": model,
            "object": "model",
            "created": int(st.started),
            "owned_by": "lbproxy",
        }
        data.append(card)
    return _json({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    pools = {}
    ready = True
    for pool in st.pools.pools:
        healthy = [ep.name for ep in pool.endpoints if ep.healthy and not ep.draining]
        pools[pool.name] = {"healthy": len(healthy), "total": len(pool.endpoints)}
        ready = ready and bool(healthy)
    return _json({"ready": ready, "pools": pools}, status=200 if ready else 503)


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(
        status=404,
        body=error_body(
            f"no route for {request.method} {request.path}", "invalid_request_error", "not_found"
        ),
        content_type="application/json",
    )


async def _forward(request: web.Request) -> web.StreamResponse:
    forwarder = request.app[STATE].forwarder
    assert forwarder is not None
    return await forwarder.handle(request)


async def _startup(app: web.Application) -> None:
    st = app[STATE]
    cfg = st.config
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: thousands of long streams must not queue behind each other
        limit_per_host=0,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
    )
    st.session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # relay bytes exactly as the backend sent them
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    st.forwarder = Forwarder(
        st.pools,
        st.session,
        ForwardSettings(
            max_attempts=cfg.limits.max_attempts,
            connect_timeout=cfg.timeouts.connect,
            first_byte_timeout=cfg.timeouts.first_byte,
            idle_timeout=cfg.timeouts.idle,
            request_id_header=cfg.request_id_header,
            session_header=cfg.session_header,
            expose_backend_header=cfg.expose_backend_header,
        ),
    )
    h = cfg.health
    st.health = HealthChecker(
        st.pools.endpoints,
        st.session,
        interval=h.interval,
        timeout=h.timeout,
        unhealthy_after=h.unhealthy_after,
        healthy_after=h.healthy_after,
    )
    st.health.start()
    sig = cfg.signals
    st.scraper = MetricsScraper(
        st.pools.endpoints,
        interval=sig.metrics_interval,
        timeout=sig.metrics_timeout,
        session=st.session,
    )
    await st.scraper.start()
    st.kv_subscriber = build_subscriber(cfg, st.pools)
    if st.kv_subscriber is not None:
        await st.kv_subscriber.start()
    st.discovery = ModelDiscovery(
        st.pools, st.session, interval=cfg.discovery.interval, timeout=cfg.discovery.timeout
    )
    if st.discovery.needed():
        await st.discovery.discover_once()
        st.discovery.start()


async def _cleanup(app: web.Application) -> None:
    st = app[STATE]
    for task in (st.health, st.discovery, st.scraper, st.kv_subscriber):
        if task is not None:
            await task.stop()
    if st.session is not None:
        await st.session.close()


def build_app(cfg: Config, *, seed: int | None = None) -> web.Application:
    # The body limit is enforced by request.read(); +1 so that exactly the limit passes.
    app = web.Application(client_max_size=cfg.limits.max_body_bytes)
    app[STATE] = ProxyState(config=cfg, pools=PoolTable(cfg, seed=seed))
    app.router.add_post("/v1/{tail:.*}", _forward)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


@dataclass
class RunningProxy:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> ProxyState:
        return self.runner.app[STATE]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_proxy(
    cfg: Config, *, host: str | None = None, port: int | None = None, seed: int | None = None
) -> RunningProxy:
    """Start lbproxy inside the running event loop (port 0 picks a free port)."""
    app = build_app(cfg, seed=seed)
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # closes the upstream connection so that vLLM aborts the request and frees its KV.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    bind_host = host or cfg.listen.host
    site = web.TCPSite(runner, bind_host, cfg.listen.port if port is None else port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else cfg.listen.port
    return RunningProxy(runner, bind_host, bound)


async def serve_forever(cfg: Config, *, host: str | None = None, port: int | None = None) -> None:
    proxy = await start_proxy(cfg, host=host, port=port)
    log.info("lbproxy listening on %s", proxy.url)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()
