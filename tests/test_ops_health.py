"""Active health checks and the passive circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import httpx
import pytest
from aiohttp import web

from lbproxy.routing.state import Endpoint
from lbproxy.signals.health import HealthChecker
from tests.conftest import proxy_config

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
INTERVAL = 0.5


def _send(url: str, n: int) -> list[int]:
    with httpx.Client(base_url=url, timeout=10) as c:
        return [c.post("/v1/completions", json=BODY).status_code for _ in range(n)]


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_down_backend_gets_nothing_within_one_interval_and_returns(
    fake_backends, run_proxy
) -> None:
    b0, b1 = fake_backends(2)
    # A long open_seconds: the active checks alone must do it.
    cfg = proxy_config([b0, b1], health={"interval": INTERVAL, "timeout": 0.5, "open_seconds": 60})
    proxy = run_proxy(cfg)
    assert _send(proxy.url, 4) == [200] * 4
    assert len(b1.received) == 2

    b1.fail_status = 503  # /health too
    time.sleep(INTERVAL + 0.3)  # one interval, plus a check's worth of margin
    before = len(b1.received)
    assert _send(proxy.url, 10) == [200] * 10
    assert len(b1.received) == before  # not even tried: ejected
    assert proxy.state.forwarder is not None and proxy.state.forwarder.retries == 0

    b1.fail_status = None
    time.sleep(INTERVAL + 0.3)
    assert _send(proxy.url, 10) == [200] * 10
    assert len(b1.received) == before + 5  # back in the rotation by itself


def test_killed_backend_is_ejected_at_the_next_check(fake_backends, run_proxy, loop_thread):
    b0, b1 = fake_backends(2)
    proxy = run_proxy(proxy_config([b0, b1], health={"interval": INTERVAL, "active": True}))
    loop_thread.run(b1.close())  # connection refused from now on
    # Within a check or two; the margin is for a busy 2-core machine (2 intervals failed
    # about 1 run in 5 there, with one core taken by a benchmark).
    assert _wait_for(lambda: not proxy.state.pools.pools[0].endpoints[1].healthy, 6 * INTERVAL)
    assert _send(proxy.url, 6) == [200] * 6
    assert proxy.state.forwarder is not None and proxy.state.forwarder.retries == 0


async def test_a_timeout_ejects_only_after_unhealthy_after_checks() -> None:
    slow = asyncio.Event()
    let_go = asyncio.Event()  # set at the end: the runner's cleanup waits for its handlers

    async def health(request: web.Request) -> web.Response:
        if slow.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(let_go.wait(), 5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ep = Endpoint("slow", f"http://127.0.0.1:{runner.addresses[0][1]}")
    async with aiohttp.ClientSession() as session:
        hc = HealthChecker(lambda: [ep], session, timeout=0.2, unhealthy_after=3)
        assert await hc.check(ep) and ep.healthy
        slow.set()
        for expected in (True, True, False):  # ambiguous: the third timeout ejects
            assert not await hc.check(ep)
            assert ep.healthy is expected
        slow.clear()
        assert await hc.check(ep) and ep.healthy  # healthy_after=1
        await hc.stop()
    let_go.set()
    await runner.cleanup()


async def test_circuit_breaker_state_machine() -> None:
    ep = Endpoint("e", "http://127.0.0.1:9")
    async with aiohttp.ClientSession() as session:
        hc = HealthChecker(lambda: [ep], session, failure_threshold=3, open_seconds=0.2)
        for ok in (False, False, True, False, False):  # a success resets the count
            hc.record(ep, ok)
        assert ep.healthy and hc.circuit_state(ep) == "closed"
        hc.record(ep, False)
        assert not ep.healthy and hc.circuit_state(ep) == "open"
        hc.record(ep, True)  # a request sent before it opened: ignored
        assert hc.circuit_state(ep) == "open"
        await asyncio.sleep(0.3)
        assert ep.healthy and hc.circuit_state(ep) == "half_open"
        hc.record(ep, False)  # the probe failed: open again at once
        assert not ep.healthy and hc.circuit_state(ep) == "open"
        await asyncio.sleep(0.3)
        hc.record(ep, True)  # the probe succeeded
        assert ep.healthy and hc.circuit_state(ep) == "closed"
        # the active verdict and the circuit combine: both must allow
        hc._checked(ep, False, "HTTP 500")
        assert not ep.healthy
        hc._checked(ep, True, "")
        assert ep.healthy
        assert hc.status(ep)["circuit"]["times_opened"] == 2
        await hc.stop()


@pytest.mark.parametrize("failure", ["status_503", "connection_refused"])
def test_circuit_opens_on_failed_requests_and_recovers(
    fake_backends, run_proxy, loop_thread, failure
) -> None:
    b0, b1 = fake_backends(2)
    # Active checks off: only real requests can open the circuit.
    cfg = proxy_config(
        [b0, b1], health={"active": False, "failure_threshold": 3, "open_seconds": 1.0}
    )
    if failure == "connection_refused":
        loop_thread.run(b1.close())
    else:
        b1.fail_status = 503
    proxy = run_proxy(cfg)
    ep1 = proxy.state.pools.pools[0].endpoints[1]
    assert _send(proxy.url, 12) == [200] * 12  # every failure was retried on be0
    fw = proxy.state.forwarder
    assert fw is not None and fw.retries == 3  # be1 tried exactly failure_threshold times
    assert not ep1.healthy
    health = proxy.state.health
    assert health is not None and health.circuit_state(ep1) == "open"

    # still broken when it half-opens: one probe, then open again
    assert _wait_for(lambda: health.circuit_state(ep1) == "half_open", 3.0)
    assert _send(proxy.url, 6) == [200] * 6
    assert fw.retries == 4 and health.circuit_state(ep1) == "open"

    if failure == "connection_refused":
        return  # nothing listens there any more; a restart is test_killed_backend_...
    b1.fail_status = None  # recovered
    assert _wait_for(lambda: health.circuit_state(ep1) == "half_open", 3.0)
    n = len(b1.received)
    assert _send(proxy.url, 6) == [200] * 6
    assert health.circuit_state(ep1) == "closed"
    assert len(b1.received) == n + 3  # back in the rotation


# ---- the on_change hook ----------------------------------------------------------------------


async def test_on_change_follows_active_checks() -> None:
    status = {"code": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ep = Endpoint("gpu-0", f"http://127.0.0.1:{runner.addresses[0][1]}", pool="p")
    seen: list[tuple[Endpoint, bool]] = []
    async with aiohttp.ClientSession() as session:
        hc = HealthChecker(
            lambda: [ep], session, healthy_after=2, on_change=lambda e: seen.append((e, e.healthy))
        )
        assert await hc.check(ep)
        assert seen == []  # still up: nothing changed
        status["code"] = 503
        assert not await hc.check(ep) and not await hc.check(ep)
        assert seen == [(ep, False)]  # one call, when it went down
        status["code"] = 200
        assert await hc.check(ep)
        assert seen == [(ep, False)]  # healthy_after=2: not yet
        assert await hc.check(ep)
        assert seen == [(ep, False), (ep, True)]
        await hc.stop()
    await runner.cleanup()


def test_on_change_follows_the_circuit(fake_backends, run_proxy, loop_thread) -> None:
    b0, b1 = fake_backends(2)
    b1.fail_status = 503
    cfg = proxy_config(
        [b0, b1], health={"active": False, "failure_threshold": 2, "open_seconds": 0.5}
    )
    proxy = run_proxy(cfg)
    health = proxy.state.health
    assert health is not None
    ep1 = proxy.state.pools.pools[0].endpoints[1]
    seen: list[tuple[str, bool, str]] = []
    # Called on the proxy's loop thread (the forwarder, the circuit timer); list.append is safe.
    health.on_change = lambda ep: seen.append((ep.name, ep.healthy, health.circuit_state(ep)))

    assert _send(proxy.url, 4) == [200] * 4  # be1 fails twice: the circuit opens
    assert seen == [("be1", False, "open")]
    assert _wait_for(lambda: len(seen) == 2, 3.0)
    assert seen[1] == ("be1", True, "half_open")  # routable again, on the timer
    b1.fail_status = None
    n = len(b1.received)
    assert _send(proxy.url, 2) == [200] * 2  # the probe succeeds: closed
    assert len(b1.received) == n + 1
    assert seen[2:] == [("be1", True, "closed")]
    assert ep1.healthy and health.circuit_state(ep1) == "closed"
    assert _send(proxy.url, 4) == [200] * 4
    assert len(seen) == 3  # steady state: no calls


async def test_a_failing_on_change_hook_never_breaks_the_breaker(caplog) -> None:
    ep = Endpoint("gpu-0", "http://127.0.0.1:9", pool="p")
    calls: list[bool] = []

    def broken(e: Endpoint) -> None:
        calls.append(e.healthy)
        raise RuntimeError("hook bug")

    async with aiohttp.ClientSession() as session:
        hc = HealthChecker(
            lambda: [ep], session, failure_threshold=1, open_seconds=0.1, on_change=broken
        )
        with caplog.at_level("ERROR", logger="lbproxy.health"):
            hc.record(ep, False)  # the forwarder's call: must not raise
            assert not ep.healthy and hc.circuit_state(ep) == "open"
            await asyncio.sleep(0.2)
            assert ep.healthy and hc.circuit_state(ep) == "half_open"
            hc.record(ep, True)
            assert hc.circuit_state(ep) == "closed"
        await hc.stop()
    assert calls == [False, True, True]
    failures = [r for r in caplog.records if "on_change hook failed for p/gpu-0" in r.getMessage()]
    assert len(failures) == 3
