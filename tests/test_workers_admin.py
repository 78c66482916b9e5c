"""The admin API under `lbproxy serve --workers 2` acts on the whole host (issue 14): real
supervisor and worker subprocesses over fake backends, every request on a fresh
connection (the kernel spreads connections, not requests, over the workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from lbproxy.replicas.workers import RESTART_AFTER
from tests.conftest import proxy_config
from tests.fake_backend import FakeBackend
from tests.ops_helpers import admin_headers, write_config
from tests.replicas_support import Serve, post_fresh, samples, until

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
ADMIN = {"token": "admin-secret"}


def _admin(url: str, method: str, path: str, timeout: float = 30) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=timeout) as c:
        return c.request(method, path, headers=admin_headers())


def _statuses(answer: dict[str, Any]) -> dict[int, str]:
    return {w["worker"]: w["status"] for w in answer["workers"]}


def _worker_pids(url: str) -> set[int]:
    return {int(labels["pid"]) for labels, _ in samples(url, "lbproxy_worker_info")}


def _be0_flags(url: str) -> dict[str, bool]:
    """be0's draining flag in each worker, as GET /admin/backends shows them."""
    data = _admin(url, "GET", "/admin/backends").json()["data"]
    be0 = next(b for b in data if b["name"] == "be0")
    return {w: v["draining"] for w, v in be0.get("workers", {}).items()}


def test_a_stopped_worker_is_named_within_the_deadline_and_catches_up(
    fake_backends, workers
) -> None:
    b0, b1 = fake_backends(2)
    proc = workers(proxy_config([b0, b1], admin=ADMIN))
    # Keep-alive connections until one is served by each worker: one to stop, one to ask.
    by_pid: dict[int, httpx.Client] = {}
    for _ in range(40):
        c = httpx.Client(base_url=proc.url, timeout=30, headers=admin_headers())
        pid = c.get("/admin/backends").json()["answered_by"]["pid"]
        if pid in by_pid:
            c.close()
        else:
            by_pid[pid] = c
        if len(by_pid) == 2:
            break
    assert len(by_pid) == 2, "40 connections all reached one worker"
    stopped, asking = sorted(by_pid)
    os.kill(stopped, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        answer = by_pid[asking].post("/admin/backends/be0/drain", timeout=10)
        assert time.monotonic() - t0 < 8  # the 2 s deadline, with a margin: no hang
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["error"]["code"] == "workers_not_confirmed"
        assert f"pid {stopped}" in body["error"]["message"]
        statuses = {w["pid"]: w["status"] for w in body["workers"]}
        assert statuses == {stopped: "not_confirmed", asking: "confirmed"}
    finally:
        os.kill(stopped, signal.SIGCONT)
        for c in by_pid.values():
            c.close()
    # The stopped worker applies the recorded drain once it runs again.
    assert until(lambda: _be0_flags(proc.url) == {"0": True, "1": True}, 10)
    before = len(b0.received)
    assert post_fresh(proc.url, 20) == [200] * 20
    assert len(b0.received) == before


def test_reload_via_the_admin_api_reloads_every_worker(fake_backends, workers, tmp_path) -> None:
    b0, b1 = fake_backends(2)
    proc = workers(proxy_config([b0], admin=ADMIN))
    assert post_fresh(proc.url, 4) == [200] * 4
    (tmp_path / "lbproxy.yaml").write_text("pools: [")  # invalid: refused, nothing else
    r = _admin(proc.url, "POST", "/admin/reload")
    assert r.status_code == 400 and "lbproxy.yaml" in r.json()["error"]["message"], r.text
    write_config(tmp_path / "lbproxy.yaml", proxy_config([b1], admin=ADMIN))  # be0 moves

    r = _admin(proc.url, "POST", "/admin/reload")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "reloaded"
    assert _statuses(answer) == {0: "confirmed", 1: "confirmed"}
    assert {w["reload"]["status"] for w in answer["workers"]} == {"reloaded"}
    before = len(b0.received)
    assert post_fresh(proc.url, 24) == [200] * 24  # at once: no wait after the answer
    assert len(b0.received) == before, "a worker still routes by the old config"
    assert len(b1.received) == 24
    assert proc.count("not reloaded") == 1  # the invalid file reached no other worker
    assert proc.count(r"config reloaded from") == 2


@dataclass
class HeldBackend(FakeBackend):
    """Holds every POST until `release` is set (30 s at most), then answers it."""

    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), 30)
        return await super()._answer(request)


def test_get_backends_sums_in_flight_over_the_workers(loop_thread, workers) -> None:
    # Held until both workers' figures (rewritten every second) show all 10 connections,
    # however long a busy machine takes to get there; then let go at once.
    b0 = loop_thread.run(HeldBackend(name="b0").start())
    try:
        proc = workers(proxy_config([b0], admin=ADMIN))
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda: statuses.extend(post_fresh(proc.url, 1)))
            for _ in range(10)
        ]
        for t in threads:
            t.start()

        def all_held() -> dict[str, Any] | None:
            be0 = _admin(proc.url, "GET", "/admin/backends").json()["data"][0]
            per = be0.get("workers", {})
            if (
                be0["in_flight"] == 10
                and len(per) == 2
                and all(w["in_flight"] for w in per.values())
            ):
                return be0
            return None

        be0 = until(all_held, 12.0)
        assert be0 is not None, _admin(proc.url, "GET", "/admin/backends").text
        assert sum(w["in_flight"] for w in be0["workers"].values()) == 10
        assert all(w["age_s"] < 5 and w["draining"] is False for w in be0["workers"].values())
        assert b0.active == 10  # all still held
    finally:
        loop_thread.loop.call_soon_threadsafe(b0.release.set)
    for t in threads:
        t.join(30)
    assert statuses == [200] * 10
    loop_thread.run(b0.close())


@dataclass
class DrainHost:
    proc: Serve
    b0: FakeBackend
    b1: FakeBackend
    started: float


@pytest.fixture(scope="module", autouse=True)
def drain_host(loop_thread, tmp_path_factory) -> Iterator[DrainHost]:
    """The host of the drain test (the module's last), started with the module: the
    supervisor restarts only a worker that has run RESTART_AFTER (10 s), and the module's
    other tests run meanwhile instead of the drain test sleeping that long."""
    b0 = loop_thread.run(FakeBackend(name="b0").start())
    b1 = loop_thread.run(FakeBackend(name="b1").start())
    started = time.monotonic()
    path = write_config(tmp_path_factory.mktemp("drain") / "lbproxy.yaml",
                        proxy_config([b0, b1], admin=ADMIN))  # fmt: skip
    proc = Serve(path, "--workers", "2", listening=2)
    try:
        yield DrainHost(proc, b0, b1, started)
    finally:
        proc.stop()
        loop_thread.run(b0.close())
        loop_thread.run(b1.close())


def test_drain_reaches_every_worker_and_a_restarted_worker(drain_host: DrainHost) -> None:
    proc, b0, started = drain_host.proc, drain_host.b0, drain_host.started
    assert post_fresh(proc.url, 10) == [200] * 10
    assert b0.received, "be0 serves before the drain"

    r = _admin(proc.url, "POST", "/admin/backends/be0/drain")
    assert r.status_code == 200, r.text
    assert r.json()["draining"] is True
    assert _statuses(r.json()) == {0: "confirmed", 1: "confirmed"}
    before = len(b0.received)
    assert post_fresh(proc.url, 30) == [200] * 30
    assert len(b0.received) == before, "a worker still sends requests to the drained backend"

    # A worker killed (after RESTART_AFTER, so that the supervisor restarts it) comes back
    # with the host's drain set in force.
    time.sleep(max(0.0, started + RESTART_AFTER + 2 - time.monotonic()))
    old = _worker_pids(proc.url)
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    proc.wait_for(rf"worker \d \(pid {victim}\) exited with -9; restarting it", 15)
    proc.wait_count(r"lbproxy listening on http://", 3, 60)
    assert until(lambda: len(_worker_pids(proc.url) - old) == 1)
    lines = list(proc.lines)  # the new worker applied the drain before it listened
    third_listen = [i for i, x in enumerate(lines) if "lbproxy listening on http://" in x][2]
    assert sum("backend be0 (pool main) draining" in x for x in lines[:third_listen]) == 3
    assert post_fresh(proc.url, 30) == [200] * 30
    assert len(b0.received) == before, "the restarted worker sends requests to be0"
    assert until(lambda: _be0_flags(proc.url) == {"0": True, "1": True})

    r = _admin(proc.url, "POST", "/admin/backends/be0/undrain")
    assert r.status_code == 200, r.text
    assert _statuses(r.json()) == {0: "confirmed", 1: "confirmed"}
    assert until(lambda: _be0_flags(proc.url) == {"0": False, "1": False})
    assert post_fresh(proc.url, 10) == [200] * 10
    assert len(b0.received) > before  # back in service
