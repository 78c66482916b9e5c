"""The admin API: token, backend states, drain and undrain, a separate listener."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
TOKEN = "admin-secret"


def _cfg(backends, **kw):
    return proxy_config(backends, admin={"token": TOKEN}, **kw)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/backends"),
        ("POST", "/admin/backends/be0/drain"),
        ("POST", "/admin/backends/be0/undrain"),
        ("POST", "/admin/reload"),
    ],
)
def test_admin_routes_need_the_admin_token(fake_backends, run_proxy, method, path) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(_cfg([backend], auth={"api_keys": ["client-key"]}))
    with httpx.Client(base_url=proxy.url) as c:
        for headers in ({}, admin_headers("wrong"), admin_headers("client-key")):
            r = c.request(method, path, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    st = proxy.state.pools.pools[0].endpoints[0]
    assert not st.draining  # nothing happened


def test_admin_api_is_off_without_a_token(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    r = httpx.get(proxy.url + "/admin/backends", headers=admin_headers())
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "admin_disabled"


def test_backends_lists_each_state(fake_backends, run_proxy) -> None:
    good, down = fake_backends(2)
    down.fail_status = 503
    cfg = _cfg([good, down], health={"interval": 0.2})
    # credentials in a URL are used, never shown
    cfg["pools"][0]["backends"][0]["url"] = good.url.replace("://", "://user:pw@")
    del cfg["pools"][0]["backends"][0]["name"]
    proxy = run_proxy(cfg)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = httpx.get(proxy.url + "/admin/backends", headers=admin_headers()).json()["data"]
        if data[1]["state"] == "unhealthy":
            break
        time.sleep(0.05)
    first, second = data
    assert first["name"] == f"127.0.0.1:{good.port}" and "pw" not in str(first)
    assert first["url"] == good.url
    assert first["state"] == "serving" and first["healthy"] and not first["draining"]
    assert first["pool"] == "main" and first["weight"] == 1.0 and first["in_flight"] == 0
    assert first["health"]["active"]["up"] is True
    assert first["health"]["circuit"]["state"] == "closed"
    assert second["name"] == "be1" and second["state"] == "unhealthy"
    assert second["health"]["active"]["last_error"] == "HTTP 503"


def test_drain_lets_in_flight_finish_and_sends_nothing_new(fake_backends, run_proxy) -> None:
    b0, b1 = fake_backends(2, chunk_delay=0.05)
    proxy = run_proxy(_cfg([b0, b1], expose_backend_header=True))
    stream = {"model": "fake-model", "prompt": "x", "max_tokens": 30, "stream": True}
    out: dict[str, str] = {}

    def streamer() -> None:
        with httpx.Client(timeout=30) as c:
            r = c.post(proxy.url + "/v1/completions", json=stream)
            out["backend"], out["text"] = r.headers["x-lbproxy-backend"], r.text

    t = threading.Thread(target=streamer)
    t.start()  # round-robin: the first request goes to be0
    deadline = time.monotonic() + 5
    while b0.in_progress == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b0.in_progress == 1
    with httpx.Client(base_url=proxy.url, headers=admin_headers()) as admin:
        r = admin.post("/admin/backends/be0/drain")
        assert r.status_code == 200
        assert r.json()["state"] == "draining" and r.json()["in_flight"] == 1
        before = len(b0.received)
        with httpx.Client(base_url=proxy.url) as c:
            assert all(c.post("/v1/completions", json=BODY).is_success for _ in range(6))
        assert len(b0.received) == before  # nothing new on the drained backend
        t.join(30)
        assert out["backend"] == "be0" and out["text"].endswith("data: [DONE]\n\n")
        assert "error" not in out["text"]

        r = admin.post("/admin/backends/be0/undrain")
        assert r.status_code == 200 and r.json()["state"] == "serving"
        with httpx.Client(base_url=proxy.url) as c:
            assert all(c.post("/v1/completions", json=BODY).is_success for _ in range(4))
        assert len(b0.received) == before + 2


def test_drain_unknown_and_ambiguous_backends(fake_backends, run_proxy) -> None:
    b0, b1 = fake_backends(2)
    cfg = _cfg([b0])
    cfg["pools"].append(
        {"name": "second", "models": ["other"], "backends": [{"url": b1.url, "name": "be0"}]}
    )
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, headers=admin_headers()) as admin:
        r = admin.post("/admin/backends/nope/drain")
        assert r.status_code == 404 and r.json()["error"]["code"] == "backend_not_found"
        r = admin.post("/admin/backends/be0/drain")
        assert r.status_code == 409 and "?pool=" in r.json()["error"]["message"]
        r = admin.post("/admin/backends/be0/drain", params={"pool": "second"})
        assert r.status_code == 200 and r.json()["pool"] == "second"
    main, second = proxy.state.pools.pools
    assert not main.endpoints[0].draining and second.endpoints[0].draining


@pytest.mark.parametrize("face", ["native", "asgi"], indirect=True)
def test_admin_on_its_own_listener(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], admin={"token": TOKEN, "port": 0}))
    assert proxy.admin_url != proxy.url
    # not on the main listener ...
    r = httpx.get(proxy.url + "/admin/backends", headers=admin_headers())
    assert r.status_code == 404
    assert httpx.post(proxy.url + "/admin/reload", headers=admin_headers()).status_code == 404
    # ... but on its own, which in turn serves nothing else
    r = httpx.get(proxy.admin_url + "/admin/backends", headers=admin_headers())
    assert r.status_code == 200 and r.json()["data"][0]["name"] == "be0"
    assert httpx.get(proxy.admin_url + "/admin/backends").status_code == 401
    assert httpx.post(proxy.admin_url + "/v1/completions", json=BODY).status_code == 404
    assert httpx.post(proxy.url + "/v1/completions", json=BODY).status_code == 200
    assert len(backend.received) == 1
