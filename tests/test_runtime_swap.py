"""One runtime snapshot (lbproxy/proxy/runtime.py): validation's routers are the ones the
proxy runs (built once), a reload builds the new runtime off the event loop, and a
request in flight across a reload finishes on the runtime it started with."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from pydantic import BaseModel, ConfigDict

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy
from lbproxy.proxy.pools import PoolTable
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins.round_robin import RoundRobinPicker
from lbproxy.routing.registry import PLUGINS, register
from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers, start_proxy_from_file, write_config
from tests.stream_gaps import gaps_around

# ---- a routing plugin that counts its builds and may take its time ------------------------

TYPE = "test-counted-build"
KIND = "picker"
BUILDS: list[float] = []  # each build's delay


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay: float = 0.0  # seconds the build blocks (a big tokenizer or index, say)


def build(params: Params, bctx: BuildContext) -> RoundRobinPicker:
    BUILDS.append(params.delay)
    time.sleep(params.delay)  # blocking, as a real slow build is
    return RoundRobinPicker()


@pytest.fixture
def counted_plugin() -> Iterator[list[float]]:
    register(sys.modules[__name__])
    BUILDS.clear()
    try:
        yield BUILDS
    finally:
        PLUGINS.pop(TYPE, None)


def _routing(delay: float = 0.0) -> dict[str, Any]:
    return {"picker": {"type": TYPE, "delay": delay}}


@pytest.fixture
def file_proxy(loop_thread, tmp_path) -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    started: list[RunningProxy] = []

    def make(cfg: dict[str, Any]) -> RunningProxy:
        proxy = loop_thread.run(start_proxy_from_file(write_config(tmp_path / "lb.yaml", cfg)))
        started.append(proxy)
        return proxy

    yield make
    for p in started:
        loop_thread.run(p.close())


def _cfg(backends: list[Any], **kw: Any) -> dict[str, Any]:
    cfg = proxy_config(backends, admin={"token": "admin-secret"}, **kw)
    cfg["health"] = {"interval": 60}  # keep the checks out of the way
    return cfg


# ---- (1) a slow router build does not stall the loop -------------------------------------


async def _gaps_around_reload(proxy: RunningProxy, path: Path, new: dict[str, Any]) -> Any:
    """The stream's largest gap while a reload runs, the gap before, the reload's answer."""

    async def reload(s: aiohttp.ClientSession) -> tuple[int, Any]:
        write_config(path, new)
        async with s.post(proxy.admin_url + "/admin/reload", headers=admin_headers()) as r:
            return r.status, await r.json()

    return await gaps_around(proxy.url, reload)


def test_reload_builds_the_slow_router_off_the_loop(
    loop_thread, fake_backends, file_proxy, counted_plugin
) -> None:
    delay = 0.6
    (b0,) = fake_backends(1, chunk_delay=0.004)
    proxy = file_proxy(_cfg([b0]))
    assert proxy.state.config_path is not None
    new = _cfg([b0], routing=_routing(delay))
    gap, before, (status, answer) = loop_thread.run(
        _gaps_around_reload(proxy, Path(proxy.state.config_path), new)
    )
    print(f"build {delay * 1e3:.0f} ms, largest gap {gap * 1e3:.1f} ms (before {before * 1e3:.1f})")
    assert status == 200, answer
    # The old code built the table's router again, on the loop: one gap of about `delay`.
    assert gap < delay / 2, (gap, before)
    assert answer["pools"]["main"]["router"] == "rebuilt"
    assert counted_plugin == [delay]  # validation's build is the one that runs
    # ... and the new router serves.
    r = httpx.post(proxy.url + "/v1/completions", json={"model": "fake-model", "prompt": "x"})
    assert r.status_code == 200
    assert proxy.state.runtime.pools.pools[0].router.profile_name != "round-robin"


# ---- (2) validation and the table build the router once ----------------------------------


def test_validation_and_table_build_the_router_once(
    loop_thread, fake_backends, run_proxy, counted_plugin
) -> None:
    b0, b1 = fake_backends(2)
    proxy = run_proxy(proxy_config([b0, b1], routing=_routing()))  # parse_config, then start
    assert counted_plugin == [0.0]
    statuses = [
        httpx.post(proxy.url + "/v1/completions", json={"model": "fake-model"}).status_code
        for _ in range(4)
    ]
    assert statuses == [200] * 4
    assert len(b0.received) == len(b1.received) == 2  # the plugin's round-robin routes
    # A reload that changes the routing: built once more (by its validation), not twice.
    admin = proxy.state.admin
    assert admin is not None
    cfg = parse_config(proxy_config([b0, b1], routing=_routing(0.01)), "reloaded")
    assert counted_plugin == [0.0, 0.01]
    answer = loop_thread.run(admin.apply(cfg))
    assert answer["pools"]["main"]["router"] == "rebuilt"
    assert counted_plugin == [0.0, 0.01]
    assert proxy.state.runtime.pools.pools[0].spec is cfg.pools[0]
    # One validated Config built into two tables: the second builds its own router (a
    # validation's build is handed out once), so two tables never share a router's state.
    twice = parse_config(proxy_config([b0], routing=_routing()))
    first, second = PoolTable(twice), PoolTable(twice)
    assert first.pools[0].router is not second.pools[0].router
    assert counted_plugin == [0.0, 0.01, 0.0, 0.0]


# ---- (3) a request in flight across a reload: old runtime to its end, then the new one ----


def test_request_in_flight_keeps_its_runtime_and_the_next_sees_the_new_one(
    loop_thread, fake_backends, run_proxy
) -> None:
    main, extra = fake_backends(2)
    main.stall_before_headers = 1.0  # the in-flight request waits here for its answer
    old_key, new_key = "key-old", "key-new"

    def cfg(key: str, *, with_extra: bool, expose: bool, id_header: str) -> dict[str, Any]:
        c = proxy_config([main], auth={"api_keys": [key]})
        if with_extra:
            c["pools"].append(
                {
                    "name": "extra",
                    "models": ["extra-model"],
                    "backends": [{"url": extra.url, "name": "x0"}],
                }
            )
        c["expose_backend_header"] = expose
        c["request_id_header"] = id_header
        c["health"] = {"interval": 60}
        return c

    proxy = run_proxy(cfg(old_key, with_extra=True, expose=False, id_header="x-request-id"))
    old_runtime = proxy.state.runtime
    url = proxy.url + "/v1/completions"
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}

    def post(key: str, model: str = "fake-model") -> httpx.Response:
        return httpx.post(
            url, json={**body, "model": model}, headers={"Authorization": f"Bearer {key}"}
        )

    assert post(old_key, "extra-model").status_code == 200
    extra_seen = len(extra.received)
    in_flight: list[httpx.Response] = []
    t = threading.Thread(target=lambda: in_flight.append(post(old_key)))
    t.start()
    deadline = time.monotonic() + 5
    while main.active == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert main.active == 1  # it reached the backend, which holds its answer back
    admin = proxy.state.admin
    assert admin is not None
    new = parse_config(cfg(new_key, with_extra=False, expose=True, id_header="x-trace-id"))
    answer = loop_thread.run(admin.apply(new))
    assert answer["pools"]["extra"]["removed_pool"] is True
    assert main.active == 1, "the reload came too late to be across the request"
    assert proxy.state.runtime is not old_runtime and proxy.state.runtime.config is new

    t.join(10)
    (r,) = in_flight
    # Finished on its own runtime: the old settings to its end, not the new ones.
    assert r.status_code == 200, r.text
    assert "x-lbproxy-backend" not in r.headers
    assert "x-request-id" in r.headers and "x-trace-id" not in r.headers

    # The next requests see the new runtime whole: keys, pools, settings.
    refused = post(old_key)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    ok = post(new_key)
    assert ok.status_code == 200
    assert ok.headers["x-lbproxy-backend"] == "be0" and "x-trace-id" in ok.headers
    gone = post(new_key, "extra-model")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert len(extra.received) == extra_seen  # the removed pool is not routed to
