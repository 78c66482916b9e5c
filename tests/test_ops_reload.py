"""Hot reload: POST /admin/reload applies a changed config file, or refuses a bad one."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy
from lbproxy.proxy.pools import PoolTable
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY
from tests.conftest import proxy_config
from tests.ops_helpers import admin_headers, start_proxy_from_file, write_config

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


def _cfg(backends: list[Any], **kw: Any) -> dict[str, Any]:
    cfg = proxy_config(backends, admin={"token": "admin-secret"}, **kw)
    cfg["health"] = {"interval": 60}  # keep the checks out of the way
    return cfg


@pytest.fixture
def file_proxy(loop_thread, tmp_path) -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    started: list[RunningProxy] = []

    def make(cfg: dict[str, Any]) -> RunningProxy:
        path = write_config(tmp_path / "lbproxy.yaml", cfg)
        proxy = loop_thread.run(start_proxy_from_file(path))
        started.append(proxy)
        return proxy

    yield make
    for p in started:
        loop_thread.run(p.close())


def _reload(proxy: RunningProxy, cfg: dict[str, Any] | None = None) -> httpx.Response:
    if cfg is not None:
        path = proxy.state.config_path
        assert path is not None
        write_config(Path(path), cfg)
    return httpx.post(proxy.url + "/admin/reload", headers=admin_headers(), timeout=30)


def _send(url: str, n: int, **kw: Any) -> list[int]:
    with httpx.Client(base_url=url, timeout=10) as c:
        return [c.post("/v1/completions", json=BODY, **kw).status_code for _ in range(n)]


def test_added_backend_gets_traffic(fake_backends, file_proxy) -> None:
    b0, b1 = fake_backends(2)
    proxy = file_proxy(_cfg([b0]))
    assert _send(proxy.url, 4) == [200] * 4
    kept = proxy.state.pools.pools[0].endpoints[0]
    router = proxy.state.pools.pools[0].router

    r = _reload(proxy, _cfg([b0, b1]))
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["status"] == "reloaded"
    assert result["pools"]["main"]["added"] == ["be1"]
    assert result["pools"]["main"]["router"] == "kept"
    assert result["restart_required"] == []
    pool = proxy.state.pools.pools[0]
    assert pool.endpoints[0] is kept and pool.router is router  # state carried over
    assert _send(proxy.url, 10) == [200] * 10
    assert (len(b0.received), len(b1.received)) == (9, 5)


def test_removed_backend_gets_nothing_new_and_its_stream_completes(
    fake_backends, file_proxy
) -> None:
    b0 = fake_backends(1)[0]
    b1 = fake_backends(1, chunk_delay=0.05)[0]
    proxy = file_proxy(_cfg([b0, b1], expose_backend_header=True))
    assert _send(proxy.url, 1) == [200]  # round-robin: be0, so the stream goes to be1
    out: dict[str, Any] = {}

    def streamer() -> None:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 30, "stream": True}
        with httpx.Client(timeout=30) as c:
            r = c.post(proxy.url + "/v1/completions", json=body)
            out.update(backend=r.headers["x-lbproxy-backend"], text=r.text)

    t = threading.Thread(target=streamer)
    t.start()
    deadline = time.monotonic() + 5
    while b1.in_progress == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b1.in_progress == 1
    removed = proxy.state.pools.pools[0].endpoints[1]

    r = _reload(proxy, _cfg([b0], expose_backend_header=True))
    assert r.status_code == 200 and r.json()["pools"]["main"]["removed"] == ["be1"]
    assert b1.in_progress == 1  # the reload did not touch it
    before = len(b1.received)
    assert _send(proxy.url, 6) == [200] * 6
    assert len(b1.received) == before
    t.join(30)
    assert out["backend"] == "be1" and out["text"].endswith("data: [DONE]\n\n")
    assert '"error"' not in out["text"]
    deadline = time.monotonic() + 5  # the handler ends just after the client's last byte
    while removed.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert removed.in_flight == 0


def test_weight_change_changes_the_distribution(fake_backends, file_proxy) -> None:
    b0, b1 = fake_backends(2)
    proxy = file_proxy(_cfg([b0, b1]))
    assert _send(proxy.url, 20) == [200] * 20
    assert (len(b0.received), len(b1.received)) == (10, 10)
    r = _reload(proxy, _cfg([b0, b1], weights=[1, 3]))
    assert r.status_code == 200 and r.json()["pools"]["main"]["changed"] == ["be1"]
    assert _send(proxy.url, 40) == [200] * 40
    assert (len(b0.received) - 10, len(b1.received) - 10) == (10, 30)


def test_profile_change_rebuilds_the_router(fake_backends, file_proxy) -> None:
    b0, b1 = fake_backends(2)
    proxy = file_proxy(_cfg([b0, b1]))
    old_router = proxy.state.pools.pools[0].router
    r = _reload(proxy, _cfg([b0, b1], routing="least-request"))
    assert r.status_code == 200 and r.json()["pools"]["main"]["router"] == "rebuilt"
    router = proxy.state.pools.pools[0].router
    assert router is not old_router and router.profile_name == "least-request"
    assert _send(proxy.url, 6) == [200] * 6


def test_drain_and_keys_across_a_reload(fake_backends, file_proxy) -> None:
    b0, b1, b2 = fake_backends(3)
    proxy = file_proxy(_cfg([b0, b1], auth={"api_keys": ["old-key"]}))
    r = httpx.post(proxy.url + "/admin/backends/be0/drain", headers=admin_headers())
    assert r.status_code == 200
    r = _reload(proxy, _cfg([b0, b1, b2], auth={"api_keys": ["new-key"]}))
    assert r.status_code == 200
    assert proxy.state.pools.pools[0].endpoints[0].draining  # kept endpoint, kept state
    assert _send(proxy.url, 1, headers={"Authorization": "Bearer old-key"}) == [401]
    assert _send(proxy.url, 4, headers={"Authorization": "Bearer new-key"}) == [200] * 4
    assert len(b0.received) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pools: [unclosed\n", r"lbproxy.yaml: line 2, column 1: invalid YAML"),
        (None, r"lbproxy.yaml: pools\[0\].backends\[0\].url: must start with http"),
        ("pools: []\n", r"lbproxy.yaml: pools: "),
        (None, r"lbproxy.yaml: unknown_key: "),
    ],
)
def test_invalid_config_is_refused_and_the_old_one_stays(
    fake_backends, file_proxy, text, expected
) -> None:
    (b0,) = fake_backends(1)
    good = _cfg([b0])
    proxy = file_proxy(good)
    path = Path(proxy.state.config_path or "")
    if text is not None:
        path.write_text(text)
    elif "url" in expected:
        bad = _cfg(["ftp://nowhere"])
        write_config(path, bad)
    else:
        write_config(path, {**good, "unknown_key": 1})
    config_before, table_before = proxy.state.config, proxy.state.pools
    r = _reload(proxy)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(str(path))
    assert re.search(expected, err["message"]), err["message"]
    assert proxy.state.config is config_before and proxy.state.pools is table_before
    assert _send(proxy.url, 3) == [200] * 3


def test_reload_without_a_config_file_is_409(fake_backends, run_proxy) -> None:
    (b0,) = fake_backends(1)
    proxy = run_proxy(_cfg([b0]))
    r = httpx.post(proxy.url + "/admin/reload", headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_config_file"


def test_removed_backends_are_forgotten_by_kept_indexes(monkeypatch) -> None:
    def cfg(names: list[str], profile: str) -> Any:
        pool = {
            "name": "main",
            "models": ["sim"],
            "routing": profile,
            "tokenizer": "default",
            "backends": [{"url": f"http://{n}:8000", "name": n} for n in names],
        }
        return parse_config({"pools": [pool]}, "t.yaml")

    for profile in ("cache-aware", "precise-cache-aware"):
        old = PoolTable(cfg(["a", "b"], profile))
        pool = old.pools[0]
        forgotten: list[str] = []
        index = pool.bctx.shared.get(SHARED_KEY)
        if index is not None:
            monkeypatch.setattr(index, "forget", forgotten.append)
        else:
            scorer = next(
                ws.scorer for ws in pool.router.scorers if ws.scorer.name == "prefix-hash"
            )
            scorer.index.insert("b", [1, 2, 3], 10)
            monkeypatch.setattr(scorer, "forget", forgotten.append)
        new = PoolTable(cfg(["a", "c"], profile), previous=old)
        assert forgotten == []  # building has no effect on the running table
        changes = new.commit()
        assert new.pools[0].router is pool.router
        assert forgotten == ["b"], profile
        assert changes["main"]["added"] == ["c"] and changes["main"]["removed"] == ["b"]
        assert new.pools[0].endpoints[0] is old.pools[0].endpoints[0]


def test_kv_subscriber_restarts_only_when_its_sources_change(fake_backends, file_proxy) -> None:
    b0, b1 = fake_backends(2)

    def cfg(kv: bool, weight: float = 1.0) -> dict[str, Any]:
        c = _cfg([b0, b1], routing="precise-cache-aware", weights=[1, weight])
        c["pools"][0]["tokenizer"] = "default"
        if kv:
            c["pools"][0]["backends"][0]["kv_events"] = {
                "endpoint": "tcp://127.0.0.1:*",
                "topic": "kv-b0",
                "mode": "bind",
            }
        return c

    proxy = file_proxy(cfg(kv=False))
    assert proxy.state.kv_subscriber is None
    r = _reload(proxy, cfg(kv=True))
    assert r.status_code == 200 and r.json()["kv_subscriber_restarted"] is True
    subscriber = proxy.state.kv_subscriber
    assert subscriber is not None
    r = _reload(proxy, cfg(kv=True, weight=2))  # same sources: the subscriber stays
    assert r.status_code == 200 and r.json()["kv_subscriber_restarted"] is False
    assert proxy.state.kv_subscriber is subscriber
    r = _reload(proxy, cfg(kv=False))
    assert r.json()["kv_subscriber_restarted"] is True and proxy.state.kv_subscriber is None
    assert _send(proxy.url, 4) == [200] * 4


def test_a_change_to_shared_state_is_reported_as_needing_a_restart(
    fake_backends, file_proxy
) -> None:
    b0 = fake_backends(1)[0]
    proxy = file_proxy(_cfg([b0]))
    r = _reload(proxy, {**_cfg([b0]), "state": {"redis": "redis://127.0.0.1:9/0"}})
    assert r.status_code == 200, r.text
    assert r.json()["restart_required"] == ["state"]
    assert _send(proxy.url, 2) == [200, 200]  # still serving, without Redis
