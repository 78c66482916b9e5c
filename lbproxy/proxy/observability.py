"""Wires lbproxy's observability into the app: `/metrics`, `/dashboard`, the access log.

`install(app, cfg, state)` creates the recorder the Forwarder writes to, registers the
routes and starts/stops the background tasks (access-log flusher, dashboard sampler)
with the app. Everything it serves is rendered from plain counters at request time.

What it serves names backends and their addresses, so `observability.protect` (read per
request: a reload applies it) says who may read it: anyone (`none`), a client with the
admin or the metrics token (Bearer, or HTTP Basic auth with the token as password so that
a browser can open the dashboard; else 401), or only clients of the separate admin
listener (`admin_listener`; `install_on_admin` serves the routes there, and the main
listener answers 404).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable
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
from lbproxy.proxy.errors import Unauthorized, error_body
from lbproxy.proxy.metrics_collector import MetricsCollector
from lbproxy.proxy.request_metrics import ProxyMetrics

__all__ = ["OBS", "Observability", "install", "install_on_admin"]

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
    state: Any  # the ProxyState: its config says who may read


OBS = web.AppKey("lbproxy_observability", Observability)
# Set on the separate admin listener's application.
_ADMIN_LISTENER = web.AppKey("lbproxy_observability_on_admin", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, cfg: Config, state: Any) -> Observability:
    """Add the observability routes and tasks to `app`; `state` is its ProxyState.

    Call before the catch-all route is added (routes match in registration order).
    """
    al = cfg.access_log
    access_log = AccessLog(al.path) if al.enabled else None
    metrics = ProxyMetrics(access_log)
    registry = CollectorRegistry(auto_describe=False)
    # Scrape ages on this loop's clock: snapshots are stamped with one that agrees with it
    # (the scraper's own clock may belong to the signals thread's loop).
    registry.register(MetricsCollector(metrics, state, loop_time))
    ProcessCollector(namespace="lbproxy", registry=registry)
    obs = Observability(metrics, registry, DashboardSampler(metrics, state), access_log, state)
    app[OBS] = obs
    _add_routes(app)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return obs


def install_on_admin(admin_app: web.Application, app: web.Application) -> None:
    """Serve `app`'s observability routes on the separate admin listener's `admin_app`
    too (answered there only when protect is admin_listener). Before its catch-all."""
    admin_app[OBS] = app[OBS]
    admin_app[_ADMIN_LISTENER] = True
    _add_routes(admin_app)


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", _guarded(_metrics))
    app.router.add_get("/dashboard", _guarded(_dashboard))
    app.router.add_get("/dashboard/", _guarded(_dashboard))
    app.router.add_get("/dashboard/state.json", _guarded(_state))


def _presented(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, or the password of HTTP Basic auth."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def _refusal(request: web.Request) -> web.Response | None:
    """None when `request` may read observability here, else the answer to give."""
    obs = request.app[OBS]
    cfg = obs.state.runtime.config  # per request: a reload may change it
    protect = cfg.observability.protect
    if request.app.get(_ADMIN_LISTENER, False) != (protect == "admin_listener"):
        return web.Response(
            status=404,
            body=error_body(
                f"no route for {request.method} {request.path}",
                "invalid_request_error",
                "not_found",
            ),
            content_type="application/json",
        )
    if protect in ("none", "admin_listener"):
        return None
    secret = cfg.admin.token if protect == "admin_token" else cfg.observability.metrics_token
    presented = _presented(request)
    # compare_digest: the time taken does not tell how much of the token matched.
    if (
        secret is not None
        and presented is not None
        and hmac.compare_digest(presented.encode(), secret.get_secret_value().encode())
    ):
        return None
    which = "admin" if protect == "admin_token" else "metrics"
    resp = Unauthorized(
        f"Missing or incorrect {which} token: send 'Authorization: Bearer <{which} token>'."
    ).response()
    # A browser then asks for it (any user name, the token as password).
    resp.headers["WWW-Authenticate"] = 'Basic realm="lbproxy observability", charset="UTF-8"'
    return resp


def _guarded(handler: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        refusal = _refusal(request)
        return refusal if refusal is not None else await handler(request)

    return wrapper


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
