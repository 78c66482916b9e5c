"""`/metrics` of a `serve --workers N` host: one scrape shows every worker.

Per-worker labels, not prometheus-client's multiprocess mode: lbproxy's metrics are
rendered by a custom collector from plain in-process counters (metrics.py), which that
mode (mmap'd files behind prometheus-client's own Counter objects) cannot aggregate.
Each worker writes its own exposition to `<workers dir>/metrics-<i>-<pid>.prom` every
WRITE_INTERVAL; the worker that takes a scrape first writes its own file afresh, then
serves every worker's file (the others' at most WRITE_INTERVAL old), every sample
labelled `worker="<i>"`: sum by anything but `worker` for the host. Serving its own
metrics live instead would let a counter go backwards between two scrapes that land on
different workers (live, then another worker's older copy), which Prometheus reads as a
counter reset. `lbproxy_worker_info{worker, pid}` lists the workers.
Files older than STALE_AFTER (a worker that died) are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
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
    """Every worker's last written exposition, this worker's written afresh first."""

    def __init__(
        self,
        local: CollectorRegistry,
        directory: Path,
        index: int,
        own_path: Path,
        write: Callable[[], None],
    ) -> None:
        self.local = local
        self.dir = directory
        self.index = index
        self.own_path = own_path
        self.write = write

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        try:
            self.write()
            own_written = True
        except OSError:  # no directory to write to: serve its own live
            own_written = False
            own = generate_latest(self.local).decode()
            _labelled(text_string_to_metric_families(own), str(self.index), merged)
        now = time.time()
        for path in sorted(self.dir.glob("metrics-*.prom")):
            worker = path.name.split("-")[1]
            if worker == str(self.index) and not (own_written and path == self.own_path):
                continue  # (or an earlier process of this worker index)
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
        self.host.register(HostCollector(local, directory, index, self.path, self.write))
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
