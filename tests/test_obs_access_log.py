"""The structured access log: JSON lines with the documented fields, and no secrets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from lbproxy.config import ConfigError, parse_config
from lbproxy.proxy.observability import OBS
from tests.conftest import proxy_config
from tests.obs_support import failing_backend_factory

FIELDS = {
    "ts", "request_id", "route", "model", "pool", "backend", "vendor", "status", "outcome",
    "stream", "ttft_s", "duration_s", "queue_wait_s", "prompt_tokens", "completion_tokens",
    "attempts",
    "retries", "failures", "client", "scores", "totals", "reason",
}  # fmt: skip
SECRETS = ("sk-client-secret-0123456789", "upstream-key-abcdef", "x-api-secret-xyz")


def read_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Wait for the periodic flush to write `n` lines; parse each as JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_bytes() if path.exists() else b""
        if text.count(b"\n") >= n:
            break
        time.sleep(0.05)
    raw = path.read_bytes()
    for secret in SECRETS:
        assert secret.encode() not in raw
    assert b"Authorization" not in raw and b"authorization" not in raw
    lines = raw.splitlines()
    assert len(lines) == n, raw
    return [orjson.loads(line) for line in lines]


@pytest.fixture
def failing_backends(loop_thread):
    yield from failing_backend_factory(loop_thread)


def test_access_log_lines_have_every_field(
    fake_backends,
    failing_backends,
    run_proxy,
    tmp_path: Path,
) -> None:
    good = fake_backends(1)[0]
    dropping = failing_backends(drop=True)
    cfg = proxy_config([dropping, good], routing="least-request")
    cfg["pools"][0]["backends"][0]["vendor"] = "vendor-a"
    cfg["pools"][0]["backends"][1]["vendor"] = "vendor-b"
    cfg["pools"][0]["backends"][0]["api_key"] = SECRETS[1]
    log_path = tmp_path / "access.jsonl"
    cfg["access_log"] = {"enabled": True, "path": str(log_path)}
    proxy = run_proxy(cfg)
    headers = {"Authorization": f"Bearer {SECRETS[0]}", "x-api-key": SECRETS[2]}
    with httpx.Client(base_url=proxy.url, timeout=10, headers=headers) as c:
        body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3}
        r1 = c.post("/v1/completions", json=body, headers={"x-request-id": "req-1"})
        r2 = c.post("/v1/completions", json={**body, "stream": True})
        r3 = c.post("/v1/completions", json={"model": "unknown-model", "api_key": SECRETS[2]})
    assert (r1.status_code, r2.status_code, r3.status_code) == (200, 200, 404)

    lines = read_lines(log_path, 3)
    for line in lines:
        assert set(line) == FIELDS
        assert line["ts"].endswith("Z")
        assert line["client"] == "127.0.0.1"
        assert line["duration_s"] > 0
    a, b, c_ = lines
    assert a["request_id"] == "req-1"
    assert b["request_id"] == r2.headers["x-request-id"] and b["request_id"] != "req-1"
    for line in (a, b):
        assert line["model"] == "fake-model" and line["pool"] == "main"
        assert line["status"] == 200 and line["outcome"] == "ok"
        assert line["route"] == "/v1/completions"
    # be0 drops connections: least-request may try it first; then its failure is recorded
    tried_dropping = len(dropping.received)
    assert tried_dropping >= 1  # with the seeded tie-break be0 is tried first
    assert sum(line["retries"] for line in lines) == tried_dropping
    for line in (a, b):
        assert line["backend"] == "be1" and line["vendor"] == "vendor-b"
        assert line["failures"] == ["reset_after_send"] * line["retries"]  # read, then closed
        assert line["attempts"] == 1 + line["retries"]
        assert set(line["scores"]) == {"least-request"}
        assert set(line["scores"]["least-request"]) == {"be0", "be1"}
        assert set(line["totals"]) == {"be0", "be1"}
    assert a["stream"] is False and a["ttft_s"] is None
    assert (a["prompt_tokens"], a["completion_tokens"]) == (7, 3)  # from the body's usage
    assert b["stream"] is True and 0 < b["ttft_s"] <= b["duration_s"]
    assert b["completion_tokens"] is None  # the fake stream sends no usage
    assert c_["status"] == 404 and c_["outcome"] == "model_not_found"
    assert c_["model"] == "unknown-model" and c_["pool"] is None
    assert c_["backend"] is None and c_["scores"] is None and c_["attempts"] == 0


def test_access_log_is_off_by_default(fake_backends, run_proxy) -> None:
    proxy = run_proxy(proxy_config(fake_backends(1)))
    assert proxy.runner.app[OBS].access_log is None
    assert proxy.runner.app[OBS].metrics.access_log is None


def test_access_log_to_stderr(fake_backends, run_proxy, capfd: pytest.CaptureFixture) -> None:
    cfg = proxy_config(fake_backends(1))
    cfg["access_log"] = {"enabled": True}
    proxy = run_proxy(cfg)
    r = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": "fake-model", "prompt": "x", "max_tokens": 2},
        headers={"x-request-id": "to-stderr", "Authorization": f"Bearer {SECRETS[0]}"},
    )
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    err = ""
    while time.monotonic() < deadline and "to-stderr" not in err:
        time.sleep(0.1)
        err += capfd.readouterr().err
    lines = [orjson.loads(x) for x in err.splitlines() if x.startswith('{"ts"')]
    assert [x["request_id"] for x in lines] == ["to-stderr"]
    assert SECRETS[0] not in err


@pytest.mark.parametrize(
    ("access_log", "error"),
    [({"enabled": "maybe"}, "access_log.enabled"), ({"file": "x"}, "access_log.file")],
)
def test_access_log_config_is_validated(access_log: dict[str, Any], error: str) -> None:
    cfg = proxy_config(["http://127.0.0.1:9"])
    cfg["access_log"] = access_log
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_config(cfg, "t.yaml")
