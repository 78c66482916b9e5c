"""Active health checks: GET /health on every endpoint, with hysteresis.

An endpoint is ejected after `unhealthy_after` consecutive failures (connect error,
timeout, non-2xx) and re-admitted after `healthy_after` consecutive successes. Each
endpoint is checked independently, so a hanging one delays nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import aiohttp

from lbproxy.routing.state import Endpoint

log = logging.getLogger("lbproxy.health")


class HealthChecker:
    def __init__(
        self,
        endpoints: Callable[[], Iterable[Endpoint]],
        session: aiohttp.ClientSession,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        unhealthy_after: int = 2,
        healthy_after: int = 1,
    ) -> None:
        self._endpoints = endpoints
        self._session = session
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.failures: dict[str, int] = {}
        self.successes: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def check(self, ep: Endpoint) -> bool:
        try:
            async with self._session.get(ep.url + "/health", timeout=self._timeout) as r:
                await r.read()
                ok = 200 <= r.status < 300
                error = "" if ok else f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            ok, error = False, f"{type(e).__name__}: {e}".rstrip(": ")
        self._record(ep, ok, error)
        return ok

    def _record(self, ep: Endpoint, ok: bool, error: str) -> None:
        name = ep.name
        if ok:
            self.failures[name] = 0
            self.successes[name] = self.successes.get(name, 0) + 1
            if not ep.healthy and self.successes[name] >= self.healthy_after:
                ep.healthy = True
                log.info("backend %s is healthy again", name)
        else:
            self.successes[name] = 0
            self.failures[name] = self.failures.get(name, 0) + 1
            self.last_error[name] = error
            if ep.healthy and self.failures[name] >= self.unhealthy_after:
                ep.healthy = False
                log.warning("backend %s ejected: %s", name, error)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(ep) for ep in list(self._endpoints())))

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lbproxy-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
