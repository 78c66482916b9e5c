"""Starts and stops what several lbproxy processes share, for `lbproxy.proxy.app`.

Nothing here runs unless asked: per-worker metrics and the host-wide admin API only in a
worker of `serve --workers`, shared state only with `state.redis` in the config.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from lbproxy.proxy.observability import OBS
from lbproxy.replicas.worker_metrics import WorkerMetrics
from lbproxy.replicas.workers import spawned_at, worker_count, worker_dir, worker_index

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, state: Callable[[], Any]) -> None:
    """Add the startup and cleanup hooks (call after observability is installed, before
    the app starts). `state()` is the app's ProxyState."""
    obs = app[OBS]
    local = obs.registry  # this process's metrics, whatever serves /metrics
    cfg = state().runtime.config
    if cfg.state is not None:
        _install_shared_state(app, state, local)
    elif worker_count() > 1:
        _install_static_share(app, state, worker_count())
    index, directory = worker_index(), worker_dir()
    if index is not None and directory is not None:
        wm = WorkerMetrics(local, directory, index)
        obs.registry = wm.host  # /metrics serves the whole host

        async def start_metrics(app: web.Application) -> None:
            wm.start()

        async def stop_metrics(app: web.Application) -> None:
            await wm.stop()

        app.on_startup.append(start_metrics)
        app.on_cleanup.append(stop_metrics)
        _install_host_admin(app, state, directory, index)


def _install_host_admin(
    app: web.Application, state: Callable[[], Any], directory: Path, index: int
) -> None:
    """The admin API acts host-wide (replicas/host_admin.py); its start hook runs before
    the worker listens, so a restarted worker serves with the host's drain set."""
    from lbproxy.replicas.host_admin import HostAdmin

    api = state().admin
    assert api is not None  # build_app creates it before this runs
    host = api.host = HostAdmin(api, directory, index, worker_count(), spawned_at())

    async def start(app: web.Application) -> None:
        await host.start()

    async def stop(app: web.Application) -> None:
        await host.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def _install_static_share(app: web.Application, state: Callable[[], Any], n: int) -> None:
    """Workers without Redis: each takes 1/n of every flow-control limit."""
    from lbproxy.replicas.flow_share import StaticShare

    share = StaticShare(n, lambda: state().runtime.pools)
    task: list[asyncio.Task[None]] = []

    async def keep() -> None:
        while True:  # a reload may bring new gates
            share.before_route()
            await asyncio.sleep(1.0)

    async def start(app: web.Application) -> None:
        share.before_route()
        task.append(asyncio.get_running_loop().create_task(keep()))

    async def stop(app: web.Application) -> None:
        for t in task:
            t.cancel()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def _install_shared_state(app: web.Application, state: Callable[[], Any], registry: Any) -> None:
    from lbproxy.replicas.flow_share import FlowShare
    from lbproxy.replicas.shared_state import SharedState

    st = state()
    shared = SharedState(st.runtime.config.state, lambda: st.runtime.pools, time.monotonic)
    flow = FlowShare(shared, lambda: st.runtime.pools)
    registry.register(shared)

    @web.middleware
    async def read_before_routing(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Only the requests that are routed (POST /v1/*) wait for the shared state.
        if request.method == "POST" and request.path.startswith("/v1/"):
            await shared.before_route()
        return await handler(request)

    app.middlewares.append(read_before_routing)

    async def start(app: web.Application) -> None:
        shared.clock = asyncio.get_running_loop().time  # routing's clock
        await shared.start()
        await flow.start()

    async def stop(app: web.Application) -> None:
        await flow.stop()
        await shared.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
