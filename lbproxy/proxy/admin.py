"""The admin API and hot reload.

Routes (every one needs `Authorization: Bearer <admin.token>`; without a configured token
the admin API answers 403; errors are OpenAI-shaped):

    GET  /admin/backends                        every backend's state
    POST /admin/backends/{name}/drain[?pool=P]  no new requests; in-flight ones finish
    POST /admin/backends/{name}/undrain[?pool=P]
    POST /admin/reload                          re-read the config file and apply it

Reload (also on SIGHUP): the file is loaded and validated in full first; an invalid one
is refused (400, the ConfigError text naming file and key) and the running config stays.
From a valid one a new runtime (lbproxy/proxy/runtime.py) is built in a thread, off the
event loop: a PoolTable that keeps the Endpoint objects of backends that stay (same
pool, name and url: in-flight counts, metrics, health, drain state) and the routers of
pools whose routing is unchanged (prefix indexes), and takes for the other pools the
tokenizers and routers that validation built (see `pools`), the settings and the client
keys. Then on the loop, with no await in between, the kept endpoints take their new
weights, flow gates follow with their waiting requests, removed backends are forgotten
by the kept indexes, and the runtime is swapped in with one assignment: the next request
sees the new config whole, requests in flight finish on the runtime they started with.
Afterwards the KV-event subscriber is restarted if its sources changed, and models are
discovered for pools that list none. Settings that need a new listener or process
(`restart_required` in the answer) are left as they are until a restart.

Under `serve --workers N` (`host` set, lbproxy/replicas/host_admin.py) drain, undrain and
reload act on every worker before the answer, which lists each worker's (a 503 names
those that did not confirm in time), and GET /admin/backends sums in-flight counts over
the workers. Without --workers none of that runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from lbproxy.config import Config, ConfigError, load_config
from lbproxy.credentials import without_credentials as _public_url
from lbproxy.proxy.auth import token_ok
from lbproxy.proxy.errors import (
    AdminDisabled,
    AmbiguousBackend,
    BackendNotFound,
    BadRequest,
    NoConfigFile,
    ProxyError,
    Unauthorized,
)
from lbproxy.proxy.kv_feed import kv_sources, start_subscriber
from lbproxy.proxy.runtime import build_runtime, swap_in
from lbproxy.replicas.host_admin import CONFIRM_DEADLINE, HostNotConfirmed
from lbproxy.routing.state import Endpoint

if TYPE_CHECKING:
    from lbproxy.proxy.app import ProxyState
    from lbproxy.replicas.host_admin import HostAdmin

log = logging.getLogger("lbproxy.admin")

# Settings a reload cannot change in a running process (listeners, server limits).
_RESTART_ONLY = (
    ("listen",),
    ("admin", "host"),
    ("admin", "port"),
    ("limits", "max_body_bytes"),
    ("limits", "max_header_bytes"),
    ("timeouts", "upstream_keepalive"),
    ("limits", "max_buffered_body_bytes"),
    ("limits", "client_header_timeout"),
    ("limits", "client_body_timeout"),
    ("limits", "client_body_min_rate"),
    ("limits", "client_keepalive_timeout"),
    ("limits", "max_client_connections"),
    ("shutdown_grace",),
    ("tracing",),
    ("discovery",),
    ("state",),  # replicas' Redis: the sharing is wired at start
)


def _get(cfg: Config, path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for key in path:
        node = getattr(node, key)
    return node.model_dump() if hasattr(node, "model_dump") else node


class AdminAPI:
    """Admin operations on the running proxy; the HTTP routes below call these."""

    def __init__(self, state: ProxyState) -> None:
        self.st = state
        self._lock = asyncio.Lock()
        self.host: HostAdmin | None = None  # a worker of `serve --workers`: host-wide

    # ---- backends ---------------------------------------------------------------------------

    def backend_state(self, ep: Endpoint) -> dict[str, Any]:
        health = self.st.health
        status = health.status(ep) if health is not None else None
        circuit = status["circuit"]["state"] if status is not None else "closed"
        if ep.draining:
            state = "draining"
        elif ep.healthy:
            state = "serving"
        else:
            state = "circuit_open" if circuit == "open" else "unhealthy"
        m = ep.metrics
        metrics = None
        if m is not None:
            loop = asyncio.get_running_loop()
            metrics = {
                "age_s": round(loop.time() - m.time, 3),
                "num_running": m.num_running,
                "num_waiting": m.num_waiting,
                "kv_cache_usage": m.kv_cache_usage,
            }
        return {
            "name": ep.name,
            "pool": ep.pool,
            "url": _public_url(ep.url),
            "vendor": ep.vendor,
            "weight": ep.weight,
            "state": state,
            "healthy": ep.healthy,
            "draining": ep.draining,
            "in_flight": ep.in_flight,
            "health": status,
            "metrics": metrics,
            "flow": gate.backend_json(ep) if (gate := self.st.runtime.pools.gate_of(ep)) else None,
        }

    def backends(self) -> list[dict[str, Any]]:
        return [self.backend_state(ep) for ep in self.st.runtime.pools.endpoints()]

    def find(self, name: str, pool: str | None) -> Endpoint:
        found = [
            ep
            for ep in self.st.runtime.pools.endpoints()
            if ep.name == name and (pool is None or ep.pool == pool)
        ]
        if not found:
            where = f" in pool '{pool}'" if pool is not None else ""
            raise BackendNotFound(f"no backend named '{name}'{where}")
        if len(found) > 1:
            pools = ", ".join(ep.pool for ep in found)
            raise AmbiguousBackend(
                f"backend '{name}' is in several pools ({pools}): add ?pool=<name>"
            )
        return found[0]

    def set_draining(self, name: str, pool: str | None, draining: bool) -> dict[str, Any]:
        ep = self.find(name, pool)
        self.mark_draining(ep, draining)
        return self.backend_state(ep)

    def mark_draining(self, ep: Endpoint, draining: bool) -> None:
        if ep.draining != draining:
            ep.draining = draining
            log.info(
                "backend %s (pool %s) %s; %d requests in flight",
                ep.name,
                ep.pool,
                "draining" if draining else "back in service",
                ep.in_flight,
            )

    # ---- reload -----------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it; raises ConfigError if it is invalid."""
        path = self.st.config_path
        if path is None:
            raise NoConfigFile("lbproxy was started without a config file: nothing to reload")
        async with self._lock:
            # Validation builds tokenizers and routers (kept for the runtime): off the loop.
            cfg = await asyncio.to_thread(load_config, path)
            return await self._apply(cfg, path)

    async def apply(self, cfg: Config) -> dict[str, Any]:
        """Apply an already-validated config (tests, and `reload`)."""
        async with self._lock:
            return await self._apply(cfg, self.st.config_path or "<config>")

    async def _apply(self, cfg: Config, source: str) -> dict[str, Any]:
        st = self.st
        old = st.runtime
        try:  # off the loop: what validation did not build (and tokenizer caches) is built
            new = await asyncio.to_thread(build_runtime, cfg, seed=st.seed, previous=old)
        except Exception as e:  # a tokenizer or profile that validated but fails to build
            raise ConfigError(f"{source}: cannot apply: {type(e).__name__}: {e}") from None
        restart = [".".join(p) for p in _RESTART_ONLY if _get(old.config, p) != _get(cfg, p)]
        sources_changed = set(kv_sources(old.config, old.pools)) != set(kv_sources(cfg, new.pools))

        # ---- the swap: no await from here to its end --------------------------------------
        changes = swap_in(st, new)  # carry-over, then the one assignment
        if self.host is not None:  # the host's drain set, also on backends (re-)added
            self.host.apply_drained()
        # Long-lived services take their new settings; pools they read from st.runtime.
        if st.forwarder is not None:
            st.forwarder.configure_upstream(new.settings)
        if st.health is not None:
            st.health.configure_from(cfg.health)
        if st.scraper is not None:
            st.scraper.configure_from(cfg.signals)
        for pool in new.pools.pools:  # new backends or limits can let waiting requests go
            if pool.gate is not None:
                pool.gate.wake()
        # ---- end of the swap --------------------------------------------------------------

        if sources_changed:
            if st.kv_subscriber is not None:
                await st.kv_subscriber.stop()
            st.kv_subscriber = await start_subscriber(cfg, new.pools, lambda: st.runtime.pools)
        if st.discovery is not None:
            await st.discovery.refresh()
        if restart:
            log.warning("config reload: %s change only after a restart", ", ".join(restart))
        log.info("config reloaded from %s: %s", source, orjson.dumps(changes).decode())
        return {
            "status": "reloaded",
            "source": source,
            "pools": changes,
            "kv_subscriber_restarted": sources_changed,
            "restart_required": restart,
        }


ADMIN = web.AppKey("lbproxy_admin", AdminAPI)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _guarded(handler: Handler) -> Handler:
    """Admin token check and OpenAI-shaped errors around an admin handler."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        api = request.app[ADMIN]
        try:
            token = api.st.runtime.config.admin.token  # per request: a reload may change it
            if token is None:
                raise AdminDisabled("the admin API is disabled: set admin.token to enable it")
            if not token_ok(request, token.get_secret_value()):
                raise Unauthorized(
                    "Missing or incorrect admin token: send 'Authorization: Bearer <admin token>'."
                )
            return await handler(request)
        except ProxyError as e:
            return e.response()

    return wrapper


@_guarded
async def _backends(request: web.Request) -> web.StreamResponse:
    api = request.app[ADMIN]
    if api.host is not None:
        return _json(api.host.host_backends(api.backends()))
    return _json({"object": "list", "data": api.backends()})


def _unconfirmed(workers: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{w['worker']} (pid {w['pid']}: {w.get('reload', {}).get('error') or w['status']})"
        for w in workers
        if w["status"] == "not_confirmed" or w.get("reload", {}).get("status") == "failed"
    )


async def _set_draining(request: web.Request, draining: bool) -> web.StreamResponse:
    api = request.app[ADMIN]
    name, pool = request.match_info["name"], request.query.get("pool")
    if api.host is None:
        return _json(api.set_draining(name, pool, draining=draining))
    ep = api.find(name, pool)
    workers = await api.host.set_draining(ep.pool, ep.name, draining)
    if missing := _unconfirmed(workers):
        what = "drain" if draining else "undrain"
        raise HostNotConfirmed(
            f"{what} of backend '{ep.name}' (pool '{ep.pool}') is recorded for the host and "
            f"applied by the other workers, but workers {missing} did not confirm within "
            f"{CONFIRM_DEADLINE:g} s; they apply it when they read it (at the latest when "
            "restarted): repeat the request to check",
            workers,
        )
    return _json({**api.backend_state(ep), "workers": workers, "answered_by": api.host.me()})


@_guarded
async def _drain(request: web.Request) -> web.StreamResponse:
    return await _set_draining(request, True)


@_guarded
async def _undrain(request: web.Request) -> web.StreamResponse:
    return await _set_draining(request, False)


@_guarded
async def _reload(request: web.Request) -> web.StreamResponse:
    api = request.app[ADMIN]
    try:
        if api.host is None:
            return _json(await api.reload())
        result, workers = await api.host.reload()
    except ConfigError as e:
        log.error("POST /admin/reload: config not reloaded, the running one stays: %s", e)
        raise BadRequest(str(e)) from None
    if missing := _unconfirmed(workers):
        raise HostNotConfirmed(
            f"the config was reloaded by this worker, but workers {missing} did not "
            f"confirm a reload within {CONFIRM_DEADLINE:g} s or failed it (see workers); "
            "a worker that did not confirm reloads when it reads the request",
            workers,
        )
    return _json({**result, "workers": workers, "answered_by": api.host.me()})


def add_admin_routes(app: web.Application, api: AdminAPI) -> None:
    app[ADMIN] = api
    app.router.add_get("/admin/backends", _backends)
    # {name:.+}: a default backend name is host:port/path and may contain '/'.
    app.router.add_post("/admin/backends/{name:.+}/drain", _drain)
    app.router.add_post("/admin/backends/{name:.+}/undrain", _undrain)
    app.router.add_post("/admin/reload", _reload)
