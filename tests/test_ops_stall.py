"""Stall detection: a backend whose /health answers but whose inference does not is
ejected by the first bytes it fails to send, and comes back by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from lbproxy.config import parse_config
from lbproxy.proxy.app import start_proxy
from lbproxy.routing.state import Endpoint, MetricsSnapshot
from lbproxy.signals.health import HealthChecker
from tests.fake_backend import FakeBackend
from tests.test_obs_metrics import Scrape

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


@dataclass
class HungBackend(FakeBackend):
    """/health answers 200; POSTs get no answer at all until `recovered` is set."""

    recovered: asyncio.Event = field(default_factory=asyncio.Event)
    answered_after_recovery: int = 0
    posted: list[float] = field(default_factory=list)  # monotonic times

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _post(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.posted.append(time.monotonic())
        await self.recovered.wait()
        self.answered_after_recovery += 1
        return await super()._post(request)


@dataclass
class Shot:
    started: float
    status: int = 0  # 0: the client gave up
    backend: str = ""
    ended: float = 0.0


async def _shoot(http: aiohttp.ClientSession, url: str, timeout: float, body: Any) -> Shot:
    shot = Shot(time.monotonic())
    try:
        async with http.post(
            url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            await r.read()
            shot.status, shot.backend = r.status, r.headers.get("x-lbproxy-backend", "")
    except (TimeoutError, aiohttp.ClientError):
        pass
    shot.ended = time.monotonic()
    return shot


async def _load(url: str, n: int, gap: float, timeout: float, body: Any) -> list[Shot]:
    """`n` requests, one every `gap` seconds, each given up after `timeout`."""
    async with aiohttp.ClientSession() as http:
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(_shoot(http, url, timeout, body)))
            await asyncio.sleep(gap)
        return list(await asyncio.gather(*tasks))


async def _metrics(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        return Scrape(await r.text())


def _cfg(urls: list[str], model: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [
            {
                "name": "main",
                "models": [model],
                "routing": "round-robin",
                "backends": [{"url": u, "name": f"be{i}"} for i, u in enumerate(urls)],
            }
        ],
        "expose_backend_header": True,
    }
    cfg.update(over)
    return cfg


def test_hung_inference_is_ejected_and_recovers(loop_thread, tmp_path: Path) -> None:
    log_path = tmp_path / "access.jsonl"

    async def scenario() -> dict[str, Any]:
        good = await FakeBackend(name="good").start()
        hung = await HungBackend(name="hung").start()
        cfg = _cfg(
            [good.url, hung.url],
            "fake-model",
            health={"interval": 0.5, "stall_after": 4.0, "open_seconds": 2.0},
            access_log={"enabled": True, "path": str(log_path)},
        )
        proxy = await start_proxy(parse_config(cfg, "test"), seed=0)
        try:
            # 80 requests over 10 s, each given up after 3 s (as a hurried client would).
            shots = await _load(proxy.url, 80, 0.125, 3.0, BODY)
            m = await _metrics(proxy.url)
            hung.recovered.set()
            t_recovered = time.monotonic()
            back_at = None
            async with aiohttp.ClientSession() as http:
                while time.monotonic() - t_recovered < 20:
                    s = await _shoot(http, proxy.url, 5.0, BODY)
                    if s.backend == "be1" and s.status == 200:
                        back_at = time.monotonic() - t_recovered
                        break
                    await asyncio.sleep(0.1)
            return {"shots": shots, "metrics": m, "back_at": back_at, "posted": hung.posted}
        finally:
            await proxy.close()
            await good.close()
            await hung.close()

    r = loop_thread.run(scenario(), timeout=90)
    shots: list[Shot] = r["shots"]
    t0 = shots[0].started
    early_failures = [s for s in shots if s.status != 200]
    assert early_failures, "the hung backend never held a request: the test proved nothing"
    # The last 24, from 7 s on: stalled from ~0.1 s, overdue (stall_after) at ~4 s, out of
    # rotation by ~5 s; then a half-open probe every ~2.4 s (at most 2 in these 3 s).
    late = [s for s in shots if s.started - t0 >= 7.0]
    assert len(late) >= 15
    # Out of rotation: without ejection every other one would go to it and be lost; now only
    # a half-open probe (one per open_seconds) may, and its client may give up on it.
    to_hung = [t for t in r["posted"] if t - t0 >= 7.0 and t <= shots[-1].started]
    assert len(to_hung) <= 2, [round(t - t0, 2) for t in r["posted"]]
    lost = [s for s in late if s.status != 200]
    assert len(lost) <= len(to_hung), [(round(s.started - t0, 2), s.status) for s in late]
    m: Scrape = r["metrics"]
    assert m.value("lbproxy_backend_ejections_total", backend="be1", reason="stall") >= 1
    assert m.value("lbproxy_client_disconnects_before_first_byte_total", backend="be1") >= 3
    assert m.value("lbproxy_requests_total", backend="be1", status="499") >= 3
    # back in service by itself once it answers
    assert r["back_at"] is not None and r["back_at"] < 15
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]  # closed: flushed
    abandoned = [x for x in lines if x["backend"] == "be1" and x["outcome"] == "client_disconnect"]
    assert len(abandoned) >= 3 and all(x["status"] == 499 for x in abandoned)


# ---- a real backend process, stopped and continued -----------------------------------------


async def _until_served_by(url: str, backend: str, body: Any, within: float = 20.0) -> list[Shot]:
    """One request every 0.2 s until `backend` has answered one (at most `within` s), then
    ten more: what clients see while it comes back into rotation, and after."""
    shots: list[Shot] = []
    give_up = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < give_up:
            shots.append(await _shoot(http, url, 30.0, body))
            if any(s.backend == backend and s.status == 200 for s in shots):
                break
            await asyncio.sleep(0.2)
        for _ in range(10):
            shots.append(await _shoot(http, url, 30.0, body))
    return shots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_sim(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lbproxy.cli", "sim", "--port", str(port), "--profile", "vendor-a",
         "--model", "m", "--speed", "20", "--loop", "asyncio"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_stopped_backend_process_is_ejected_and_returns(loop_thread) -> None:
    ports = [_free_port(), _free_port()]
    procs = [_start_sim(p) for p in ports]
    try:
        for proc in procs:
            assert proc.stdout is not None and "on http://" in proc.stdout.readline()
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}

        async def scenario() -> dict[str, Any]:
            cfg = _cfg(
                [f"http://127.0.0.1:{p}" for p in ports],
                "m",
                # Active checks off: the stopped process must be caught on the data path.
                health={"active": False, "stall_after": 2.0, "open_seconds": 4.0},
            )
            proxy = await start_proxy(parse_config(cfg, "test"), seed=0)
            try:
                warm = await _load(proxy.url, 6, 0.05, 10.0, body)
                assert all(s.status == 200 for s in warm)
                procs[1].send_signal(signal.SIGSTOP)
                t_stop = time.monotonic()
                stopped = asyncio.create_task(_load(proxy.url, 40, 0.2, 30.0, body))
                await asyncio.sleep(8.0)
                procs[1].send_signal(signal.SIGCONT)
                t_cont = time.monotonic()
                during = await stopped
                after = await _until_served_by(proxy.url, "be1", body)
                return {"during": during, "after": after, "t_stop": t_stop, "t_cont": t_cont}
            finally:
                procs[1].send_signal(signal.SIGCONT)
                await proxy.close()

        r = loop_thread.run(scenario(), timeout=120)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
    during: list[Shot] = r["during"]
    assert all(s.status == 200 for s in during)  # held, never lost
    window = [s for s in during if r["t_stop"] + 3.5 <= s.started <= r["t_cont"]]
    assert len(window) >= 15  # ~22
    # Held (on the stopped process, or waiting to connect to it): only a half-open probe,
    # one per open_seconds + stall time, may be; not every other request. (Without the
    # ejection, be1's share of those sent from 3.5 s to 6 s, before its concurrency limit
    # is full, would wait until SIGCONT: over 2 s. An answer takes ~20 ms.)
    held = [s for s in window if s.ended - s.started > 2.0]
    assert len(held) <= 2, [(round(s.started - r["t_stop"], 2), s.backend) for s in held]
    after: list[Shot] = r["after"]
    assert all(s.status == 200 for s in after)
    assert any(s.backend == "be1" for s in after), "never back in rotation after SIGCONT"


# ---- the rules, on a clock of our own -------------------------------------------------------


async def test_stall_rules() -> None:
    ep = Endpoint("gpu-0", "http://127.0.0.1:9", pool="p")
    other = Endpoint("gpu-1", "http://127.0.0.1:9", pool="p")
    async with aiohttp.ClientSession() as session:
        hc = HealthChecker(
            lambda: [ep, other], session, failure_threshold=2, open_seconds=0.2,
            stall_after=10.0, stall_factor=4.0,
        )  # fmt: skip
        for t in range(5):  # quick first bytes: overdue is the floor
            hc.sent(ep, t)
            hc.first_byte(ep, t, t + 0.5)
        assert hc.overdue_after(ep.progress) == 10.0
        hc.sent(ep, 10)
        hc.first_byte(ep, 10, 14)  # a 4 s first byte: 4 x 4 = 16 s now
        assert hc.overdue_after(ep.progress) == 16.0

        hc.sent(ep, 100)
        hc.check_stalls(115)
        assert hc.circuit_state(ep) == "closed"  # waiting, not yet overdue
        # the generation-token counter moving: it works (a long non-streamed answer)
        ep.metrics = MetricsSnapshot(time=110, generation_tokens=50)
        hc.check_stalls(111)
        ep.metrics = MetricsSnapshot(time=112, generation_tokens=80)
        hc.check_stalls(117)
        assert hc.circuit_state(ep) == "closed"
        hc.check_stalls(129)  # 17 s since the tokens last moved
        assert hc.circuit_state(ep) == "open" and not ep.healthy
        assert hc.status(ep)["circuit"]["last_reason"] == "stall"
        assert hc.ejections == {("p", "gpu-0", "stall"): 1}

        # half-open after a stall: one probe, and only its first body byte closes it
        await asyncio.sleep(0.3)
        assert hc.circuit_state(ep) == "half_open" and ep.healthy
        hc.first_byte(ep, 100, 130)  # the old request answers at last: not the probe
        hc.sent(ep, 131)  # the probe
        assert not ep.healthy  # nothing else until it is answered
        hc.record(ep, True)  # its response head: not enough
        assert hc.circuit_state(ep) == "half_open"
        hc.first_byte(ep, 131, 131.2)
        assert hc.circuit_state(ep) == "closed" and ep.healthy

        # clients giving up before the first byte: only overdue ones are evidence
        for t in (200, 210, 220):
            hc.sent(other, t)
            hc.unanswered(other, t, t + 3, abandoned=True)  # a hurried client
        assert hc.circuit_state(other) == "closed"
        for t in (300, 330):
            hc.sent(other, t)
            hc.unanswered(other, t, t + 20, abandoned=True)  # 20 s > 10 s overdue
        assert hc.circuit_state(other) == "open"
        assert hc.ejections[("p", "gpu-1", "failures")] == 1
        await hc.stop()
