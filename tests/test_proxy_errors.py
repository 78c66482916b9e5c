"""Every error lbproxy returns itself is OpenAI-shaped with the right status."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")


@pytest.fixture
def proxy_url(fake_backends, run_proxy) -> str:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend])
    cfg["limits"] = {"max_body_bytes": 1000}
    return run_proxy(cfg).url


@pytest.mark.parametrize(
    ("path", "content", "status", "code"),
    [
        ("/v1/completions", b"{not json", 400, "invalid_request"),
        ("/v1/completions", b"[1, 2]", 400, "invalid_request"),
        ("/v1/completions", b'{"prompt": "x"}', 400, "invalid_request"),
        ("/v1/completions", b'{"model": 5}', 400, "invalid_request"),
        ("/v1/completions", b"", 400, "invalid_request"),
        ("/v1/chat/completions", b'{"model": "nope", "messages": []}', 404, "model_not_found"),
        (
            "/v1/completions",
            b'{"model": "fake-model", "prompt": "' + b"x" * 2000 + b'"}',
            413,
            "request_too_large",
        ),
        ("/nowhere", b"{}", 404, "not_found"),
    ],
)
def test_error_statuses(proxy_url: str, path: str, content: bytes, status: int, code: str) -> None:
    r = httpx.post(proxy_url + path, content=content)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]


def test_unknown_model_lists_served_models(proxy_url: str) -> None:
    r = httpx.post(proxy_url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404
    assert "fake-model" in r.json()["error"]["message"]


def test_no_healthy_backend_is_503(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, fail_status=500)  # its /health answers 500 too
    cfg = proxy_config([backend])
    cfg["health"] = {"interval": 0.1, "unhealthy_after": 1}
    proxy = run_proxy(cfg)
    deadline = time.monotonic() + 5
    while httpx.get(proxy.url + "/ready").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = httpx.get(proxy.url + "/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    r = httpx.post(proxy.url + "/v1/completions", json={"model": "fake-model", "prompt": "x"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_backend_available"
    assert httpx.get(proxy.url + "/health").status_code == 200


def test_wrong_method_on_an_openai_route_is_405(proxy_url: str) -> None:
    r = httpx.get(proxy_url + "/v1/chat/completions")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.delete(proxy_url + "/v1/models").status_code == 404
