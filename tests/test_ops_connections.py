"""Upstream connections: after a burst, the idle ones are closed within
`timeouts.upstream_keepalive`, even while the backend is scraped many times a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tests.conftest import proxy_config
from tests.fake_backend import FakeBackend

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
METRICS = 'vllm:num_requests_running{engine="0"} 0\nvllm:num_requests_waiting{engine="0"} 0\n'
KEEPALIVE = 2.0


def open_connections(backend: FakeBackend) -> int:
    """TCP connections the backend holds open now (its server's live protocol objects)."""
    assert backend.runner is not None and backend.runner.server is not None
    return len(backend.runner.server.connections)


def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until `cond()` held; fails after `timeout`."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - start


async def _burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json=BODY) for _ in range(n))
        )
    return [r.status_code for r in answers]


def test_idle_connections_of_a_burst_are_released(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, stall_before_headers=0.5, metrics_text=METRICS)
    cfg = proxy_config(
        [backend],
        timeouts={"upstream_keepalive": KEEPALIVE},
        # Scraped 50 times a second: through the request pool, the scrapes would take its
        # oldest idle connection each time and keep all 50 of the burst warm.
        signals={"metrics_interval": 0.02, "metrics_timeout": 2.0},
        flow_control={"enabled": False},  # all 50 at once, each on its own connection
    )
    proxy = run_proxy(cfg)
    wait_for(lambda: backend.metrics_served.get(200, 0) > 0, 10)

    assert asyncio.run(_burst(proxy.url, 50)) == [200] * 50
    assert backend.max_active >= 40
    assert open_connections(backend) >= 40  # idle now, still open: the test proves something
    scrapes_before = backend.metrics_served[200]

    # aiohttp's connector closes what has been idle for `keepalive` every `keepalive`
    # seconds: 2 x keepalive, plus a margin for a busy machine.
    wait_for(lambda: open_connections(backend) <= 3, 2 * KEEPALIVE + 8)
    assert backend.metrics_served[200] - scrapes_before >= 20  # scrapes went on meanwhile

    # The pool still works: a new request opens a connection again.
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, timeout=30)
    assert r.status_code == 200
