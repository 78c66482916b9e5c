"""Signals inside the running proxy: backends that share a name across pools, and the one
clock that metrics snapshots, health stamps and routing's `now` all come from."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config import parse_config
from lbproxy.proxy.app import start_proxy
from tests.fake_backend import FakeBackend
from tests.ops_helpers import admin_headers

CAPTURE = (Path(__file__).parent / "fixtures" / "vllm-0.32-metrics.txt").read_text()
TOKEN = "admin-secret"


def vllm_metrics(running: float, waiting: float, kv: float) -> str:
    """The real vLLM capture with the three gauges routing reads set to these values."""
    text = CAPTURE
    for name, value in (
        ("vllm:num_requests_running", running),
        ("vllm:num_requests_waiting", waiting),
        ("vllm:kv_cache_usage_perc", kv),
    ):
        text, n = re.subn(rf"^({re.escape(name)}\{{[^}}]*\}}) \S+$", rf"\g<1> {value}", text,
                          flags=re.MULTILINE)  # fmt: skip
        assert n == 1, name
    return text


def sample(text: str, name: str, **labels: str) -> float:
    """The one sample of `name` with these labels in a Prometheus text page."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def two_pools(url_a: str, url_b: str) -> dict[str, Any]:
    """Pools `a` and `b`, each with one backend named gpu-0."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"token": TOKEN},
        "signals": {"metrics_interval": 0.05},
        "health": {"interval": 0.1},
        "pools": [
            {"name": "a", "models": ["model-a"], "backends": [{"url": url_a, "name": "gpu-0"}]},
            {"name": "b", "models": ["model-b"], "backends": [{"url": url_b, "name": "gpu-0"}]},
        ],
    }


def test_same_backend_name_in_two_pools(fake_backends, run_proxy) -> None:
    fa, fb = fake_backends(2)
    fa.metrics_text = vllm_metrics(running=1, waiting=3, kv=0.25)
    fb.metrics_text = vllm_metrics(running=2, waiting=7, kv=0.5)
    fb.metrics_status = 500  # b's first scrapes fail: errors must be b's alone
    proxy = run_proxy(two_pools(fa.url, fb.url))
    (ep_a,) = proxy.state.pools.pools[0].endpoints
    (ep_b,) = proxy.state.pools.pools[1].endpoints
    assert (ep_a.name, ep_a.pool, ep_b.name, ep_b.pool) == ("gpu-0", "a", "gpu-0", "b")
    scraper = proxy.state.scraper
    assert scraper is not None

    wait_for(lambda: ep_a.metrics is not None and scraper.errors.get(ep_b, 0) >= 2)
    assert ep_b.metrics is None
    fb.metrics_status = 200
    wait_for(lambda: ep_b.metrics is not None)
    wait_for(lambda: fa.metrics_served.get(200, 0) >= 3 and fb.metrics_served.get(200, 0) >= 3)
    # Served is not yet counted: the scraper (on its own thread) may still be reading it.
    wait_for(lambda: scraper.successes.get(ep_a, 0) >= 3 and scraper.successes.get(ep_b, 0) >= 3)
    assert ep_a.metrics is not None and ep_b.metrics is not None
    assert (ep_a.metrics.num_running, ep_a.metrics.num_waiting) == (1, 3)
    assert (ep_b.metrics.num_running, ep_b.metrics.num_waiting) == (2, 7)
    assert fa.metrics_served.get(500, 0) == 0
    errors_b = fb.metrics_served[500]  # no more failures once b answers 200
    assert scraper.errors == {ep_b: errors_b} and scraper.last_error[ep_b] == "HTTP 500"
    assert scraper.successes[ep_a] >= 3 and scraper.successes[ep_b] >= 3

    page = httpx.get(proxy.url + "/metrics").text
    for pool, running, waiting, kv, errors in (("a", 1, 3, 0.25, 0), ("b", 2, 7, 0.5, errors_b)):
        labels = {"pool": pool, "backend": "gpu-0"}
        assert sample(page, "lbproxy_backend_running_requests", **labels) == running
        assert sample(page, "lbproxy_backend_waiting_requests", **labels) == waiting
        assert sample(page, "lbproxy_backend_kv_cache_usage_ratio", **labels) == kv
        assert sample(page, "lbproxy_backend_scrape_errors_total", **labels) == errors
        assert sample(page, "lbproxy_backend_scrapes_total", **labels) >= 3
        assert 0 <= sample(page, "lbproxy_backend_scrape_age_seconds", **labels) < 2
        assert sample(page, "lbproxy_backend_healthy", **labels) == 1

    r = httpx.get(proxy.url + "/admin/backends", headers=admin_headers(TOKEN))
    assert r.status_code == 200
    rows = {row["pool"]: row for row in r.json()["data"]}
    assert set(rows) == {"a", "b"}
    for pool, fake, running, waiting, kv in (("a", fa, 1, 3, 0.25), ("b", fb, 2, 7, 0.5)):
        row = rows[pool]
        assert row["name"] == "gpu-0" and row["url"] == fake.url
        assert row["state"] == "serving" and row["healthy"]
        assert row["health"]["active"]["up"] and row["health"]["active"]["last_check_age_s"] < 2
        metrics = row["metrics"]
        assert metrics is not None
        assert (metrics["num_running"], metrics["num_waiting"]) == (running, waiting)
        assert metrics["kv_cache_usage"] == kv and 0 <= metrics["age_s"] < 2


class OffsetLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is far from time.monotonic(), as another loop's may be."""

    def time(self) -> float:
        return super().time() + 1e6


@pytest.mark.parametrize("loop_factory", [OffsetLoop, uvloop.new_event_loop])
def test_signals_use_the_proxy_loop_clock(loop_factory: Callable[[], Any]) -> None:
    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        backend = await FakeBackend("gpu-0", metrics_text=vllm_metrics(1, 2, 0.5)).start()
        cfg = two_pools(backend.url, backend.url)
        cfg["pools"].pop()
        proxy = await start_proxy(parse_config(cfg, "test-config"), seed=0)
        try:
            st = proxy.state
            assert st.scraper is not None and st.health is not None
            (ep,) = st.pools.endpoints()
            before = loop.time()
            while ep.metrics is None or ep.metrics.time < before:
                assert loop.time() < before + 5, "no snapshot stamped with the loop clock"
                await asyncio.sleep(0.01)
            async with aiohttp.ClientSession(headers=admin_headers(TOKEN)) as s:
                async with s.get(proxy.url + "/admin/backends") as r:
                    admin = (await r.json())["data"][0]
                async with s.get(proxy.url + "/metrics") as r:
                    page = await r.text()
            snap: Any = ep.metrics
            return {
                "health_clock": st.health._clock,
                # The scraper runs on the signals thread's loop and stamps with its clock:
                # a loop of this loop's class, so the same clock.
                "scraper_loop": getattr(st.scraper.clock, "__self__", None),
                "loop": loop,
                "stamp_ok": before <= snap.time <= loop.time(),
                "fresh": ep.fresh_metrics(loop.time(), 1.0) is snap,
                "admin": admin,
                "age": sample(page, "lbproxy_backend_scrape_age_seconds", pool="a"),
            }
        finally:
            await proxy.close()
            await backend.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        r = runner.run(scenario())
    assert r["health_clock"] == r["loop"].time  # injected, not time.monotonic
    scraper_loop = r["scraper_loop"]
    assert scraper_loop is not r["loop"] and type(scraper_loop) is type(r["loop"])
    assert r["stamp_ok"] and r["fresh"]
    assert 0 <= r["admin"]["metrics"]["age_s"] < 1
    assert 0 <= r["admin"]["health"]["active"]["last_check_age_s"] < 1
    assert 0 <= r["age"] < 1
