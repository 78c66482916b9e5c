"""Flow control in the proxy: one pool's `FlowController` driven by the event loop.

`acquire` is where a request waits: it returns the routing decision once the request is
dispatched (its first backend already counted in `in_flight`), or raises `Overloaded`
(429 with Retry-After) when it is shed. Below capacity nothing waits: the request is
routed at once among the backends that can take it, with no future, timer or task.

What wakes the queue (each calls `wake`, which dispatches while backends can take more):
a request ending on a backend (`release`), a fresh scrape (`on_metrics`), a backend's
health changing, a reload. One timer per pool, set for the earliest `max_wait` deadline,
sheds requests that waited too long; there is no polling loop. A client that disconnects
while waiting cancels its handler, which takes it out of the queue at once.

A P/D split request (`acquire_pair`) waits in the same queue as one request: it is
dispatched when a decode backend can take it and a prefill backend can take its prefill
leg (`FlowController.can_prefill`), the prefill side chosen by the controller's rule from
the pool's prefill routing (waiting briefly for the backend that holds its prefix), the
decode side the best of the decode routing that can, with both slots counted at once
(the decode one reserved until its leg starts), and shed with one 429. In a P/D pool the
queue is drained over every backend; aggregated requests are still routed only among
the decode-capable ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from lbproxy.config import FlowControl
from lbproxy.flow.controller import (
    EXPECTED_WAIT,
    MAX_WAIT,
    QUEUE_FULL,
    FlowController,
    NoServer,
    Shed,
    Thresholds,
    any_in_service,
)
from lbproxy.flow.queue import DISPATCHED, Waiter
from lbproxy.histogram import Histogram
from lbproxy.proxy.errors import BadRequest, NoBackend, ProxyError
from lbproxy.routing.disagg import DisaggPlan, decode_capable
from lbproxy.routing.state import Decision, Endpoint, RequestContext

if TYPE_CHECKING:
    from lbproxy.proxy.pools import PoolRuntime

# Histogram bounds of the time requests waited (seconds).
WAIT_BOUNDS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Overloaded(ProxyError):
    """429: flow control shed the request; Retry-After says when to try again."""

    status, type = 429, "rate_limit_error"
    _CODES = {QUEUE_FULL: "queue_full", MAX_WAIT: "queue_timeout", EXPECTED_WAIT: "queue_full"}

    def __init__(self, reason: str, retry_after: int, message: str, waited: float = 0.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.waited = waited  # seconds it waited before being shed
        self.code = self._CODES.get(reason, "queue_full")
        self.retry_after = retry_after

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        return super().response({**(extra_headers or {}), "Retry-After": str(self.retry_after)})


class _Held:
    """A waiting request's side of the handshake with `bind` / `_shed`."""

    __slots__ = (
        "ctx",
        "dec",
        "decision",
        "error",
        "fut",
        "pair",
        "plan",
        "prefill",
        "uncached",
        "waited",
    )

    def __init__(self, ctx: RequestContext, plan: DisaggPlan | None = None) -> None:
        self.ctx = ctx
        self.decision: Decision | None = None
        self.error: ProxyError | None = None
        self.fut: asyncio.Future[None] | None = None
        self.pair = plan is not None  # a P/D split: `decision` the decode side, `prefill` the other
        self.plan = plan  # its split plan at arrival, for the first try
        self.prefill: Decision | None = None
        self.dec: Decision | None = None  # a pair's decode side, as last ranked
        self.uncached = 0  # a pair's prefill leg: the uncached tokens flow control counted
        self.waited = 0.0


class FlowGate:
    def __init__(self, pool: PoolRuntime, settings: FlowControl, thresholds: Thresholds) -> None:
        self.pool = pool
        self.controller = FlowController(settings, thresholds)
        self.controller.disaggregated = pool.disagg is not None
        self._settings(settings)
        self.waited = Histogram(WAIT_BOUNDS)  # every request's wait, dispatched or shed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushing = False

    def configure(self, pool: PoolRuntime, settings: FlowControl, thresholds: Thresholds) -> None:
        """A reload: follow the new runtime (endpoints, router) and settings; whoever
        waits keeps waiting."""
        self.pool = pool
        self._settings(settings)
        self.controller.configure(settings, thresholds)
        self.controller.disaggregated = pool.disagg is not None
        self.controller.prune(pool.endpoints)

    def _settings(self, settings: FlowControl) -> None:
        self.settings = settings
        self._priority_header = settings.priority_header
        self._flow_header = settings.flow_header
        self._default_priority = settings.default_priority
        self._key_priority = {
            f"Bearer {kp.key.get_secret_value()}": kp.priority for kp in settings.key_priorities
        }

    def classify(self, headers: Mapping[str, str]) -> tuple[int, str]:
        """(priority, flow) of a request: the priority header, else its key's default,
        else `default_priority`; the flow is `flow_header`'s value, else the client's key
        (one flow per key), else the shared flow ""."""
        auth = headers.get("Authorization", "")
        raw = headers.get(self._priority_header)
        if raw is None:
            priority = self._key_priority.get(auth, self._default_priority)
        else:
            try:
                priority = int(raw)
            except ValueError:
                raise BadRequest(
                    f"the {self._priority_header} header must be an integer",
                    param=self._priority_header,
                ) from None
        if self._flow_header is not None:
            return priority, headers.get(self._flow_header, "")
        return priority, auth

    # ---------------------------------------------------------------- the data path
    async def acquire(
        self, ctx: RequestContext, priority: int, flow: str, now: float, tokens: int
    ) -> tuple[Decision, float]:
        """Wait until the request is dispatched; returns its decision and the seconds it
        waited. `tokens`: an estimate of its prompt tokens. Raises Overloaded (shed) or
        NoBackend."""
        held = _Held(ctx)
        w = Waiter(priority, flow, now, now, held, tokens, ctx.max_tokens or 0)
        if not self._admit(held, w):  # below capacity it was dispatched: no await
            await self._queued(held, w)
        assert held.decision is not None
        return held.decision, held.waited

    async def acquire_pair(
        self, ctx: RequestContext, plan: DisaggPlan, priority: int, flow: str, now: float
    ) -> tuple[Decision, Decision, float, int]:
        """`acquire` for a P/D split planned at arrival: (prefill decision, decode
        decision, seconds waited, the prefill leg's uncached tokens), both endpoints
        already counted in `in_flight`, the decode one reserved; each leg's end is
        `release`d (the prefill leg's with its uncached tokens), the decode slot's
        reservation ends with `decode_started`."""
        held = _Held(ctx, plan)
        tokens = plan.prompt_tokens
        w = Waiter(priority, flow, now, now, held, tokens, ctx.max_tokens or 0, pair=True)
        await self._wait(held, w)
        assert held.decision is not None and held.prefill is not None
        return held.prefill, held.decision, held.waited, held.uncached

    def _endpoints(self) -> list[Endpoint]:
        """What the queue is drained over: a P/D pool's prefill backends too."""
        pool = self.pool
        return pool.endpoints if pool.disagg is not None else pool.serving

    async def _wait(self, held: _Held, w: Waiter) -> None:
        """Admit `w` and wait until it is dispatched (held.decision set, held.waited the
        seconds it waited); raises Overloaded (shed) or NoBackend."""
        if not self._admit(held, w):
            await self._queued(held, w)

    def _admit(self, held: _Held, w: Waiter) -> bool:
        """Admit `w`: True if it was dispatched at once (it waited 0 s), False if it is
        queued (or was settled inside admit); raises Overloaded (shed) or NoBackend."""
        try:
            if self.controller.admit(w, self._endpoints(), w.arrival, self, self._shed):
                assert held.decision is not None
                self.waited.observe(0.0)
                held.waited = 0.0
                return True
        except Shed as e:
            self.waited.observe(0.0)
            raise Overloaded(e.reason, e.retry_after, str(e)) from None
        except NoServer:
            raise NoBackend(f"no healthy backend in pool '{self.pool.name}'") from None
        return False

    async def _queued(self, held: _Held, w: Waiter) -> None:
        """`_wait`'s second half: `w` was queued; wait until it is dispatched or shed."""
        ctl = self.controller
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        if held.decision is None and held.error is None:  # not settled inside admit
            held.fut = loop.create_future()
            self._arm()
            try:
                await held.fut
            except asyncio.CancelledError:
                if not ctl.cancel(w, loop.time()) and held.decision is not None:
                    # Dispatched in the same instant the client left: give the slots back.
                    if held.prefill is not None:
                        ctl.decode_started(held.decision.endpoint)
                        held.prefill.endpoint.in_flight -= 1
                        self.release(held.prefill.endpoint, False, prefill=held.uncached)
                    held.decision.endpoint.in_flight -= 1
                    self.release(held.decision.endpoint, ok=False)
                raise
        if held.error is not None:
            raise held.error
        assert held.decision is not None and w.dispatched_at is not None
        held.waited = w.dispatched_at - w.arrival
        self.waited.observe(held.waited)

    def release(
        self,
        ep: Endpoint,
        ok: bool,
        overloaded: bool = False,
        prefill: int | None = None,
        started: float | None = None,
    ) -> None:
        """A request on `ep` ended (its in_flight already decremented); `prefill`: it was
        a prefill leg counted with these uncached tokens; `started`: when it was sent (on
        this loop's clock), for the lifetime flow control's ramp measures."""
        self.controller.on_done(ep, ok, overloaded, self._now(), prefill, started)
        if self.controller.queue.size:
            self.wake()

    # ---------------------------------------------------------------- events
    def on_metrics(self, ep: Endpoint) -> None:
        self.controller.on_metrics(ep)
        if self.controller.queue.size:
            self.wake()

    def wake(self) -> None:
        """Dispatch while backends can take more; with none left in service, whoever waits
        gets the 503 a new request would get."""
        ctl = self.controller
        if ctl.queue.size:
            if not any_in_service(self.pool.serving):
                self.flush(NoBackend(f"no healthy backend in pool '{self.pool.name}'"))
                return
            ctl.drain(self._endpoints(), self._now(), self)
            self._arm()

    def flush(self, error: ProxyError | None = None) -> None:
        """Flow control is switched off or the pool goes away: route every waiting request
        now among all backends in service, whatever their load (or fail each with
        `error`)."""
        ctl = self.controller
        now = self._now()
        serving = [ep for ep in self._endpoints() if ep.healthy and not ep.draining]
        while (w := ctl.queue.pop()) is not None:
            held: _Held = w.payload
            w.state, w.dispatched_at = DISPATCHED, now
            self._flushing = True  # whatever their load
            try:
                decision = self.rank(w, serving, now) if error is None else None
            finally:
                self._flushing = False
            if decision is not None:
                self.bind(w, decision, now)
                continue
            held.error = error or NoBackend(f"no healthy backend in pool '{self.pool.name}'")
            self._settle(held)
        self._cancel_timer()

    # ---------------------------------------------------------------- the Binder
    def rank(self, w: Waiter, candidates: list[Endpoint], now: float) -> Decision | None:
        held: _Held = w.payload
        pool = self.pool
        if pool.disagg is None:
            return pool.router.rank(held.ctx, candidates, now, gates=False)
        if not held.pair:  # aggregated in a P/D pool: never on a prefill-only backend
            eps = [ep for ep in candidates if decode_capable(ep)]
            return pool.router.rank(held.ctx, eps, now, gates=False)
        ctl = self.controller
        can_take = (lambda ep: True) if self._flushing else (lambda ep: ctl.can_take(ep, now))
        plan, held.plan = held.plan, None
        pair = pool.disagg.rank_pair(held.ctx, candidates, now, can_take, plan)
        if pair is None:
            return None
        held.dec = pair[1]
        return pair[0]  # the controller chooses the prefill side and binds by it

    def bind(self, w: Waiter, decision: Decision, now: float) -> None:
        held: _Held = w.payload
        if held.pair:
            self._bind_pair(w, held, decision, now)
        else:
            self.pool.router.commit(held.ctx, decision.endpoint, now)
            decision.endpoint.in_flight += 1
            held.decision = decision
        self._settle(held)

    def _bind_pair(self, w: Waiter, held: _Held, pre: Decision, now: float) -> None:
        """Count the prefill side's slot (`pre`, chosen by the controller) with the
        decode side's (never one alone). Each leg's router learns where it went when the
        leg is sent (proxy/disagg.py)."""
        pool, ctl = self.pool, self.controller
        assert pool.disagg is not None and held.dec is not None
        p_ep = pre.endpoint
        flushing = self._flushing
        dec = pool.disagg.pick_decode(
            held.ctx,
            held.dec,
            p_ep,
            self._endpoints(),
            now,
            lambda ep: flushing or ctl.can_take(ep, now),
        )
        assert dec is not None  # rank_pair leaves every prefill side a partner
        held.uncached = pool.disagg.uncached_tokens(held.ctx, p_ep)
        ctl.bind_pair(p_ep, dec.endpoint, held.uncached, w.tokens, now)
        p_ep.in_flight += 1
        dec.endpoint.in_flight += 1
        held.prefill, held.decision = pre, dec

    # ---------------------------------------------------------------- state for people
    def pool_json(self) -> dict[str, object]:
        """What /admin/backends' pools and the dashboard show of this pool's flow control."""
        ctl = self.controller
        return {
            "waiting": ctl.queue.size,
            "waiting_by_priority": {str(p): n for p, n in sorted(ctl.queue.lengths().items())},
            "dispatched_direct": ctl.dispatched_direct,
            "dispatched_queued": ctl.dispatched_queued,
            "shed": dict(ctl.shed_counts),
            "max_queue": ctl.max_queue,
            "max_wait_s": ctl.max_wait,
            "ramp_s": ctl.ramp_time(),
        }

    def backend_json(self, ep: Endpoint) -> dict[str, object]:
        ctl = self.controller
        lim = ctl.limiter(ep)
        out: dict[str, object] = {
            "concurrency_limit": ctl.limit_of(ep),
            "decode_latency_s": lim.itl,
        }
        load = ctl.pd_loads.get(ep)
        if load is not None:  # a P/D pool's backend
            rate = load.rate()
            out["prefill_legs"] = load.legs
            out["prefill_tokens_in_flight"] = load.tokens
            out["prefill_rate_tokens_s"] = None if rate is None else round(rate, 1)
            out["reserved_decode_slots"] = load.reserved
        return out

    # ---------------------------------------------------------------- internals
    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        return loop.time()

    def _shed(self, w: Waiter) -> None:
        held: _Held = w.payload
        waited = self._now() - w.arrival
        if w.shed_reason == MAX_WAIT:
            message = f"the pool is overloaded: no backend could take the request in {waited:.0f} s"
        else:  # evicted from a full queue by a request of a higher band or a shorter flow
            message = "the pool is overloaded: the request gave its place to a fairer share"
        held.error = Overloaded(w.shed_reason, self.controller.retry_after(), message, waited)
        self.waited.observe(waited)
        self._settle(held)

    @staticmethod
    def _settle(held: _Held) -> None:
        fut = held.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _arm(self) -> None:
        t = self.controller.next_deadline()
        if t is None:
            self._cancel_timer()
        elif self._timer_at is None or t < self._timer_at:
            self._cancel_timer()
            loop = self._loop or asyncio.get_running_loop()
            self._timer, self._timer_at = loop.call_at(t, self._on_timer), t

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.controller.expire(self._now(), self._shed)
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
