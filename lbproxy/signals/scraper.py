"""Background poller of each backend's `/metrics`, writing `Endpoint.metrics`.

Every `interval` the scraper asks `endpoints_provider()` for the current endpoints (so a
hot reload changes the set) and starts one request per endpoint that has none in flight.
Each request is its own task with its own timeout, and a round never waits for anyone: a
slow, hanging or broken backend only makes its own snapshot stale, never another's. Since
an endpoint with a request still in flight is skipped, a hanging backend holds at most one
request (and one connection) at a time.

On success `endpoint.metrics` is replaced by a snapshot stamped with `clock()` and the KV
geometry from `vllm:cache_config_info` is copied to `endpoint.block_size` /
`endpoint.num_gpu_blocks`; then `on_scrape(endpoint)` is called, if set. On failure
(connection error, timeout, non-200, body too large, malformed metric line, or a page with
none of the metrics we read) the previous snapshot is left alone, so its age says how stale
it is, and `errors[ep]` (every failure) / `last_error[ep]` (a short sanitised text) record
what happened. Logs do not flood: the first failure of an endpoint is a WARNING, then at
most one summary WARNING per `log_every` seconds, and one INFO line when it recovers (see
`failure_log`). State for endpoints that leave the set is dropped.

`clock` must agree with the clock routing's `now` is read from, since
`Endpoint.fresh_metrics` compares the two; the default is the running loop's clock. The
proxy runs the scraper on its signals thread (`signals_thread.SignalsThread`: start, stop
and every request on that loop, so that a timeout measures the backend and not the busy
proxy loop), with that loop's `time` as the clock (the same clock as the proxy loop's),
and an `on_scrape` that hands the endpoint to the proxy loop. Results are published by
replacing `endpoint.metrics` whole; the counters are only written by the scraper. Every
per-endpoint table is keyed by the Endpoint object: names are unique only within a pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from lbproxy.aio import cancel_and_wait, loop_time
from lbproxy.routing.state import Endpoint, MetricsSnapshot
from lbproxy.signals.failure_log import FailureLog, sanitize
from lbproxy.signals.metrics_parser import MetricsParseError, parse_metrics

if TYPE_CHECKING:
    from lbproxy.config import Signals

__all__ = ["MetricsScraper", "default_metrics_url"]

log = logging.getLogger(__name__)

_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(MetricsSnapshot) if f.name != "time")


def _label(ep: Endpoint) -> str:
    """`pool/name` for logs: a name alone may be in several pools."""
    return f"{ep.pool}/{ep.name}" if ep.pool else ep.name


def default_metrics_url(endpoint: Endpoint) -> str:
    """`<scheme>://<host>/metrics` for an endpoint URL, dropping a trailing `/v1`."""
    parts = urlsplit(endpoint.url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urlunsplit((parts.scheme, parts.netloc, path + "/metrics", "", ""))


class _ScrapeError(Exception):
    pass


class MetricsScraper:
    """Polls `/metrics` of every endpoint; see the module docstring for the contract."""

    def __init__(
        self,
        endpoints_provider: Callable[[], Iterable[Endpoint]],
        *,
        interval: float = 0.25,
        timeout: float | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = loop_time,
        url_for: Callable[[Endpoint], str] = default_metrics_url,
        max_body_bytes: int = 8 * 1024 * 1024,
        on_scrape: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self.configure(interval=interval, timeout=timeout)
        self.endpoints_provider = endpoints_provider
        self.clock = clock
        self.url_for = url_for
        self.max_body_bytes = max_body_bytes
        self._session = session
        self._owns_session = session is None
        self._task: asyncio.Task[None] | None = None
        # Called (synchronously) after each good scrape has replaced `ep.metrics`: flow
        # control dispatches on it. Its exceptions are logged, never fatal.
        self.on_scrape = on_scrape
        self._inflight: dict[Endpoint, asyncio.Task[bool]] = {}
        # Exported per endpoint (the object: names repeat across pools).
        self.successes: dict[Endpoint, int] = {}
        self.errors: dict[Endpoint, int] = {}
        self.last_error: dict[Endpoint, str] = {}
        self.last_success: dict[Endpoint, float] = {}
        self.rounds = 0
        # A garbage-speaking backend fails 4 times a second: log it, not each failure.
        self.failure_log = FailureLog(log, "metrics scrape")

    def configure(self, *, interval: float, timeout: float | None = None) -> None:
        """Set the polling interval and the per-request timeout (default 0.8 x interval)."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        timeout = 0.8 * interval if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.interval = interval
        self.timeout = timeout

    def configure_from(self, cfg: Signals) -> None:
        """`configure` from the config's `signals:` section (at start and on a hot reload)."""
        self.configure(interval=cfg.metrics_interval, timeout=cfg.metrics_timeout)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling in the background (idempotent)."""
        if self._task is None:
            self._ensure_session()
            self._task = asyncio.create_task(self._run(), name="metrics-scraper")

    async def stop(self) -> None:
        """Cancel polling and in-flight requests; close the session if we created it."""
        task, self._task = self._task, None
        await cancel_and_wait(task, *self._inflight.values())
        self._inflight.clear()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def scrape_once(self) -> dict[Endpoint, bool]:
        """Run one round and wait for it; returns success per endpoint."""
        launched = self._launch_round()
        results = await asyncio.gather(*launched.values(), return_exceptions=True)
        return {ep: r is True for ep, r in zip(launched, results, strict=True)}

    # ---- internals -----------------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No connection cap: a fleet of 256 backends is scraped at once, and the
            # default limit of 100 would queue requests behind hanging ones.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._owns_session = True
        return self._session

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self._launch_round()
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:  # the loop was stalled: skip missed rounds rather than burst
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def _launch_round(self) -> dict[Endpoint, asyncio.Task[bool]]:
        """Start a scrape for every endpoint without one in flight; returns the tasks
        (new or already running) for the current endpoints."""
        self.rounds += 1
        try:
            endpoints = list(self.endpoints_provider())
        except Exception:
            log.exception("metrics scraper: endpoints provider failed")
            return {}
        session = self._ensure_session()
        current: dict[Endpoint, asyncio.Task[bool]] = {}
        for ep in endpoints:
            if ep in current:
                continue
            task = self._inflight.get(ep)
            if task is None:
                task = asyncio.create_task(self._scrape(session, ep), name=f"scrape:{_label(ep)}")
                self._inflight[ep] = task
                task.add_done_callback(self._forget_task(ep))
            current[ep] = task
        for stats in (self.successes, self.errors, self.last_error, self.last_success):
            for gone in [e for e in stats if e not in current]:
                del stats[gone]
        self.failure_log.keep_only(current)
        return current

    def _forget_task(self, ep: Endpoint) -> Callable[[asyncio.Task[bool]], None]:
        def done(task: asyncio.Task[bool]) -> None:
            if self._inflight.get(ep) is task:
                del self._inflight[ep]

        return done

    async def _fetch(self, session: aiohttp.ClientSession, url: str) -> str:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with session.get(url, timeout=timeout, headers={"Accept": "text/plain"}) as resp:
            if resp.status != 200:
                raise _ScrapeError(f"HTTP {resp.status}")
            if (resp.content_length or 0) > self.max_body_bytes:
                raise _ScrapeError(f"body of {resp.content_length} bytes exceeds the limit")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _ScrapeError(f"body exceeds {self.max_body_bytes} bytes")
                chunks.append(chunk)
        # Metrics are ASCII in practice; never let a stray byte fail the whole scrape.
        return b"".join(chunks).decode("utf-8", errors="replace")

    async def _scrape(self, session: aiohttp.ClientSession, ep: Endpoint) -> bool:
        try:
            text = await self._fetch(session, self.url_for(ep))
            snap = parse_metrics(text, self.clock())
            if all(getattr(snap, f) is None for f in _SNAPSHOT_FIELDS):
                raise _ScrapeError("no known metrics in response")
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return self._failed(ep, f"timeout after {self.timeout:g}s")
        except (_ScrapeError, MetricsParseError) as e:
            return self._failed(ep, str(e))
        except Exception as e:  # aiohttp.ClientError, OSError, anything else: never fatal
            return self._failed(ep, f"{type(e).__name__}: {e}")
        ep.metrics = snap
        if snap.block_size is not None:
            ep.block_size = snap.block_size
        if snap.num_gpu_blocks is not None:
            ep.num_gpu_blocks = snap.num_gpu_blocks
        # Logged before it is counted: the counters are read from the main loop's thread.
        self.failure_log.recovered(ep, _label(ep))
        self.successes[ep] = self.successes.get(ep, 0) + 1
        self.last_success[ep] = snap.time
        if self.on_scrape is not None:
            try:
                self.on_scrape(ep)
            except Exception:  # a broken hook must not stop this endpoint's scrapes
                log.exception("metrics scraper: on_scrape hook failed for %s", _label(ep))
        return True

    def _failed(self, ep: Endpoint, message: str) -> bool:
        message = sanitize(message)  # it may quote whatever the backend sent
        self.failure_log.failed(ep, _label(ep), message)
        self.last_error[ep] = message
        self.errors[ep] = self.errors.get(ep, 0) + 1
        return False
