"""Endpoint health: active checks of `/health` and a passive circuit breaker.

Routing reads one flag, `Endpoint.healthy`, which is set here to

    healthy = (the active checks say up) and (the circuit is not open)

Active checks (unless `active` is off): every `interval` each endpoint gets GET /health
(timeout `timeout`), each on its own, so a hanging one delays nobody else. An answer that
is definite (connection refused or reset, or a status other than 2xx) ejects the endpoint
at once, so a backend that is down gets no new request within one interval; a timeout is
ambiguous (a busy server answers late) and ejects only after `unhealthy_after`
consecutive failed checks. `healthy_after` consecutive successes re-admit it.

Circuit breaker, per endpoint, fed by the forwarder with the outcome of every attempt
(`record(ep, ok)`; connect errors, timeouts before the response head, 5xx and failures
mid-body are failures; any other response is a success):

    closed --(failure_threshold consecutive failures)--> open
    open --(open_seconds elapse)--> half-open
    half-open --(a success)--> closed
    half-open --(a failure)--> open again

While open the endpoint gets no requests. Half-open makes it routable again and the real
requests are the probe: the first outcome decides. Requests that race into a half-open
endpoint that is still broken fail before their first byte and are retried elsewhere, so
clients do not see them. Outcomes that arrive while the circuit is open (requests sent
before it opened) are ignored. State is keyed by the Endpoint object (names are unique only
within a pool), so it follows an endpoint across a hot reload and is dropped when the
endpoint leaves the configuration.

Stall detection, for a backend whose /health answers but whose inference does not (a hung
GPU, a stopped process behind a live socket): the forwarder tells `sent`, `first_byte`
and `unanswered` of every attempt (`Endpoint.progress`). A backend is stalled when
requests are waiting on it and none of its requests has had a first body byte for longer
than its overdue time, max(`stall_after`, `stall_factor` x its slowest first byte among
the last 32); requests abandoned unanswered keep the clock running, and the scraped
generation-token counter moving stops it (a long non-streamed answer is not a stall).
A stall opens the circuit at once. Its half-open period admits one probe request at a
time, and only a first body byte of the probe closes it (response headers alone do not:
a hung vLLM still sends the headers of a stream). A client abandoning a request before
its first byte after the overdue time counts as a failed request.

Ejections (circuit opened by failures or a stall, active check failed) are counted by
reason in `ejections`, for /metrics.

`on_change(ep)`, if set, is called synchronously whenever `ep.healthy` changes, and on every
circuit transition (so also when a half-open circuit closes, which leaves `ep.healthy` as it
was but ends the probe period): flow control dispatches waiting requests on it. Its
exceptions are logged, never raised into the forwarder or the check loop.

With `offload` (the proxy passes `SignalsThread.run`) only the request of an active check
runs on the signals thread's loop, so that its timeout measures the backend and not this
loop's lateness; its outcome, and all the state above, stay on the proxy's loop.

Stamps (`last_check`, `opened_at`) come from `clock`, which the proxy sets to its event
loop's `time`, the clock routing reads `now` from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp

from lbproxy.aio import PeriodicTask, loop_time
from lbproxy.routing.state import Endpoint, Progress
from lbproxy.signals.failure_log import sanitize

if TYPE_CHECKING:
    from lbproxy.config import Health

log = logging.getLogger("lbproxy.health")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
PROBE_WANTED, PROBE_OUT = 1, 2  # Progress.probe
_STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


def _label(ep: Endpoint) -> str:
    """`pool/name` for logs: a name alone may be in several pools."""
    return f"{ep.pool}/{ep.name}" if ep.pool else ep.name


class _Probe:
    """Active-check state of one endpoint."""

    __slots__ = ("failures", "last_check", "last_error", "successes", "up")

    def __init__(self, up: bool) -> None:
        self.up = up
        self.failures = 0
        self.successes = 0
        self.last_error = ""
        self.last_check: float | None = None


class _Circuit:
    """Circuit-breaker state of one endpoint."""

    __slots__ = ("failures", "opened_at", "opens", "reason", "state", "timer")

    def __init__(self) -> None:
        self.state = CLOSED
        self.reason = ""  # why it last opened: failures | stall
        self.failures = 0  # consecutive failed attempts
        self.opened_at: float | None = None
        self.opens = 0  # times opened, ever
        self.timer: asyncio.TimerHandle | None = None


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
        failure_threshold: int = 3,
        open_seconds: float = 10.0,
        active: bool = True,
        stall_after: float | None = 15.0,
        stall_factor: float = 4.0,
        clock: Callable[[], float] = loop_time,
        on_change: Callable[[Endpoint], None] | None = None,
        offload: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]] | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._session = session
        # Runs each GET /health on another loop (`SignalsThread.run`), where its timeout is
        # not stretched by this loop being busy; `session` must then belong to that loop.
        self._offload = offload
        self._clock = clock
        self.on_change = on_change
        self._probes: dict[Endpoint, _Probe] = {}
        self._circuits: dict[Endpoint, _Circuit] = {}
        # (pool, name, reason) -> times ejected; reason: failures | stall | health_check
        self.ejections: dict[tuple[str, str, str], int] = {}
        self._rounds = PeriodicTask(
            "lbproxy-health", self._check_round, lambda: self.interval, first_now=True
        )
        self._stall_rounds = PeriodicTask(
            "lbproxy-stall", self._stall_round, lambda: min(1.0, (self.stall_after or 4) / 4)
        )
        self.configure(
            interval=interval,
            timeout=timeout,
            unhealthy_after=unhealthy_after,
            healthy_after=healthy_after,
            failure_threshold=failure_threshold,
            open_seconds=open_seconds,
            active=active,
            stall_after=stall_after,
            stall_factor=stall_factor,
        )

    def configure(
        self,
        *,
        interval: float,
        timeout: float,
        unhealthy_after: int,
        healthy_after: int,
        failure_threshold: int,
        open_seconds: float,
        active: bool = True,
        stall_after: float | None = 15.0,
        stall_factor: float = 4.0,
    ) -> None:
        """Set the thresholds (at start and on a hot reload); state is kept."""
        self.active = active
        if not active:  # what past checks said no longer counts
            probes, self._probes = self._probes, {}
            for ep in probes:
                self._apply(ep)
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.stall_after = stall_after  # None: no stall detection
        self.stall_factor = stall_factor

    def configure_from(self, cfg: Health) -> None:
        """`configure` from the config's `health:` section (at start and on a hot reload)."""
        self.configure(
            interval=cfg.interval,
            timeout=cfg.timeout,
            unhealthy_after=cfg.unhealthy_after,
            healthy_after=cfg.healthy_after,
            failure_threshold=cfg.failure_threshold,
            open_seconds=cfg.open_seconds,
            active=cfg.active,
            stall_after=cfg.stall_after,
            stall_factor=cfg.stall_factor,
        )

    # ---- passive: the circuit breaker (hot path) ------------------------------------------

    def record(self, ep: Endpoint, ok: bool) -> None:
        """The outcome of one attempt on `ep`. Cheap unless the circuit changes state."""
        c = self._circuits.get(ep)
        if c is None:
            c = self._circuits[ep] = _Circuit()
        if ok:
            if c.failures or c.state != CLOSED:
                self._succeeded(ep, c)
        elif c.state != OPEN:
            c.failures += 1
            if c.failures >= self.failure_threshold or c.state == HALF_OPEN:
                self._open(ep, c)

    def _succeeded(self, ep: Endpoint, c: _Circuit) -> None:
        if c.state == OPEN:
            return  # a request sent before the circuit opened; the timer decides
        if ep.progress.probe:
            return  # after a stall only the probe's first body byte closes it
        c.failures = 0
        if c.state == HALF_OPEN:
            c.state = CLOSED
            log.info("backend %s: circuit closed (a request succeeded)", _label(ep))
            self._apply(ep, transition=True)

    def _open(self, ep: Endpoint, c: _Circuit, reason: str = "failures") -> None:
        if reason == "failures":
            log.warning(
                "backend %s: circuit open for %gs after %d consecutive failed requests",
                _label(ep),
                self.open_seconds,
                c.failures,
            )
        self._count_ejection(ep, reason)
        c.reason = reason
        ep.progress.probe = 0
        c.state = OPEN
        c.opened_at = self._clock()
        c.opens += 1
        if c.timer is not None:
            c.timer.cancel()
        c.timer = asyncio.get_running_loop().call_later(self.open_seconds, self._half_open, ep, c)
        self._apply(ep, transition=True)

    def _half_open(self, ep: Endpoint, c: _Circuit) -> None:
        c.timer = None
        if self._circuits.get(ep) is not c:
            return  # the endpoint left the configuration
        c.state = HALF_OPEN
        c.failures = 0
        if c.reason == "stall":
            ep.progress.probe = PROBE_WANTED
        log.info("backend %s: circuit half-open (the next request is the probe)", _label(ep))
        self._apply(ep, transition=True)

    def _apply(self, ep: Endpoint, *, transition: bool = False) -> None:
        """Recompute `ep.healthy`; tell `on_change` if it changed or the circuit moved."""
        probe = self._probes.get(ep)
        c = self._circuits.get(ep)
        healthy = (
            (probe is None or probe.up)
            and (c is None or c.state != OPEN)
            and ep.progress.probe != PROBE_OUT  # one probe at a time after a stall
        )
        changed = healthy != ep.healthy
        ep.healthy = healthy
        if (changed or transition) and self.on_change is not None:
            try:
                self.on_change(ep)
            except Exception:  # runs inside record(), on the forwarder's path: never raise
                log.exception("health: on_change hook failed for %s", _label(ep))

    def _count_ejection(self, ep: Endpoint, reason: str) -> None:
        key = (ep.pool, ep.name, reason)
        self.ejections[key] = self.ejections.get(key, 0) + 1

    # ---- passive: stall detection (hot path: sent / first_byte / unanswered) -------------

    def overdue_after(self, p: Progress) -> float:
        """Seconds without a first byte after which the endpoint of `p` is stalled."""
        floor = self.stall_after or 0.0
        return max(floor, self.stall_factor * max(p.ttfb)) if p.ttfb else floor

    def sent(self, ep: Endpoint, t: float) -> None:
        """An attempt was sent to `ep` at `t`."""
        p = ep.progress
        if not p.owing:
            p.owing, p.since = True, t
        elif not p.waiting and t - p.last_unanswered > (self.stall_after or 0.0):
            p.since = t  # what went unanswered did so long ago: a new wait begins
        p.waiting += 1
        if p.probe == PROBE_WANTED:
            p.probe = PROBE_OUT
            p.since = t  # the probe's own wait is what counts now
            self._apply(ep)  # no more requests until the probe is answered

    def first_byte(self, ep: Endpoint, t_sent: float, t: float) -> None:
        """The attempt sent at `t_sent` got its first body byte (or a complete answer)."""
        p = ep.progress
        p.waiting -= 1
        p.ttfb.append(t - t_sent)
        if p.waiting:
            p.since = t
        else:
            p.owing = False
        if p.probe == PROBE_OUT:
            c = self._circuits.get(ep)
            p.probe = 0
            if c is not None and c.state == HALF_OPEN:
                c.state, c.failures = CLOSED, 0
                log.info("backend %s: circuit closed (the probe got its first byte)", _label(ep))
            self._apply(ep, transition=True)

    def unanswered(self, ep: Endpoint, t_sent: float, t: float, abandoned: bool) -> None:
        """The attempt sent at `t_sent` ended at `t` without a first byte; `abandoned`: the
        client left (connection failures and timeouts reach `record` from the forwarder)."""
        p = ep.progress
        p.waiting -= 1
        p.last_unanswered = t
        if not abandoned:
            return
        if p.probe == PROBE_OUT:
            c = self._circuits.get(ep)
            if c is not None and c.state == HALF_OPEN:
                log.warning(
                    "backend %s: still stalled (the probe's client left without a first "
                    "byte); circuit open for %gs",
                    _label(ep),
                    self.open_seconds,
                )
                self._open(ep, c, "stall")
            return
        waited = t - t_sent
        if self.stall_after is not None and waited > self.overdue_after(p):
            log.info(
                "backend %s: a client gave up after %.1fs without a first byte",
                _label(ep),
                waited,
            )
            self.record(ep, False)

    def check_stalls(self, now: float) -> None:
        """Open the circuit of every endpoint that is stalled at `now`."""
        if self.stall_after is None:
            return
        for ep in self._endpoints():
            p = ep.progress
            m = ep.metrics
            if m is not None and m.generation_tokens is not None:
                moved = p.generated is not None and m.generation_tokens > p.generated
                if moved and p.owing and m.time > p.since:
                    p.since = m.time  # it is generating: working, if slowly
                p.generated = m.generation_tokens
            if not p.waiting or not p.owing:
                continue
            age = now - p.since
            overdue = self.overdue_after(p)
            if age <= overdue:
                continue
            c = self._circuits.get(ep)
            if c is None:
                c = self._circuits[ep] = _Circuit()
            if c.state == OPEN or (c.state == HALF_OPEN and p.probe == PROBE_WANTED):
                continue  # already out, or waiting for a fresh probe
            log.warning(
                "backend %s ejected: stalled, %d requests waiting and no first byte for "
                "%.1fs (overdue after %.1fs); circuit open for %gs",
                _label(ep),
                p.waiting,
                age,
                overdue,
                self.open_seconds,
            )
            self._open(ep, c, "stall")

    async def _stall_round(self) -> None:
        try:
            self.check_stalls(self._clock())
        except Exception:  # never let one bad round stop stall detection
            log.exception("stall check round failed")

    # ---- active: GET /health ---------------------------------------------------------------

    async def check(self, ep: Endpoint) -> bool:
        if self._offload is not None:
            ok, error, definite = await self._offload(self._ask(ep))
        else:
            ok, error, definite = await self._ask(ep)
        self._checked(ep, ok, error, definite)
        return ok

    async def _ask(self, ep: Endpoint) -> tuple[bool, str, bool]:
        """GET /health: (ok, error, definite). Touches no state: it may run on another loop."""
        timeout = self._timeout
        try:
            async with self._session.get(ep.url + "/health", timeout=timeout) as r:
                await r.read()
                ok = 200 <= r.status < 300
                return ok, "" if ok else f"HTTP {r.status}", True
        except TimeoutError:
            return False, f"no answer within {timeout.total:g}s", False
        except aiohttp.ClientError as e:
            # The text may quote what a garbage-speaking backend sent: keep it short, printable.
            return False, sanitize(f"{type(e).__name__}: {e}".rstrip(": ")), True

    def _checked(self, ep: Endpoint, ok: bool, error: str, definite: bool = True) -> None:
        p = self._probes.get(ep)
        if p is None:
            p = self._probes[ep] = _Probe(True)
        p.last_check = self._clock()
        if ok:
            p.failures = 0
            p.successes += 1
            if not p.up and p.successes >= self.healthy_after:
                p.up = True
                log.info("backend %s: health check passes again", _label(ep))
                self._apply(ep)
            return
        p.successes = 0
        p.failures += 1
        p.last_error = error
        if p.up and (definite or p.failures >= self.unhealthy_after):
            p.up = False
            log.warning("backend %s ejected: health check failed (%s)", _label(ep), error)
            self._count_ejection(ep, "health_check")
            self._apply(ep)

    async def check_all(self) -> None:
        endpoints = list(self._endpoints())
        self._prune(endpoints)
        if self.active:
            await asyncio.gather(*(self.check(ep) for ep in endpoints))

    def _prune(self, endpoints: list[Endpoint]) -> None:
        """Forget endpoints that a reload removed."""
        current = set(endpoints)
        for ep in [ep for ep in self._probes if ep not in current]:
            del self._probes[ep]
        for ep in [ep for ep in self._circuits if ep not in current]:
            c = self._circuits.pop(ep)
            if c.timer is not None:
                c.timer.cancel()

    # ---- introspection ----------------------------------------------------------------------

    def status(self, ep: Endpoint) -> dict[str, Any]:
        """The endpoint's health as the admin API shows it."""
        now = self._clock()
        p = self._probes.get(ep)
        c = self._circuits.get(ep)
        return {
            "active": {
                "up": True if p is None else p.up,
                "consecutive_failures": 0 if p is None else p.failures,
                "last_error": None if p is None or not p.last_error else p.last_error,
                "last_check_age_s": None
                if p is None or p.last_check is None
                else round(now - p.last_check, 3),
            },
            "circuit": {
                "state": _STATE_NAMES[CLOSED if c is None else c.state],
                "consecutive_failures": 0 if c is None else c.failures,
                "opened_age_s": None
                if c is None or c.opened_at is None or c.state == CLOSED
                else round(now - c.opened_at, 3),
                "times_opened": 0 if c is None else c.opens,
                "last_reason": None if c is None or not c.reason else c.reason,
            },
            "progress": {
                "waiting_first_byte": ep.progress.waiting,
                "no_first_byte_for_s": round(now - ep.progress.since, 3)
                if ep.progress.owing and ep.progress.waiting
                else None,
                "overdue_after_s": round(self.overdue_after(ep.progress), 3),
            },
        }

    def circuit_state(self, ep: Endpoint) -> str:
        c = self._circuits.get(ep)
        return _STATE_NAMES[CLOSED if c is None else c.state]

    # ---- lifecycle --------------------------------------------------------------------------

    async def _check_round(self) -> None:
        try:
            await self.check_all()
        except Exception:  # never let one bad round stop health checking
            log.exception("health check round failed")

    def start(self) -> None:
        self._rounds.start()
        self._stall_rounds.start()

    async def stop(self) -> None:
        await self._rounds.stop()
        await self._stall_rounds.stop()
        for c in self._circuits.values():
            if c.timer is not None:
                c.timer.cancel()
                c.timer = None
