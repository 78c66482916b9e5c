"""An event loop in a thread of its own, for the background requests that measure time.

Scrapes and health checks have short timeouts (0.2 s by default for /metrics). Measured on
the proxy's loop, they count the loop's own lateness: a loop busy relaying thousands of
stream chunks fires the timer late, or reads the answer late, and a healthy backend looks
slow or dead exactly when routing needs its signals most. Here they run on a loop that does
nothing else, with an HTTP client session created in (and bound to) that loop.

The thread's loop is of the main loop's class, so its `time()` is the same clock
(`asyncio` loops: `time.monotonic()`; uvloop: libuv's millisecond clock): stamps taken in
the thread can be compared with routing's `now`. What must run on the main loop (flow
control's hooks, state shared with the data path) is sent there with
`call_soon_threadsafe`; results published from the thread replace whole objects (one
atomic attribute assignment under the GIL), never mutate something the main loop reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp

__all__ = ["SignalsThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SignalsThread:
    """Runs coroutines on a dedicated event loop in a daemon thread; owns a session there."""

    def __init__(self, name: str = "lbproxy-signals") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None

    async def start(self, make_session: Callable[[], aiohttp.ClientSession]) -> None:
        """Start the thread and its loop, and create the session in it (from the main loop)."""
        if self.loop is not None:
            return
        main = asyncio.get_running_loop()
        # Same class as the main loop: the same clock (see the module docstring).
        loop: asyncio.AbstractEventLoop = type(main)()
        thread = threading.Thread(target=self._serve, args=(loop,), name=self.name, daemon=True)
        thread.start()
        self.loop, self._thread = loop, thread

        async def create() -> aiohttp.ClientSession:
            return make_session()

        self.session = await self.run(create())

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the thread's loop (from any thread)."""
        if self.loop is None:
            coro.close()
            raise RuntimeError(f"{self.name}: not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the thread's loop and wait for it from the calling loop; cancelling
        the caller cancels it there."""
        return await asyncio.wrap_future(self.submit(coro))

    async def stop(self) -> None:
        """Close the session, stop the loop and join the thread (idempotent)."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        session, self.session = self.session, None
        if session is not None:
            try:
                await self.run(session.close())
            except Exception:  # stopping must go on
                log.exception("%s: closing the session failed", self.name)
        self.loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Whatever a component left running ends here rather than warn at exit.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
