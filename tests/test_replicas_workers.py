"""`lbproxy serve --workers 2`: real subprocesses over fake backends."""

from __future__ import annotations

import signal
import threading

import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import write_config
from tests.replicas_support import per_worker, post_fresh, until

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


def test_both_workers_serve_and_one_scrape_shows_both(fake_backends, workers) -> None:
    (b0,) = fake_backends(1)
    proc = workers(proxy_config([b0]))
    assert post_fresh(proc.url, 40) == [200] * 40
    assert len(b0.received) == 40

    def both() -> dict[str, float] | None:
        by_worker = per_worker(proc.url, "lbproxy_requests_total")
        return by_worker if len(by_worker) == 2 and sum(by_worker.values()) == 40 else None

    by_worker = until(both)
    assert by_worker is not None, per_worker(proc.url, "lbproxy_requests_total")
    assert all(v > 0 for v in by_worker.values()), by_worker  # both served
    pids = {labels["pid"] for labels, _ in _samples_info(proc.url)}
    assert len(pids) == 2 and str(proc.proc.pid) not in pids


def _samples_info(url: str) -> list[tuple[dict[str, str], float]]:
    from tests.replicas_support import samples

    return samples(url, "lbproxy_worker_info")


def test_sighup_reloads_every_worker(fake_backends, workers, tmp_path) -> None:
    b0, b1 = fake_backends(2)
    proc = workers(proxy_config([b0]))
    write_config(tmp_path / "lbproxy.yaml", proxy_config([b0, b1]))
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_count(r"config reloaded from", 2, 15)

    def backends_per_worker() -> dict[str, set[str]] | None:
        from tests.replicas_support import samples

        seen: dict[str, set[str]] = {}
        for labels, _ in samples(proc.url, "lbproxy_backend_healthy"):
            seen.setdefault(labels["worker"], set()).add(labels["backend"])
        return seen if seen and all(v == {"be0", "be1"} for v in seen.values()) else None

    seen = until(backends_per_worker)
    assert seen is not None and len(seen) == 2, seen
    assert post_fresh(proc.url, 8) == [200] * 8
    assert b1.received  # the new backend serves


def test_sigterm_drains_every_worker(fake_backends, workers) -> None:
    (b0,) = fake_backends(1, stall_before_headers=3.0)
    proc = workers(proxy_config([b0], shutdown_grace=20))
    statuses: list[int] = []

    def post() -> None:
        statuses.extend(post_fresh(proc.url, 1))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for t in threads:
        t.start()

    def both_busy() -> dict[str, float] | None:
        busy = per_worker(proc.url, "lbproxy_in_flight_requests")
        return busy if len(busy) == 2 and all(v > 0 for v in busy.values()) else None

    assert until(both_busy, 2.5) is not None, "the 10 connections did not reach both workers"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    for t in threads:
        t.join(10)
    assert statuses == [200] * 10
    assert proc.count(r"SIGTERM: shutting down; [1-9]\d* requests in flight") == 2


def test_workers_without_redis_split_each_backend_limit(fake_backends, workers) -> None:
    (b0,) = fake_backends(1)
    proc = workers(proxy_config([b0], flow_control={"limit": {"type": "fixed", "initial": 4}}))

    def limits() -> dict[str, float] | None:
        by_worker = per_worker(proc.url, "lbproxy_backend_concurrency_limit")
        return by_worker if len(by_worker) == 2 else None

    assert until(limits) == {"0": 2.0, "1": 2.0}  # 4 / 2 workers each
