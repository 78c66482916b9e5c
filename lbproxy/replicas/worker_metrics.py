"""`/metrics` of a `serve --workers N` host: one scrape shows every worker.

Per-worker labels, not prometheus-client's multiprocess mode: lbproxy's metrics are
rendered by a custom collector from plain in-process counters (metrics.py), which that
mode (mmap'd files behind prometheus-client's own Counter objects) cannot aggregate.
Each worker writes its own exposition to `<workers dir>/metrics-<i>-<pid>.prom` every
WRITE_INTERVAL, and the worker that takes a scrape serves its own metrics (live) with
the others' (at most WRITE_INTERVAL old), every sample labelled `worker="<i>"`: sum by
anything but `worker` for the host. `lbproxy_worker_info{worker, pid}` lists the workers.
Files older than STALE_AFTER (a worker that died) are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("lbproxy")

WRITE_INTERVAL = 1.0
STALE_AFTER = 10.0


class _WorkerInfo:
    def __init__(self) -> None:
        self.pid = os.getpid()

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "lbproxy_worker_info", "One per worker process of this host", labels=["pid"]
        )
        g.add_metric([str(self.pid)], 1.0)
        yield g


def _labelled(families: Iterator[Metric], worker: str, into: dict[str, Metric]) -> None:
    for fam in families:
        out = into.get(fam.name)
        if out is None:
            out = into[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        out.samples.extend(
            Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
            for s in fam.samples
        )


class HostCollector:
    """This worker's registry (live) and the other workers' last written expositions."""

    def __init__(self, local: CollectorRegistry, directory: Path, index: int) -> None:
        self.local = local
        self.dir = directory
        self.index = index

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        # Its own through the text format too, so that families split alike (`_created`).
        own = generate_latest(self.local).decode()
        _labelled(text_string_to_metric_families(own), str(self.index), merged)
        now = time.time()
        for path in sorted(self.dir.glob("metrics-*.prom")):
            worker = path.name.split("-")[1]
            if worker == str(self.index):
                continue
            try:
                if now - path.stat().st_mtime > STALE_AFTER:
                    continue
                text = path.read_text()
            except OSError:
                continue  # its worker just ended
            try:
                _labelled(text_string_to_metric_families(text), worker, merged)
            except ValueError:
                log.warning("worker metrics: %s does not parse; left out", path.name)
        yield from merged.values()


class WorkerMetrics:
    """Writes this worker's exposition for the others; serves the host's."""

    def __init__(self, local: CollectorRegistry, directory: Path, index: int) -> None:
        local.register(_WorkerInfo())
        self.local = local
        self.path = directory / f"metrics-{index}-{os.getpid()}.prom"
        self.host = CollectorRegistry(auto_describe=False)
        self.host.register(HostCollector(local, directory, index))
        self._task: asyncio.Task[None] | None = None

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(generate_latest(self.local))
        tmp.replace(self.path)  # readers see a whole file

    async def _run(self) -> None:
        while True:
            try:
                self.write()
            except OSError as e:  # the directory went (supervisor ended): nothing to share
                log.debug("worker metrics: %s", e)
            await asyncio.sleep(WRITE_INTERVAL)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.path.unlink(missing_ok=True)
