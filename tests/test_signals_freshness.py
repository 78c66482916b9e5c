"""Signals stay fresh while the proxy's event loop is busy.

Scrapes (timeout 0.4 s) and health checks (timeout 0.4 s) run on the signals thread's loop,
so a proxy loop whose every turn takes 0.5 s must cost neither a scrape timeout nor a
failed health check (0.4 s, not less: the signals thread needs the GIL the spinning loop
holds, and on a busy 2-core machine 0.2 s was sometimes not enough), and snapshots must
keep landing meanwhile. The backend runs on a loop of its own (another thread): only the
proxy's loop is busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import start_proxy
from tests.conftest import LoopThread, proxy_config
from tests.fake_backend import FakeBackend
from tests.test_signals_proxy import sample, vllm_metrics, wait_for

BUSY = 3.0  # seconds the proxy's loop is kept busy


@pytest.fixture
def backend_elsewhere() -> Iterator[FakeBackend]:
    """A fake backend on its own loop thread, untouched by the proxy's loop being busy."""
    lt = LoopThread()
    fb = lt.run(FakeBackend("b0", metrics_text=vllm_metrics(1, 0, 0.1)).start())
    yield fb
    lt.run(fb.close())
    lt.close()


async def _keep_loop_busy(seconds: float, spin: bool) -> None:
    """Keep the running loop busy as a relaying storm does: 100 tasks that each hold it for
    5 ms per turn, so one turn of the loop (and any timer or read) takes 0.5 s."""
    end = time.monotonic() + seconds

    async def hog() -> None:
        while time.monotonic() < end:
            if spin:  # CPU work holds the GIL too
                t = time.perf_counter() + 0.005
                while time.perf_counter() < t:
                    pass
            else:
                time.sleep(0.005)
            await asyncio.sleep(0)

    await asyncio.gather(*(hog() for _ in range(100)))


@pytest.mark.parametrize("spin", [False, True], ids=["sleeping", "spinning"])
def test_scrapes_and_health_checks_do_not_time_out_while_the_loop_is_busy(
    backend_elsewhere: FakeBackend, run_proxy, loop_thread: LoopThread, spin: bool
) -> None:
    cfg = proxy_config(
        [backend_elsewhere],
        signals={"metrics_interval": 0.1, "metrics_timeout": 0.4},
        health={"interval": 0.1, "timeout": 0.4},
    )
    proxy = run_proxy(cfg)
    st = proxy.state
    scraper, health = st.scraper, st.health
    assert scraper is not None and health is not None
    (ep,) = st.pools.endpoints()
    wait_for(lambda: scraper.successes.get(ep, 0) >= 3)
    assert scraper.errors.get(ep, 0) == 0
    successes_before = scraper.successes[ep]

    # The proxy's loop is kept busy from the test's own thread: watch the endpoint from here.
    # Stamps are on the loop clock, time.monotonic() for this (asyncio) loop.
    busy = asyncio.run_coroutine_threadsafe(_keep_loop_busy(BUSY, spin), loop_thread.loop)
    worst_age, unhealthy_seen = 0.0, False
    while not busy.done():
        m = ep.metrics
        assert m is not None
        worst_age = max(worst_age, time.monotonic() - m.time)
        unhealthy_seen = unhealthy_seen or not ep.healthy
        time.sleep(0.02)
    busy.result()
    wait_for(lambda: ep.metrics is not None and time.monotonic() - ep.metrics.time < 0.5)

    assert scraper.errors.get(ep, 0) == 0, scraper.last_error.get(ep)
    # 3 s at 10 scrapes/s: snapshots kept landing while the loop was busy.
    assert scraper.successes[ep] - successes_before >= 10
    assert worst_age < 1.0, worst_age  # 0.5 s turns: a scrape landed during each
    status = health.status(ep)["active"]
    assert status["last_error"] is None and status["up"], status
    assert not unhealthy_seen and ep.healthy
    assert not any(reason == "health_check" for _, _, reason in health.ejections)
    page = httpx.get(proxy.url + "/metrics").text
    labels = {"pool": "main", "backend": "be0"}
    assert sample(page, "lbproxy_backend_scrape_errors_total", **labels) == 0
    assert 0 <= sample(page, "lbproxy_backend_scrape_age_seconds", **labels) < 1.0


def test_the_signals_thread_ends_with_the_proxy(
    backend_elsewhere: FakeBackend, loop_thread: LoopThread
) -> None:
    cfg = parse_config(proxy_config([backend_elsewhere]), "test-config")
    proxy = loop_thread.run(start_proxy(cfg, seed=0))
    signals = proxy.state.signals_thread
    assert signals is not None and signals._thread is not None
    thread, loop = signals._thread, signals.loop
    assert thread.is_alive() and loop is not None
    (ep,) = proxy.state.pools.endpoints()
    wait_for(lambda: ep.metrics is not None)
    loop_thread.run(proxy.close())
    assert not thread.is_alive() and loop.is_closed()
    assert signals.session is None and signals.loop is None
