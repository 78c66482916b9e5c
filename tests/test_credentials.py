"""`user:password@` never shows: backend names made from URLs, /admin/backends URLs,
metric labels, the dashboard, the access log and the Redis URL in shared-state logs all
go through `lbproxy.credentials.without_credentials`."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import httpx
import pytest

from lbproxy.config import SharedState as SharedStateConfig
from lbproxy.config import parse_config
from lbproxy.credentials import without_credentials
from lbproxy.replicas.shared_state import SharedState
from tests.conftest import proxy_config
from tests.test_obs_access_log import read_lines

SECRET = "pw-9f3c"


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("http://user:pw@host:8000/v1", "http://host:8000/v1"),
        ("https://host:8443", "https://host:8443"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("http://u:p#w/x@host:1", "http://host:1"),  # unencoded "#" and "/" in a password
        ("user:pw@host:8000/v1", "host:8000/v1"),  # a name made from a URL
        ("be0", "be0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_without_credentials(given: str, shown: str) -> None:
    assert without_credentials(given) == shown


def test_default_backend_name_drops_credentials() -> None:
    cfg = proxy_config([f"http://ops:{SECRET}@127.0.0.1:9/v1"])
    del cfg["pools"][0]["backends"][0]["name"]
    backend = parse_config(cfg, "test-config").pools[0].backends[0]
    assert backend.name == "127.0.0.1:9/v1"


def test_metrics_dashboard_and_access_log_hide_a_named_backends_credentials(
    fake_backends, run_proxy, tmp_path: Path
) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend])
    cfg["pools"][0]["backends"][0]["name"] = f"ops:{SECRET}@be0"
    log_path = tmp_path / "access.jsonl"
    cfg["access_log"] = {"enabled": True, "path": str(log_path)}
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=body).status_code == 200
        metrics = c.get("/metrics").text
        dashboard = c.get("/dashboard/state.json").text
    (line,) = read_lines(log_path, 1)
    assert line["backend"] == "be0"
    assert 'backend="be0"' in metrics and SECRET not in metrics
    assert "main/be0" in dashboard and SECRET not in dashboard


async def test_shared_state_log_hides_the_redis_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    state = SharedState(SharedStateConfig(redis=url), lambda: None, lambda: 0.0)
    try:
        with caplog.at_level(logging.WARNING, logger="lbproxy.shared_state"):
            state._failed("write", ConnectionError("refused"))
        assert f"Redis at redis://127.0.0.1:{port}/0 failed" in caplog.text
        assert SECRET not in caplog.text
    finally:
        await state.redis.aclose()
