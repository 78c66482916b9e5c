"""The lbproxy server: the aiohttp application, its background tasks and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from lbproxy.bind import address_in_use, probe_listen
from lbproxy.config import Config
from lbproxy.proxy.admin import AdminAPI, add_admin_routes
from lbproxy.proxy.aiohttp_compat import (
    bound_port,
    no_lingering_close,
    replace_default_expect_handlers,
    send_100_continue,
)
from lbproxy.proxy.client_body import ProxyRequest, check_before_body
from lbproxy.proxy.client_limits import ClientLimits
from lbproxy.proxy.errors import ExpectationFailed, ProxyError, error_body
from lbproxy.proxy.forward import Forwarder
from lbproxy.proxy.kv_feed import start_subscriber
from lbproxy.proxy.lifecycle import ProxyRunner, run_until_signalled
from lbproxy.proxy.native_server import NativeServer
from lbproxy.proxy.observability import OBS
from lbproxy.proxy.observability import install as install_observability
from lbproxy.proxy.observability import install_on_admin as install_admin_observability
from lbproxy.proxy.pools import PoolTable
from lbproxy.proxy.request_id import client_request_id
from lbproxy.proxy.runtime import Runtime, build_runtime, carry_over
from lbproxy.proxy.upstream import UpstreamClient
from lbproxy.replicas.wiring import install as install_replicas
from lbproxy.replicas.workers import worker_index
from lbproxy.routing.state import Endpoint
from lbproxy.signals.discovery import ModelDiscovery
from lbproxy.signals.health import HealthChecker
from lbproxy.signals.kv_subscriber import KVEventSubscriber
from lbproxy.signals.scraper import MetricsScraper
from lbproxy.signals.signals_thread import SignalsThread

log = logging.getLogger("lbproxy")


@dataclass
class ProxyState:
    # What requests read (config, pools, settings, client keys): replaced whole, in one
    # assignment, at startup and by a reload (lbproxy/proxy/runtime.py).
    runtime: Runtime
    session: UpstreamClient | None = None  # requests to backends (lbproxy/proxy/upstream.py)
    signals_session: aiohttp.ClientSession | None = None  # discovery
    signals_thread: SignalsThread | None = None  # scrapes and health checks, own session
    forwarder: Forwarder | None = None
    health: HealthChecker | None = None
    discovery: ModelDiscovery | None = None
    scraper: MetricsScraper | None = None
    kv_subscriber: KVEventSubscriber | None = None
    started: float = field(default_factory=time.time)
    config_path: str | None = None  # what a reload re-reads
    seed: int | None = None
    admin: AdminAPI | None = None  # admin operations and hot reload (one lock for both)

    @property
    def config(self) -> Config:
        """The running config (read-only: a reload swaps `runtime`)."""
        return self.runtime.config

    @property
    def pools(self) -> PoolTable:
        """The running pool table (read-only: a reload swaps `runtime`)."""
        return self.runtime.pools


STATE = web.AppKey("lbproxy_state", ProxyState)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    rt = st.runtime
    if rt.auth is not None:
        try:
            rt.auth.check(request)
        except ProxyError as e:
            return e.response()
    cards = st.discovery.cards if st.discovery else {}
    data = []
    for model in rt.pools.served_models():
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
    for pool in st.runtime.pools.pools:
        healthy = [ep.name for ep in pool.endpoints if ep.healthy and not ep.draining]
        pools[pool.name] = {"healthy": len(healthy), "total": len(pool.endpoints)}
        ready = ready and bool(healthy)
    return _json({"ready": ready, "pools": pools}, status=200 if ready else 503)


async def _no_route(request: web.Request) -> web.Response:
    """The main listener's fallback: 405 for OpenAI routes asked wrongly, else 404."""
    if request.path.startswith("/v1/") and request.path != "/v1/models":
        # An OpenAI route asked with the wrong method: say so rather than "no such route".
        return web.Response(
            status=405,
            headers={"Allow": "POST"},
            body=error_body(
                f"{request.path} takes POST, not {request.method}",
                "invalid_request_error",
                "method_not_allowed",
            ),
            content_type="application/json",
        )
    return await _not_found(request)


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(
        status=404,
        body=error_body(
            f"no route for {request.method} {request.path}", "invalid_request_error", "not_found"
        ),
        content_type="application/json",
    )


async def _expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on /v1/*: the client holds its body back until told to go
    on, so whatever its headers already rule out (key, Content-Encoding, size, the body
    memory budget) is answered first, without 100 Continue, and the connection closed."""
    if request.version != aiohttp.HttpVersion11:
        return None  # an HTTP/1.0 client does not wait for 100 Continue
    rt = request.app[STATE].runtime
    request_id = client_request_id(request.headers.get(rt.settings.request_id_header))
    id_header = {rt.settings.request_id_header: request_id}
    try:
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise ExpectationFailed("the only Expect accepted is 100-continue")
        auth = rt.auth
        if auth is not None:
            auth.check(request)
        if isinstance(request, ProxyRequest):
            check_before_body(request, request._lb_limits)
    except ProxyError as e:
        resp = e.response(id_header)
        resp.force_close()
        # The client holds its body back: close at once rather than wait (aiohttp's
        # lingering close) for a body that is not coming.
        no_lingering_close(request)
        return resp
    await send_100_continue(request)
    return None


async def _expect_elsewhere(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default Expect handling, with an OpenAI-shaped 417 that does not quote
    the header (its text/plain 417 quotes it, and a value that is not UTF-8 made a 500)."""
    if request.version != aiohttp.HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        resp = ExpectationFailed("the only Expect accepted is 100-continue").response()
        no_lingering_close(request)  # see _expect_continue
        return resp
    await send_100_continue(request)
    return None


def _replace_default_expect_handlers(app: web.Application) -> None:
    replace_default_expect_handlers(app, _expect_elsewhere)


async def _forward(request: web.Request) -> web.StreamResponse:
    forwarder = request.app[STATE].forwarder
    assert forwarder is not None
    assert isinstance(request, ProxyRequest)
    resp = await forwarder.handle(request)
    # None: the client left before the response's head (nothing more to write).
    return resp if resp is not None else web.StreamResponse()


async def _startup(app: web.Application) -> None:
    st = app[STATE]
    cfg = st.config
    # No cap on connections: thousands of long streams must not queue behind each other.
    # Only traffic of its own (not the 4 Hz scrapes, see below) keeps a connection warm, so
    # a burst's connections close after upstream_keepalive.
    st.session = UpstreamClient(keepalive=cfg.timeouts.upstream_keepalive)
    # Background requests on a pool of their own: in the request pool they would rotate
    # through every idle connection of a burst and keep all of them open. Scraper, health
    # checker and discovery each have at most one request per backend in flight, so these
    # pools hold at most three per backend without a cap; a per-host cap would make the
    # backends behind one host:port (paths of a gateway) wait behind a hanging one.
    st.signals_session = _signals_session()  # discovery, on this loop
    # Scrapes and health checks on a loop of their own: their short timeouts must measure
    # the backend, not this loop's lateness when it is busy relaying (see signals_thread).
    st.signals_thread = SignalsThread()
    await st.signals_thread.start(_signals_session)
    st.forwarder = Forwarder(st, st.session, metrics=app[OBS].metrics)
    if cfg.tracing.enabled:  # only then is OpenTelemetry imported
        from lbproxy.proxy.tracing import RequestTracer

        st.forwarder.tracer = RequestTracer(cfg.tracing)
    # Providers read st.runtime on every round, so they follow a hot reload's swap (the
    # scraper's from the signals thread: reading the table from there is safe, the swap is
    # one assignment).
    # One clock: routing's `now` is loop.time() (not time.monotonic() under uvloop), and
    # metrics snapshots and health stamps are compared with it.
    loop = asyncio.get_running_loop()
    signals = st.signals_thread
    assert signals.loop is not None and signals.session is not None
    st.health = HealthChecker(
        lambda: st.runtime.pools.endpoints(),
        signals.session,
        clock=loop.time,
        offload=signals.run,  # only the GET; outcomes and state stay on this loop
    )
    # Flow control waits for these: a fresh scrape (its limit, its queue) or a backend
    # coming back can let waiting requests go.
    st.health.on_change = lambda ep: _wake(st, ep)
    st.health.configure_from(cfg.health)
    st.forwarder.record_outcome = st.health.record
    st.forwarder.progress = st.health  # first bytes, for stall detection
    st.health.start()
    st.scraper = MetricsScraper(
        lambda: st.runtime.pools.endpoints(),
        session=signals.session,
        clock=signals.loop.time,  # the thread's loop is of this loop's class: same clock
    )
    st.scraper.configure_from(cfg.signals)
    # Flow control runs on this loop: each fresh scrape is handed over to it.
    st.scraper.on_scrape = lambda ep: loop.call_soon_threadsafe(_on_scrape, st, ep)
    await signals.run(st.scraper.start())
    st.kv_subscriber = await start_subscriber(cfg, st.runtime.pools, lambda: st.runtime.pools)
    st.discovery = ModelDiscovery(
        lambda: st.runtime.pools,
        st.signals_session,
        interval=cfg.discovery.interval,
        timeout=cfg.discovery.timeout,
    )
    await st.discovery.refresh()


def _on_scrape(st: ProxyState, ep: Endpoint) -> None:
    gate = st.runtime.pools.gate_of(ep)
    if gate is not None:
        gate.on_metrics(ep)


def _wake(st: ProxyState, ep: Endpoint) -> None:
    gate = st.runtime.pools.gate_of(ep)
    if gate is not None:
        gate.wake()


async def _cleanup(app: web.Application) -> None:
    st = app[STATE]
    signals = st.signals_thread
    if st.scraper is not None and signals is not None and signals.loop is not None:
        await signals.run(st.scraper.stop())  # it runs there
    for task in (st.health, st.discovery, st.kv_subscriber):
        if task is not None:
            await task.stop()
    if signals is not None:
        await signals.stop()  # closes its session
    for session in (st.session, st.signals_session):
        if session is not None:
            await session.close()
    if st.forwarder is not None and st.forwarder.tracer is not None:
        await st.forwarder.tracer.close()  # exports buffered spans, waits 5 s at most


def _signals_session() -> aiohttp.ClientSession:
    """A session for background requests (create it in the loop that will use it)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),  # as before: no gzip'd /metrics
        timeout=aiohttp.ClientTimeout(total=None),  # each caller sets its own
    )


def build_app(
    cfg: Config,
    *,
    seed: int | None = None,
    config_path: str | None = None,
    runtime: Runtime | None = None,
) -> web.Application:
    """The application; `runtime`: built from `cfg` by `build_runtime` (start_proxy builds
    it off the loop; without it, it is built here)."""
    if runtime is None:
        runtime = build_runtime(cfg, seed=seed)
    carry_over(None, runtime)  # the same steps as a reload's swap, with nothing to carry
    # The body limit is enforced by request.read(); +1 so that exactly the limit passes.
    app = web.Application(client_max_size=cfg.limits.max_body_bytes)
    app[STATE] = ProxyState(runtime=runtime, config_path=config_path, seed=seed)
    st = app[STATE]
    st.admin = AdminAPI(st)
    if not cfg.admin.separate():
        add_admin_routes(app, st.admin)
    app.router.add_post("/v1/{tail:.*}", _forward, expect_handler=_expect_continue)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    install_observability(app, cfg, app[STATE])  # /metrics, /dashboard, access log
    app.router.add_route("*", "/{tail:.*}", _no_route)
    _replace_default_expect_handlers(app)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    # ---- several processes (serve --workers, state.redis): lbproxy/replicas ----------------
    install_replicas(app, lambda: app[STATE])
    return app


@dataclass
class RunningProxy:
    runner: ProxyRunner
    host: str
    port: int
    grace: float = 30.0  # shutdown_grace: requests in flight at close() get this long
    admin_runner: ProxyRunner | None = None  # when the admin API has its own listener
    admin_host: str | None = None
    admin_port: int | None = None
    native: NativeServer | None = None  # the main listener's server (native_server.py)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where /admin/* is served (the main URL unless it has its own listener)."""
        if self.admin_runner is None:
            return self.url
        return f"http://{self.admin_host}:{self.admin_port}"

    @property
    def state(self) -> ProxyState:
        return self.runner.app[STATE]

    async def close(self) -> None:
        """Graceful: stop listening, let requests in flight finish (up to shutdown_grace),
        then cut what is left (a stream ends with an SSE error event)."""
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.grace, self._cut)
        try:
            if self.native is not None:
                self.native.stop_listening()
            if self.admin_runner is not None:
                await self.admin_runner.cleanup()
            await self.runner.cleanup()
        finally:
            deadline.cancel()

    def _cut(self) -> None:
        n = self.runner.cut_in_flight()
        if self.admin_runner is not None:
            n += self.admin_runner.cut_in_flight()
        if n:
            log.warning("shutdown grace period over: cut %d requests still in flight", n)


async def _listen(
    runner: web.AppRunner, host: str, port: int, native: NativeServer | None = None
) -> int:
    # A worker of `serve --workers` shares its port with the others (replicas/workers.py).
    reuse_port = worker_index() is not None or None
    try:
        if native is not None:
            return await native.listen(host, port, reuse_port)
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
        await site.start()
    except OSError as e:
        raise address_in_use(e, host, port) from None
    return bound_port(site, port)


def _native_server(app: web.Application, runner: ProxyRunner, cfg: Config) -> NativeServer | None:
    """The native server for the main listener; None when the app has middlewares (the
    shared state's, with state.redis), which only aiohttp's side runs."""
    if app.middlewares:
        return None
    native = NativeServer(
        runner,
        lambda: app[STATE].forwarder,
        max_head=cfg.limits.max_header_bytes,
        max_body=cfg.limits.max_body_bytes,
    )
    runner.native = native
    return native


def _separate_admin_port(cfg: Config) -> int:
    """The admin listener's own port, if it has one and it is fixed (else 0)."""
    admin = cfg.admin
    if not admin.separate():
        return 0
    return cfg.listen.port if admin.port is None else admin.port


async def setup_proxy(
    cfg: Config, *, seed: int | None = None, config_path: str | None = None
) -> ProxyRunner:
    """Build the runtime (off the loop), the application and its runner, and start the
    background tasks (sessions, signals thread, health, scraper, KV events, discovery);
    listening is the caller's (start_proxy here, lbproxy/asgi.py under an ASGI server).
    `runner.cleanup()` stops them."""
    # The same build as a reload's, off the loop (tokenizers, routers: what validation did
    # not build already).
    runtime = await asyncio.to_thread(build_runtime, cfg, seed=seed)
    app = build_app(cfg, seed=seed, config_path=config_path, runtime=runtime)
    max_header = cfg.limits.max_header_bytes
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # closes the upstream connection so that vLLM aborts the request and frees its KV.
    runner = ProxyRunner(
        app,
        limits=ClientLimits.from_config(cfg.limits),
        handler_cancellation=True,
        access_log=None,
        max_line_size=max_header,
        max_field_size=max_header,
        # The deadline is RunningProxy.close's cut at shutdown_grace; aiohttp's own wait
        # is a fallback (it waits up to twice this, and rounds it up to a second).
        shutdown_timeout=cfg.shutdown_grace + 1,
    )
    await runner.setup()
    return runner


async def start_proxy(
    cfg: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    seed: int | None = None,
    config_path: str | None = None,
) -> RunningProxy:
    """Start lbproxy inside the running event loop (port 0 picks a free port).

    `config_path` is the file a reload (SIGHUP, POST /admin/reload) re-reads."""
    bind_host = host or cfg.listen.host
    listen_port = cfg.listen.port if port is None else port
    # A taken port fails here, before setup starts sessions, scrapes and health checks.
    if worker_index() is None:  # a worker's port is held by its supervisor: no probe
        await probe_listen(bind_host, listen_port)
    if (admin_port := _separate_admin_port(cfg)) and worker_index() is None:
        await probe_listen(cfg.admin.host or cfg.listen.host, admin_port)
    runner = await setup_proxy(cfg, seed=seed, config_path=config_path)
    native = _native_server(runner.app, runner, cfg)
    try:
        bound = await _listen(runner, bind_host, listen_port, native)
    except BaseException:  # taken since the probe: stop what setup started
        await runner.cleanup()
        raise
    proxy = RunningProxy(runner, bind_host, bound, grace=cfg.shutdown_grace, native=native)
    if cfg.admin.separate():
        try:
            await start_admin_listener(proxy, cfg)
        except BaseException:
            await proxy.close()
            raise
    return proxy


async def start_admin_listener(proxy: RunningProxy, cfg: Config) -> None:
    """`admin.port`/`admin.host` set: /admin/* (and observability with protect:
    admin_listener) on an application and listener of their own, absent from the main
    one; sets `proxy.admin_*`."""
    app, admin = proxy.runner.app, cfg.admin
    max_header = cfg.limits.max_header_bytes
    admin_app = web.Application()
    assert app[STATE].admin is not None
    add_admin_routes(admin_app, app[STATE].admin)
    install_admin_observability(admin_app, app)  # served here with protect: admin_listener
    admin_app.router.add_route("*", "/{tail:.*}", _not_found)
    _replace_default_expect_handlers(admin_app)
    admin_runner = ProxyRunner(
        admin_app,
        limits=proxy.runner.limits,
        access_log=None,
        max_line_size=max_header,
        max_field_size=max_header,
        shutdown_timeout=min(cfg.shutdown_grace, 5.0),
    )
    await admin_runner.setup()
    proxy.admin_runner = admin_runner
    proxy.admin_host = admin.host or cfg.listen.host
    proxy.admin_port = await _listen(
        admin_runner, proxy.admin_host, cfg.listen.port if admin.port is None else admin.port
    )


async def serve_forever(
    cfg: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    config_path: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (graceful shutdown); SIGHUP reloads `config_path`."""
    proxy = await start_proxy(cfg, host=host, port=port, config_path=config_path)
    log.info("lbproxy listening on %s", proxy.url)
    if proxy.admin_runner is not None:
        log.info("admin API on %s", proxy.admin_url)
    st = proxy.state
    assert st.admin is not None
    await run_until_signalled(
        proxy.close,
        st.admin.reload if config_path is not None else None,
        grace=cfg.shutdown_grace,
        in_flight=lambda: sum(ep.in_flight for ep in st.runtime.pools.endpoints()),
    )
