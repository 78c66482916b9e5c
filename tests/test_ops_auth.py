"""Client API keys, upstream keys, limits, and secrets kept out of logs and metrics."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import proxy_config

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
KEY = "sk-client-key-0123456789"
KEY2 = "sk-other-key-9876543210"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    return err


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no header"),
        (_auth("sk-wrong"), "wrong key"),
        (_auth(KEY[:-1]), "a prefix of a key"),
        (_auth(KEY + "x"), "a key plus one character"),
        ({"Authorization": KEY}, "no Bearer scheme"),
        ({"Authorization": f"Basic {KEY}"}, "another scheme"),
        ({"Authorization": "Bearer"}, "bearer without a token"),
    ],
)
def test_without_a_valid_key_is_401(fake_backends, run_proxy, headers, why) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], auth={"api_keys": [KEY]}))
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, headers=headers)
    err = _assert_openai_error(r, 401, "invalid_api_key")
    assert err["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text
    assert backend.received == [], why


def test_listed_env_and_file_keys_are_accepted(fake_backends, run_proxy, monkeypatch, tmp_path):
    (backend,) = fake_backends(1)
    monkeypatch.setenv("LBPROXY_TEST_KEY", KEY2)
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\n\nsk-from-file-1\n  sk-from-file-2  \n")
    cfg = proxy_config(
        [backend],
        auth={"api_keys": [KEY, "${LBPROXY_TEST_KEY}"], "api_keys_file": str(key_file)},
    )
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url) as c:
        for key in (KEY, KEY2, "sk-from-file-1", "sk-from-file-2"):
            assert c.post("/v1/completions", json=BODY, headers=_auth(key)).status_code == 200
        # the scheme is case-insensitive (RFC 9110)
        r = c.post("/v1/completions", json=BODY, headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200
        # /v1/models needs a key too; the operator routes do not
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers=_auth(KEY)).json()["data"][0]["id"] == "fake-model"
        assert c.get("/health").status_code == 200
    assert len(backend.received) == 5


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"auth": {"api_keys": ["${LBPROXY_UNSET_KEY:-}"]}}, r"auth\.api_keys\[0\]: is empty"),
        ({"auth": {"api_keys": ["two words"]}}, r"auth\.api_keys\[0\]: contains whitespace"),
        ({"auth": {"api_keys_file": "/nonexistent/keys"}}, r"auth\.api_keys_file: cannot read"),
        ({"auth": {"max_concurrent_per_key": 0}}, r"auth\.max_concurrent_per_key: "),
        ({"admin": {"token": ""}}, r"admin\.token: is empty"),
        (
            {"listen": {"host": "127.0.0.1", "port": 8080}, "admin": {"port": 8080}},
            r"admin: host/port must differ from listen's",
        ),
        ({"limits": {"max_header_bytes": 10}}, r"limits\.max_header_bytes: "),
        ({"health": {"failure_threshold": 0}}, r"health\.failure_threshold: "),
    ],
)
def test_config_errors_name_the_key_and_never_the_secret(over, message, tmp_path) -> None:
    from lbproxy.config import ConfigError, parse_config

    cfg = proxy_config(["http://127.0.0.1:9"], **over)
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(cfg, "test.yaml")
    assert str(e.value).startswith("test.yaml: ")
    assert "two words" not in str(e.value)


def test_empty_key_file_is_a_config_error(tmp_path) -> None:
    from lbproxy.config import ConfigError, parse_config

    (tmp_path / "keys").write_text("# nothing yet\n\n")
    cfg = proxy_config(["http://127.0.0.1:9"], auth={"api_keys_file": str(tmp_path / "keys")})
    with pytest.raises(ConfigError, match=r"auth\.api_keys_file: no keys in the file"):
        parse_config(cfg, "test.yaml")


def test_client_key_is_not_forwarded_unless_configured(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], auth={"api_keys": [KEY]}))
    assert httpx.post(proxy.url + "/v1/completions", json=BODY, headers=_auth(KEY)).is_success
    assert "authorization" not in {k.lower() for k in backend.received[-1].headers}

    proxy2 = run_proxy(
        proxy_config([backend], auth={"api_keys": [KEY], "forward_client_key": True})
    )
    assert httpx.post(proxy2.url + "/v1/completions", json=BODY, headers=_auth(KEY)).is_success
    assert backend.received[-1].headers["Authorization"] == f"Bearer {KEY}"

    # Without client keys the header is not lbproxy's: it passes through as before.
    proxy3 = run_proxy(proxy_config([backend]))
    assert httpx.post(proxy3.url + "/v1/completions", json=BODY, headers=_auth("vllm")).is_success
    assert backend.received[-1].headers["Authorization"] == "Bearer vllm"


def test_per_backend_upstream_key(fake_backends, run_proxy) -> None:
    keyed, plain = fake_backends(2)
    cfg = proxy_config([keyed, plain], auth={"api_keys": [KEY]})
    cfg["pools"][0]["backends"][0]["api_key"] = "up-secret-1"
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, headers=_auth(KEY)) as c:
        for _ in range(4):
            assert c.post("/v1/completions", json=BODY).status_code == 200
    assert len(keyed.received) == len(plain.received) == 2
    assert all(r.headers["Authorization"] == "Bearer up-secret-1" for r in keyed.received)
    assert all("Authorization" not in r.headers for r in plain.received)


def test_concurrent_requests_per_key_are_limited(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, chunk_delay=0.05)
    proxy = run_proxy(
        proxy_config([backend], auth={"api_keys": [KEY, KEY2], "max_concurrent_per_key": 2})
    )
    stream = {"model": "fake-model", "prompt": "x", "max_tokens": 40, "stream": True}
    results: list[str] = []

    def one() -> None:
        with httpx.Client(timeout=30) as c:
            results.append(
                c.post(proxy.url + "/v1/completions", json=stream, headers=_auth(KEY)).text
            )

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while backend.in_progress < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.in_progress == 2
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, headers=_auth(KEY))
    _assert_openai_error(r, 429, "concurrency_limit_exceeded")
    assert r.headers["retry-after"] == "1"
    # another key is not held back by this one
    assert httpx.post(proxy.url + "/v1/completions", json=BODY, headers=_auth(KEY2)).is_success
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(x.endswith("data: [DONE]\n\n") for x in results)
    # the streams' slots were given back
    assert httpx.post(proxy.url + "/v1/completions", json=BODY, headers=_auth(KEY)).is_success
    auth = proxy.state.runtime.auth
    assert auth is not None
    # the handler gives its slot back just after the client has read the last byte
    deadline = time.monotonic() + 5
    while auth.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(auth.in_flight.values()) == 0  # (not the dict: its keys are the secrets)


def test_oversized_header_is_431_in_openai_shape(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"max_header_bytes": 1024}))
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, headers={"x-big": "a" * 2000})
    err = _assert_openai_error(r, 431, "request_header_fields_too_large")
    assert "1024" in err["message"]
    r = httpx.post(proxy.url + "/v1/" + "p" * 1100, json=BODY)  # the request line
    _assert_openai_error(r, 431, "request_header_fields_too_large")
    # headers under the limit pass, and the server is still fine
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, headers={"x-big": "a" * 900})
    assert r.status_code == 200
    assert len(backend.received) == 1


def test_oversized_body_is_413(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], limits={"max_body_bytes": 1000}))
    r = httpx.post(proxy.url + "/v1/completions", json={**BODY, "prompt": "x" * 2000})
    _assert_openai_error(r, 413, "request_too_large")
    assert backend.received == []


def _raw_post(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        body = b'{"model": "fake-model", "prompt": "x"}'
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    "path", ["/v1/../metrics", "/v1/%2e%2e/health", "/v1/..%2Freset_prefix_cache", "/v1/./x"]
)
def test_no_path_reaches_outside_v1_on_a_backend(fake_backends, run_proxy, path) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    answer = _raw_post(proxy.port, path)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"invalid_request" in answer
    assert backend.received == []


def test_secrets_never_reach_logs_or_metrics(fake_backends, run_proxy, caplog) -> None:
    upstream_key = "up-secret-abcdef123456"
    admin_token = "adm-secret-abcdef123456"
    good, failing = fake_backends(1), fake_backends(1, fail_status=503, health_status=200)
    cfg = proxy_config(
        [good[0], failing[0]],
        auth={"api_keys": [KEY]},
        admin={"token": admin_token},
        limits={"max_header_bytes": 1024},
    )
    cfg["pools"][0]["backends"][1]["api_key"] = upstream_key
    caplog.set_level(logging.DEBUG)
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url) as c:
        for _ in range(4):  # retries off the failing backend, logged at debug and warning
            assert c.post("/v1/completions", json=BODY, headers=_auth(KEY)).status_code == 200
        c.post("/v1/completions", json=BODY, headers=_auth(KEY + "-wrong"))
        c.post("/v1/completions", json=BODY, headers=_auth(KEY + "z" * 2000))  # 431
        c.get("/admin/backends", headers=_auth(admin_token + "-wrong"))
        c.get("/admin/backends", headers=_auth(admin_token))
        metrics = c.get("/metrics").text
        backends = c.get("/admin/backends", headers=_auth(admin_token)).text
    secrets = (KEY, upstream_key, admin_token)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for secret in secrets:
        assert secret not in logged
        assert secret not in metrics
        assert secret not in backends
