"""Starts and stops what several lbproxy processes share, for `lbproxy.proxy.app`.

Nothing here runs unless asked: per-worker metrics only in a worker of `serve --workers`,
shared state only with `state.redis` in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from lbproxy.proxy.observability import OBS
from lbproxy.replicas.worker_metrics import WorkerMetrics
from lbproxy.replicas.workers import worker_dir, worker_index

_WORKER_METRICS = web.AppKey("lbproxy_worker_metrics", WorkerMetrics)


def install(app: web.Application, state: Callable[[], Any]) -> None:
    """Add the startup and cleanup hooks (call after observability is installed).
    `state()` is the app's ProxyState once it starts."""
    index, directory = worker_index(), worker_dir()
    if index is not None and directory is not None:
        obs = app[OBS]
        wm = app[_WORKER_METRICS] = WorkerMetrics(obs.registry, directory, index)
        obs.registry = wm.host  # /metrics serves the whole host

        async def start_metrics(app: web.Application) -> None:
            wm.start()

        async def stop_metrics(app: web.Application) -> None:
            await wm.stop()

        app.on_startup.append(start_metrics)
        app.on_cleanup.append(stop_metrics)
