"""The host's /metrics under `serve --workers`: every worker's counters, never going back."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.replicas.worker_metrics import WorkerMetrics


def _served(metrics: WorkerMetrics, worker: str) -> float:
    text = generate_latest(metrics.host).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lbproxy_test_requests_total" and s.labels.get("worker") == worker:
                return s.value
    raise AssertionError(f"worker {worker}'s counter is missing:\n{text}")


def test_a_counter_never_goes_back_between_scrapes_of_different_workers(
    tmp_path: Path,
) -> None:
    regs = [CollectorRegistry(), CollectorRegistry()]
    counters = [Counter("lbproxy_test_requests", "requests", registry=r) for r in regs]
    workers = [WorkerMetrics(r, tmp_path, i) for i, r in enumerate(regs)]
    for w in workers:
        w.write()  # their periodic write
    counters[0].inc(5)  # worker 0 serves requests after it
    seen = [_served(workers[0], "0"), _served(workers[1], "0"), _served(workers[0], "0")]
    assert seen == [5.0, 5.0, 5.0]  # a scrape of worker 1 does not show an older worker 0
    assert _served(workers[1], "1") == 0.0  # and each worker's own is there once
    counters[1].inc(2)
    assert _served(workers[1], "1") == 2.0 and _served(workers[0], "1") == 2.0
