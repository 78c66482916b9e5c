"""Flow control across replicas: each live replica takes its share of every backend's
concurrency limit.

Each replica beats every `state.heartbeat` seconds into a Redis sorted set
(`<key_prefix>:replicas`, member = replica id, score = time); members older than three
beats are dropped, and the set's size is the number of live replicas n. One pipelined
round trip per beat, in the background: nothing on the request path. Each flow gate then
lets this replica keep at most ceil(limit x 1/n) requests in flight on a backend, where
limit is what flow control would allow a single lbproxy (the adaptive limiter learns it
from the backend's own running count and latency, which include every replica's
requests, so it is the backend's total). A replica that stops beating (killed) drops out
of n within three beats, and the others' shares grow back.

Redis unreachable: the last known n stays (the other replicas most likely still run).

`serve --workers N` without `state.redis`: each worker takes 1/N of each limit
(`StaticShare`), so that N flow controllers do not each fill a backend to its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from lbproxy.replicas.shared_state import SharedState

log = logging.getLogger("lbproxy.shared_state")


def install_share(pools: Any, share: float) -> None:
    """Cap each flow gate's limits at `share` of what one lbproxy would allow."""
    for pool in pools.pools:
        if pool.gate is not None:
            pool.gate.controller.share = share


class StaticShare:
    """1/n of every limit, n fixed (the workers of one host without Redis)."""

    def __init__(self, n: int, pools: Callable[[], Any]) -> None:
        self.share = 1.0 / n
        self.pools = pools
        self._table: Any = None

    def before_route(self) -> None:
        """Cheap: only a reload's new table needs installing."""
        table = self.pools()
        if table is not self._table:
            self._table = table
            install_share(table, self.share)


class FlowShare:
    def __init__(self, shared: SharedState, pools: Callable[[], Any]) -> None:
        self.shared = shared
        self.pools = pools
        self.key = f"{shared.settings.key_prefix}:replicas"
        self.interval = shared.settings.heartbeat
        self.live = 1
        self.share = 1.0
        self._task: asyncio.Task[None] | None = None

    def _install(self) -> None:
        install_share(self.pools(), self.share)

    async def beat(self) -> None:
        r = self.shared.redis
        now = time.time()
        pipe = r.pipeline(transaction=False)
        pipe.zadd(self.key, {self.shared.replica: now})
        pipe.zremrangebyscore(self.key, "-inf", now - 3 * self.interval)
        pipe.zcard(self.key)
        try:
            live = max(1, int((await pipe.execute())[-1]))
        except Exception as e:  # any failure: keep the last known count
            self.shared._failed("heartbeat", e)
            return
        self.shared._ok()
        grew = live < self.live
        if live != self.live:
            log.info("flow control: %d live replicas; this one takes 1/%d of limits", live, live)
            self.live, self.share = live, 1.0 / live
        self._install()  # (also the gates of a table a reload built since the last beat)
        if grew:  # more room here: whoever waits may go
            for pool in self.pools().pools:
                if pool.gate is not None:
                    pool.gate.wake()

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.shared.redis.zrem(self.key, self.shared.replica), 1.0)
