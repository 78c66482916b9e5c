"""Model discovery for pools that list no `models`: read each backend's /v1/models.

A backend whose answer cannot be used keeps the models it had; its failures are logged
as the scraper's are (first one, then a summary a minute, then its recovery).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from lbproxy.aio import PeriodicTask
from lbproxy.routing.state import Endpoint
from lbproxy.signals.failure_log import FailureLog, sanitize

if TYPE_CHECKING:  # signals do not import the proxy at run time
    from collections.abc import Callable

    from lbproxy.proxy.pools import PoolTable

log = logging.getLogger("lbproxy.discovery")


class _Unusable(Exception):
    """An answer that lists no models."""


class ModelDiscovery:
    def __init__(
        self,
        pools: Callable[[], PoolTable],
        session: aiohttp.ClientSession,
        *,
        interval: float = 30.0,
        timeout: float = 3.0,
    ) -> None:
        self.pools = pools  # the running table, read per round: a reload swaps it
        self._session = session
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.cards: dict[str, dict[str, Any]] = {}  # model id -> a backend's model card
        self.failure_log = FailureLog(log, "model discovery")
        self._rounds = PeriodicTask("lbproxy-discovery", self.discover_once, lambda: self.interval)

    def needed(self) -> bool:
        return any(p.configured_models is None for p in self.pools().pools)

    async def _models_of(self, ep: Endpoint) -> list[dict[str, Any]] | None:
        label = f"{ep.pool}/{ep.name}"
        try:
            async with self._session.get(ep.url + "/v1/models", timeout=self._timeout) as r:
                if r.status != 200:
                    raise _Unusable(f"HTTP {r.status}")
                data = orjson.loads(await r.read())
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list):
                raise _Unusable("no 'data' list in the answer")
        except _Unusable as e:
            self.failure_log.failed(ep, label, str(e))
            return None
        except TimeoutError:
            self.failure_log.failed(ep, label, f"no answer within {self._timeout.total:g}s")
            return None
        except (aiohttp.ClientError, ValueError) as e:  # orjson.JSONDecodeError is a ValueError
            self.failure_log.failed(ep, label, sanitize(f"{type(e).__name__}: {e}"))
            return None
        self.failure_log.recovered(ep, label)
        return [c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)]

    async def discover_once(self) -> None:
        jobs = []
        for pool in self.pools().pools:
            if pool.configured_models is None:
                jobs.extend((pool, ep) for ep in pool.endpoints)
        self.failure_log.keep_only(ep for _, ep in jobs)
        results = await asyncio.gather(*(self._models_of(ep) for _, ep in jobs))
        for (pool, ep), cards in zip(jobs, results, strict=True):
            if cards is None:
                continue  # keep what we knew: a backend that is briefly down keeps its models
            pool.discovered_models[ep.name] = {c["id"] for c in cards}
            for c in cards:
                self.cards.setdefault(c["id"], c)
        self.pools().rebuild()

    async def refresh(self) -> None:
        """When some pool lists no models: discover them now, then every `interval`."""
        if self.needed():
            await self.discover_once()
            self.start()

    def start(self) -> None:
        if self.needed():
            self._rounds.start()  # no-op when already running

    async def stop(self) -> None:
        await self._rounds.stop()
