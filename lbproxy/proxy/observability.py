"""Wires lbproxy's observability into the app: `/metrics`, `/dashboard`, the access log.

`install(app, cfg, state)` creates the recorder the Forwarder writes to, registers the
routes and starts/stops the background tasks (access-log flusher, dashboard sampler)
with the app. Everything it serves is rendered from plain counters at request time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest

from lbproxy.aio import loop_time
from lbproxy.config import Config
from lbproxy.proxy.access_log import AccessLog
from lbproxy.proxy.dashboard import DashboardSampler, dashboard_html
from lbproxy.proxy.metrics import MetricsCollector, ProxyMetrics

__all__ = ["OBS", "Observability", "install"]

# The page loads nothing from anywhere: a policy that would block it if it ever tried.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


@dataclass
class Observability:
    metrics: ProxyMetrics
    registry: CollectorRegistry
    sampler: DashboardSampler
    access_log: AccessLog | None


OBS = web.AppKey("lbproxy_observability", Observability)


def _scrape_clock(state: Any) -> float:
    scraper = state.scraper
    return scraper.clock() if scraper is not None else loop_time()


def install(app: web.Application, cfg: Config, state: Any) -> Observability:
    """Add the observability routes and tasks to `app`; `state` is its ProxyState.

    Call before the catch-all route is added (routes match in registration order).
    """
    al = cfg.access_log
    access_log = AccessLog(al.path) if al.enabled else None
    metrics = ProxyMetrics(access_log)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, state, lambda: _scrape_clock(state)))
    ProcessCollector(namespace="lbproxy", registry=registry)
    obs = Observability(metrics, registry, DashboardSampler(metrics, state), access_log)
    app[OBS] = obs
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/dashboard", _dashboard)
    app.router.add_get("/dashboard/", _dashboard)
    app.router.add_get("/dashboard/state.json", _state)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return obs


async def _start(app: web.Application) -> None:
    obs = app[OBS]
    if obs.access_log is not None:
        await obs.access_log.start()
    await obs.sampler.start()


async def _stop(app: web.Application) -> None:
    obs = app[OBS]
    await obs.sampler.stop()
    if obs.access_log is not None:
        await obs.access_log.stop()


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[OBS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(
        body=dashboard_html(),
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
    )


async def _state(request: web.Request) -> web.Response:
    data = request.app[OBS].sampler.state_json()
    return web.Response(
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
