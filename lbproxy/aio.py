"""Background-task helpers shared by every long-running component.

`cancel_and_wait(*tasks)` is the one way a component stops its tasks: cancel them all
first, then wait for each to end. `PeriodicTask` is a loop that calls a function every
`interval()` seconds until it is stopped (health checks, model discovery, the access-log
flusher, the dashboard sampler). `loop_time()` reads the clock routing's `now` comes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PeriodicTask", "cancel_and_wait", "loop_time"]


def loop_time() -> float:
    """The running event loop's `time()`, else `time.monotonic()`.

    The proxy routes with `loop.time()` and uvloop's clock is not `time.monotonic()`, so
    every stamp compared with routing's `now` (metrics snapshots, health) must come from
    the loop; the fallback only serves code running outside any loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel every task (None is skipped), then wait for each to end.

    Their cancellation is swallowed; any other exception a task ends with propagates."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError):
            await t


class PeriodicTask:
    """Calls `tick()` every `interval()` seconds in a background task, until `stop()`.

    `tick` may be a plain or a coroutine function; an exception it raises ends the loop.
    `interval` is read before every sleep, so its owner may change it (a hot reload).
    With `first_now` the first call comes at once, otherwise after one interval.
    """

    __slots__ = ("_first_now", "_interval", "_task", "_tick", "name")

    def __init__(
        self,
        name: str,
        tick: Callable[[], object],
        interval: Callable[[], float],
        *,
        first_now: bool = False,
    ) -> None:
        self.name = name
        self._tick = tick
        self._interval = interval
        self._first_now = first_now
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop in the running event loop (no-op when it runs already)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _call(self) -> None:
        result = self._tick()
        if inspect.isawaitable(result):
            await result

    async def _run(self) -> None:
        if self._first_now:
            await self._call()
        while True:
            await asyncio.sleep(self._interval())
            await self._call()
