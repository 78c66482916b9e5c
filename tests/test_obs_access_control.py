"""Who may read /metrics, /dashboard and /dashboard/state.json: observability.protect."""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from lbproxy.config import ConfigError, parse_config
from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers
from tests.test_obs_dashboard import CHROMIUM, CHROMIUM_ARGS

ROUTES = ["/metrics", "/dashboard", "/dashboard/", "/dashboard/state.json"]
ADMIN_TOKEN = "admin-secret"
METRICS_TOKEN = "metrics-secret"
BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


def basic(password: str, user: str = "ops") -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"].startswith("Basic ")


def test_open_by_default(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    for path in ROUTES:
        assert httpx.get(proxy.url + path).status_code == 200, path


def test_metrics_token_guards_every_observability_route(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend],
        auth={"api_keys": ["client-key"]},
        admin={"token": ADMIN_TOKEN},
        observability={"protect": "metrics_token", "metrics_token": METRICS_TOKEN},
    )
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url) as c:
        for path in ROUTES:
            for headers in (
                {},
                admin_headers("wrong"),
                admin_headers(METRICS_TOKEN + "x"),
                admin_headers(ADMIN_TOKEN),  # the other token does not do
                admin_headers("client-key"),
                basic("wrong"),
                {"Authorization": "Basic !!!not-base64"},
            ):
                r = c.get(path, headers=headers)
                assert_refused(r)
                assert "be0" not in r.text and backend.url not in r.text
            assert c.get(path, headers=admin_headers(METRICS_TOKEN)).status_code == 200, path
            # A browser: HTTP Basic auth with the token as the password.
            assert c.get(path, headers=basic(METRICS_TOKEN)).status_code == 200, path
        r = c.get("/metrics", headers=admin_headers(METRICS_TOKEN))
        assert "lbproxy_backend_scrape_errors" in r.text
        # Health and readiness stay open: probes carry no token.
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (apt-get install -y chromium)",
)
def test_a_browser_opens_the_protected_dashboard_with_basic_auth(fake_backends, run_proxy) -> None:
    from playwright.sync_api import expect, sync_playwright

    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend], observability={"protect": "metrics_token", "metrics_token": METRICS_TOKEN}
    )
    proxy = run_proxy(cfg)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # The browser answers the Basic challenge; the page's own polling of
            # state.json then carries the same credentials.
            context = browser.new_context(
                http_credentials={"username": "ops", "password": METRICS_TOKEN}
            )
            page = context.new_page()
            statuses: list[int] = []
            page.on(
                "response",
                lambda r: statuses.append(r.status) if r.url.endswith("state.json") else None,
            )
            response = page.goto(proxy.url + "/dashboard")
            assert response is not None and response.status == 200
            expect(page.locator("body")).to_have_attribute(
                "data-ticks", re.compile(r"^[1-9][0-9]*$"), timeout=15000
            )
            assert page.locator("#status").inner_text() == "live"
            assert 200 in statuses
        finally:
            browser.close()


def test_admin_token_guards_every_observability_route(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend], admin={"token": ADMIN_TOKEN}, observability={"protect": "admin_token"}
    )
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url) as c:
        for path in ROUTES:
            assert_refused(c.get(path))
            assert_refused(c.get(path, headers=admin_headers("wrong")))
            assert c.get(path, headers=admin_headers(ADMIN_TOKEN)).status_code == 200, path
        assert c.get("/admin/backends", headers=admin_headers(ADMIN_TOKEN)).status_code == 200


def test_admin_listener_only(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config(
        [backend],
        admin={"token": ADMIN_TOKEN, "port": 0},
        observability={"protect": "admin_listener"},
    )
    proxy = run_proxy(cfg)
    assert proxy.admin_url != proxy.url
    for path in ROUTES:
        r = httpx.get(proxy.url + path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
        assert httpx.get(proxy.admin_url + path).status_code == 200, path
    assert "lbproxy_requests" in httpx.get(proxy.admin_url + "/metrics").text
    # the rest is as before: /v1 on the main listener, /admin on the admin one
    assert httpx.post(proxy.url + "/v1/completions", json=BODY).status_code == 200
    assert httpx.post(proxy.admin_url + "/v1/completions", json=BODY).status_code == 404
    r = httpx.get(proxy.admin_url + "/admin/backends", headers=admin_headers(ADMIN_TOKEN))
    assert r.status_code == 200


def test_a_separate_admin_listener_alone_does_not_move_them(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], admin={"token": ADMIN_TOKEN, "port": 0}))
    for path in ROUTES:
        assert httpx.get(proxy.url + path).status_code == 200, path
        assert httpx.get(proxy.admin_url + path).status_code == 404, path


def test_a_reload_changes_protection(fake_backends, run_proxy, loop_thread) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend])
    proxy = run_proxy(cfg)
    assert httpx.get(proxy.url + "/metrics").status_code == 200
    cfg["observability"] = {"protect": "metrics_token", "metrics_token": METRICS_TOKEN}
    admin = proxy.state.admin
    assert admin is not None
    loop_thread.run(admin.apply(parse_config(cfg, "reloaded")))
    assert_refused(httpx.get(proxy.url + "/metrics"))
    r = httpx.get(proxy.url + "/metrics", headers=admin_headers(METRICS_TOKEN))
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("observability", "admin", "error"),
    [
        (
            {"protect": "metrics_token"},
            {},
            "observability.metrics_token: must be set when protect is metrics_token",
        ),
        (
            {"protect": "metrics_token", "metrics_token": ""},
            {},
            "observability.metrics_token: is empty",
        ),
        (
            {"protect": "admin_token"},
            {},
            "observability.protect: admin_token needs admin.token to be set",
        ),
        (
            {"protect": "admin_listener"},
            {"token": ADMIN_TOKEN},
            "observability.protect: admin_listener needs a separate admin listener",
        ),
        (
            {"protect": "everyone"},
            {},
            "observability.protect: must be one of 'none', 'admin_token'",
        ),
    ],
)
def test_config_errors_name_the_key(observability, admin, error) -> None:
    cfg = proxy_config(["http://127.0.0.1:1"], observability=observability, admin=admin)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "lbproxy.yaml")
    assert str(e.value).startswith("lbproxy.yaml: ")
    assert error in str(e.value)
    assert METRICS_TOKEN not in str(e.value)
