"""Flow control of one pool: admit, hold, dispatch and shed requests. Pure logic.

No I/O, no clock: `now` is passed in, and the driver supplies a `Binder` (`rank`: the
pool's routing decision for a request over the backends in service, without committing
it; `bind`: send the request where the decision now says, counting it in that backend's
`in_flight` before returning) and `shed(waiter)` (answer it 429; its `shed_reason` says
why). The proxy drives it from its event loop (`proxy/flow_gate.py`),
`lbproxy simulate` from its virtual clock (`bench/simulate.py`): one implementation.

A backend **can take** a request when it is healthy, not draining, has fewer requests in
flight than its concurrency limit (`flow.limiter`, and `max_in_flight` when set), and, if
its metrics are fresh, waits on no more than `queue_depth` requests with KV use at most
`kv_cache_util` (the saturation filter's thresholds), and the prompt tokens sent to it
since that scrape fit in the KV room left under the threshold (from its cache geometry).
Stale metrics leave only the limit, which does not grow without fresh evidence.

- Where a request goes (late binding: decided when it is dispatched, on the signals of
  that moment): the pool's routing ranks every backend in service. The first can take
  it: it goes there. Else the best one that can take it is used if its routing total is
  within `affinity_margin` of the first's, or once the request has been held
  `affinity_wait` (at most half of `max_wait`) since it was first held so (not since its
  arrival: under a steady backlog every request reaching the front has already waited,
  and counting that would send them all to cold backends); until then it waits for room where its
  prefix is cached (sending it to a cold backend costs a full prefill, which under load
  costs everyone). Other waiting requests are tried meanwhile (up to `_SCAN` of them, in
  service order; each routed once per dispatch round), and one of them that can go to
  its own first choice goes before one whose affinity wait ran out: under overload most
  requests are shed anyway, and serving those a backend has cached keeps each backend's
  cache (and KV room: requests of one prefix share its blocks) on few prefixes.
- Arrival (`admit`): with nobody waiting and a backend that can take it, the request is
  dispatched at once (below capacity this is the whole cost). Otherwise it waits, unless
  the queue is full (`max_queue`: a request of a lower band or of a longer flow is shed
  instead when there is one) or, with `shed_early`, its expected wait already exceeds
  `max_wait`. With no backend in
  service at all there is nothing to wait for: `NoServer` (the proxy's 503).
- Dispatch (`drain`), whenever the driver says something changed (a request ended, a
  scrape landed, a backend came back, a reload): while a backend can take one, requests
  are tried in service order (priority, then fairness between flows, then arrival).
- Headroom: the requests priority and fairness are for (a higher band than the lowest
  one waiting, or a flow with fewer waiting than its band's longest) may take up to
  `headroom` x limit more per backend, so a tenant within its share or a high-priority
  request is not stuck behind another's backlog until slots free up. With one flow and
  one band, nobody is privileged and the limits hold exactly.
- Deadlines (`expire`): a request still waiting `max_wait` after its arrival is shed.
- `cancel`: a client that left is taken out and never dispatched.

- Ramp: while requests wait, a backend's limit grows above the highest it has had no
  faster than over one expected request lifetime (`flow.limiter`), the lifetime taken as the
  output tokens requests ask for (`max_tokens`, averaged over recent dispatches) x the
  limiter's `target_itl`, within [5 s, 120 s], or the lifetime seen when shorter. That
  is the longer of two measures over the last ~30 s, each of which runs short in one
  transient: the mean time from dispatch to end of the requests that ended (the driver
  passes each one's dispatch time to `on_done`), short while the fleet fills, since
  those requests ran on emptier engines, faster than the ones now dispatched will; and
  Little's law, requests in flight / requests ending per second, short in a drain and
  the lull after it (in flight falls to nothing, while the rate is still the drain's).
  Requests that say nothing leave growth unpaced, and so does an empty queue (new room
  then fills only as fast as requests arrive).
  A limit a backend no longer uses is forgotten over a quarter of that lifetime
  (`flow.limiter`), so a surge after a lull is ramped too.

- P/D pools (`disaggregated`, set by the driver): a split request waits as one and its
  decision is its prefill side's ranking (`DisaggRouter.rank_pair`, offered only while a
  decode-capable backend can take it), chosen by the rule above with `can_prefill` in
  place of `can_take`, so it too waits up to `affinity_wait` for the prefill backend that
  holds its prefix. A prefill leg is admitted while the uncached prompt tokens of the
  prefill legs in flight on the backend drain within `prefill_wait` at its measured
  prefill rate (`flow.prefill_load`; before that rate is known, fewer legs than the
  limit's `initial`), with the KV checks and `max_in_flight`; a prefill engine normally
  has prompts waiting, so its queue is not a reason to refuse. A backend's concurrency
  limit counts what decodes on it (aggregated requests and decode legs, including slots
  reserved for decode legs whose prefill runs), not the prefill legs a `role: both`
  backend runs for others (`bind_pair`, `decode_started`, `on_done(prefill=...)`).

The expected wait is (requests that would be served first) / (dispatch rate), the rate
measured only while requests were waiting (an exponentially weighted count over 10 s of
backlog), and not used before it has 2 s and 5 dispatches behind it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from lbproxy.config import FlowControl
from lbproxy.flow.limiter import ConcurrencyLimiter
from lbproxy.flow.prefill_load import PrefillLoad
from lbproxy.flow.queue import CANCELLED, DISPATCHED, QUEUED, SHED, FlowQueue, Waiter
from lbproxy.routing.pipeline import Router
from lbproxy.routing.plugins.saturation import SaturationFilter
from lbproxy.routing.state import Decision, Endpoint, MetricsSnapshot

# Why a request was shed (the `reason` label of lbproxy_flow_shed_total).
QUEUE_FULL = "queue_full"
MAX_WAIT = "max_wait"
EXPECTED_WAIT = "expected_wait"
CLIENT_LEFT = "client_left"
SHED_REASONS = (QUEUE_FULL, MAX_WAIT, EXPECTED_WAIT, CLIENT_LEFT)

_RATE_TAU = 10.0  # seconds of backlog the dispatch rate is averaged over
_RATE_MIN_TIME = 2.0
_RATE_MIN_COUNT = 5.0

# Waiting requests tried per dispatch when the first ones wait for their backend: deep
# enough that one whose prefix the freed backend holds is usually among them (with 20
# backends, 64 find one 96% of the time; 16 only 56%, and the rest then go cold).
_SCAN = 64

# Bounds of the ramp (see `ramp_time`): seconds over which an empty backend fills.
_RAMP_MIN = 5.0
_RAMP_MAX = 120.0
_RAMP_WEIGHT = 0.02  # weight of each dispatched request in the average asked length
_ENDED_TAU = 30.0  # seconds over which requests ending (their rate, their lifetimes) are averaged
_ENDED_MIN_TIME = 5.0
_ENDED_MIN_COUNT = 20.0

ShedFn = Callable[[Waiter], None]


class Binder(Protocol):
    def rank(self, w: Waiter, candidates: list[Endpoint], now: float) -> Decision | None: ...

    def bind(self, w: Waiter, decision: Decision, now: float) -> None: ...


class NoServer(Exception):
    """No backend of the pool is in service (all unhealthy or draining): nothing to wait for."""


class Shed(Exception):
    """A request refused at arrival; `retry_after` in whole seconds."""

    def __init__(self, reason: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Thresholds:
    queue_depth: float = 5.0
    kv_cache_util: float = 0.8
    metrics_max_age: float = 2.0
    max_in_flight: int | None = None


def any_in_service(endpoints: Iterable[Endpoint]) -> bool:
    return any(ep.healthy and not ep.draining for ep in endpoints)


def thresholds_for(router: Router, metrics_max_age: float) -> Thresholds:
    """The pool profile's saturation-filter thresholds, or the filter's defaults."""
    for f in router.filters:
        if isinstance(f, SaturationFilter):
            return Thresholds(f.queue_depth, f.kv_cache_util, metrics_max_age, f.max_in_flight)
    return Thresholds(metrics_max_age=metrics_max_age)


class FlowController:
    def __init__(self, settings: FlowControl, thresholds: Thresholds | None = None) -> None:
        self.queue = FlowQueue()
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._seq = 0
        self.limiters: dict[Endpoint, ConcurrencyLimiter] = {}
        # P/D pools only (set by the driver): split requests' legs per backend. Empty in
        # an aggregated pool, whose rules then are exactly those above.
        self.disaggregated = False
        self.pd_loads: dict[Endpoint, PrefillLoad] = {}
        self.dispatched_direct = 0
        self.dispatched_queued = 0
        self.shed_counts = dict.fromkeys(SHED_REASONS, 0)
        self._t_last = 0.0
        self._backlog_count = 0.0  # decayed dispatches while requests waited
        self._backlog_time = 0.0  # decayed seconds of backlog
        self._asked_tokens: float | None = None  # average max_tokens of recent dispatches
        self._t_ended = 0.0
        self._ended_count = 0.0  # decayed requests ended (with a dispatch time), for the ramp
        self._ended_life = 0.0  # decayed sum of their lifetimes (end - dispatch)
        self._ended_time = 0.0  # decayed seconds they were counted over
        # This process's share of each backend's limit (several replicas or workers
        # sending to the same backends each keep their share: `lbproxy.replicas`).
        self.share = 1.0
        self.configure(settings, thresholds or Thresholds())

    def configure(self, settings: FlowControl, thresholds: Thresholds) -> None:
        """Apply (new) settings; waiting requests and learnt limits stay."""
        self.settings = settings
        self.max_queue = settings.max_queue
        self.max_wait = settings.max_wait
        self.shed_early = settings.shed_early
        caps = [c for c in (settings.max_in_flight, thresholds.max_in_flight) if c is not None]
        self.max_in_flight = min(caps) if caps else None
        self.queue_depth = (
            thresholds.queue_depth if settings.queue_depth is None else settings.queue_depth
        )
        self.kv_cache_util = (
            thresholds.kv_cache_util if settings.kv_cache_util is None else settings.kv_cache_util
        )
        self.max_age = thresholds.metrics_max_age
        # Never most of max_wait: a request must keep time to take another backend.
        self.affinity_wait = min(settings.affinity_wait, settings.max_wait / 2)
        self.affinity_margin = settings.affinity_margin
        self.headroom = settings.headroom
        self.prefill_wait = min(settings.prefill_wait, settings.max_wait / 2)
        if getattr(self, "_limit_params", None) != settings.limit:
            self._limit_params = settings.limit
            self.limiters.clear()

    # ---------------------------------------------------------------- backends
    def limiter(self, ep: Endpoint) -> ConcurrencyLimiter:
        lim = self.limiters.get(ep)
        if lim is None:
            lim = self.limiters[ep] = ConcurrencyLimiter(self._limit_params)
        return lim

    def limit_of(self, ep: Endpoint) -> int:
        cap = self.limiter(ep).value()
        if self.max_in_flight is not None and self.max_in_flight < cap:
            cap = self.max_in_flight
        if self.share < 1.0:
            cap = max(1, math.ceil(cap * self.share))
        return cap

    def can_take(self, ep: Endpoint, now: float, privileged: bool = False) -> bool:
        """Whether `ep` can take a request now; a privileged one (see `_privileged`) may
        also use the `headroom` above the limit."""
        if not ep.healthy or ep.draining:
            return False
        cap = self.limit_of(ep)
        if privileged:
            cap += math.ceil(self.headroom * cap)
        if self.pd_loads and (load := self.pd_loads.get(ep)) is not None:
            return self._can_decode(ep, now, cap, load.legs)
        if ep.in_flight >= cap:
            return False
        m = ep.fresh_metrics(now, self.max_age)
        if m is None:
            return True
        if m.num_waiting is not None and m.num_waiting > self.queue_depth:
            return False
        usage = m.kv_cache_usage
        if usage is None:
            return True
        if usage > self.kv_cache_util:
            return False
        # KV room left under the threshold at the last scrape, less the prompts sent since:
        # the snapshot cannot show them yet, and a whole cohort finishing together must
        # not be refilled blind (cold prompts would overfill the cache, and the engine
        # would queue and preempt).
        blocks, size = ep.num_gpu_blocks, ep.block_size
        if not blocks or not size:
            return True
        room = (self.kv_cache_util - usage) * blocks * size
        return self.limiter(ep).sent_tokens < room

    def _can_decode(self, ep: Endpoint, now: float, cap: int, legs: int) -> bool:
        """`can_take` on a P/D backend: its limit counts what decodes there, not the
        `legs` prefill legs it runs for others (nor do they count among the requests its
        engine queues)."""
        if ep.in_flight - legs >= cap:
            return False
        m = ep.fresh_metrics(now, self.max_age)
        if m is None:
            return True
        if m.num_waiting is not None and m.num_waiting - legs > self.queue_depth:
            return False
        return self._kv_room(ep, m)

    def _kv_room(self, ep: Endpoint, m: MetricsSnapshot) -> bool:
        """`can_take`'s KV checks (inlined there: it runs for every backend at every
        dispatch)."""
        usage = m.kv_cache_usage
        if usage is None:
            return True
        if usage > self.kv_cache_util:
            return False
        blocks, size = ep.num_gpu_blocks, ep.block_size
        if not blocks or not size:
            return True
        room = (self.kv_cache_util - usage) * blocks * size
        return self.limiter(ep).sent_tokens < room

    def can_prefill(self, ep: Endpoint, now: float) -> bool:
        """Whether `ep` can take a split request's prefill leg now: healthy, not
        draining, under `max_in_flight` (requests of any kind), its KV checks as in
        `can_take`, and the uncached prompt tokens of the prefill legs in flight there
        drain within `prefill_wait` at its measured prefill rate (`flow.prefill_load`);
        before that rate is known, fewer legs than the limit's `initial`. A backend with
        no prefill leg in flight always can (its engine's waiting prompts, normal on a
        prefill engine, are not a reason to refuse)."""
        if not ep.healthy or ep.draining:
            return False
        if self.max_in_flight is not None:
            cap = self.max_in_flight
            if self.share < 1.0:
                cap = max(1, math.ceil(cap * self.share))
            if ep.in_flight >= cap:
                return False
        load = self.pd_loads.get(ep)
        if load is not None and load.legs:
            rate = load.rate()
            if rate is None:
                cap = self._limit_params.initial
                if self.share < 1.0:
                    cap = max(1, math.ceil(cap * self.share))
                if load.legs >= cap:
                    return False
            elif load.tokens > rate * self.prefill_wait * self.share:
                return False
        m = ep.fresh_metrics(now, self.max_age)
        return m is None or self._kv_room(ep, m)

    def pd_load(self, ep: Endpoint) -> PrefillLoad:
        load = self.pd_loads.get(ep)
        if load is None:
            load = self.pd_loads[ep] = PrefillLoad()
        return load

    def bind_pair(
        self, p_ep: Endpoint, d_ep: Endpoint, uncached: int, tokens: int, now: float
    ) -> None:
        """A split request was dispatched (the driver counted both in `in_flight`): its
        prefill leg on `p_ep` (`uncached` prompt tokens to compute), its decode slot
        reserved on `d_ep` until `decode_started`. `tokens`: its prompt, for the KV
        checks of both."""
        self.pd_load(p_ep).started(uncached, now)
        self.pd_load(d_ep).reserved += 1
        self.limiter(p_ep).sent_tokens += tokens
        self.limiter(d_ep).sent_tokens += tokens

    def prefill_started(self, ep: Endpoint, uncached: int, now: float | None) -> None:
        """A prefill leg not dispatched by `bind_pair` (a failover) started on `ep`."""
        self.pd_load(ep).started(uncached, now)

    def decode_started(self, ep: Endpoint) -> None:
        """The decode slot reserved on `ep` is used by its leg, or given back unused
        (then `on_done` follows)."""
        load = self.pd_loads.get(ep)
        if load is not None and load.reserved > 0:
            load.reserved -= 1

    def available(self, endpoints: Iterable[Endpoint], now: float) -> list[Endpoint]:
        return [ep for ep in endpoints if self.can_take(ep, now)]

    def on_metrics(self, ep: Endpoint) -> None:
        """A fresh scrape of `ep` landed: update its limit (then `drain`)."""
        if ep.metrics is not None:
            if ep.role == "prefill":
                # A P/D prefill backend decodes nothing: its decode latency says nothing
                # of its room, which its queue and KV checks judge; its limit only ramps.
                self.limiter(ep).sent_tokens = 0
                return
            # Paced only while requests wait: new room is then filled at once, all in one
            # cohort; with nobody waiting it fills as requests arrive.
            ramp = self.ramp_time() if self.queue.size else None
            lim = self.limiter(ep)
            load = self.pd_loads.get(ep) if self.pd_loads else None
            in_flight = ep.in_flight if load is None else ep.in_flight - load.legs
            idle_tau = None
            if lim.unused(in_flight):  # forgotten over a quarter of a request's lifetime
                lifetime = ramp or self.ramp_time()
                idle_tau = lifetime / 4 if lifetime else None
            if load is None:
                lim.on_metrics(ep.metrics, in_flight, self.queue_depth, ramp, idle_tau=idle_tau)
                return
            lim.on_metrics(
                ep.metrics,
                in_flight,
                self.queue_depth,
                ramp,
                reserved=load.reserved,
                prefill_legs=load.legs,
                prefill_seen=load.scraped(),
                idle_tau=idle_tau,
            )

    def ramp_time(self) -> float | None:
        """Seconds over which an empty backend may fill: one expected request lifetime,
        from what requests ask for, or shorter when they are seen to end sooner."""
        if self._asked_tokens is None:
            return None
        t = self._asked_tokens * self._limit_params.target_itl
        if self._ended_time >= _ENDED_MIN_TIME and self._ended_count >= _ENDED_MIN_COUNT:
            # Two measures, each short in its own transient (see the module doc): the
            # longer of them is the lifetime seen.
            lived = self._ended_life / self._ended_count
            in_flight = sum(ep.in_flight for ep in self.limiters)
            little = in_flight * self._ended_time / self._ended_count
            t = min(t, max(lived, little))
        return min(max(t, _RAMP_MIN), _RAMP_MAX)

    def on_done(
        self,
        ep: Endpoint,
        ok: bool,
        overloaded: bool = False,
        now: float | None = None,
        prefill: int | None = None,
        started: float | None = None,
    ) -> None:
        """A request on `ep` ended (its in_flight already decremented; then `drain`).
        `now` and `started` (when it was dispatched), when given, measure how long
        requests live (for the ramp). `prefill`: it was a prefill leg counted by
        `bind_pair` or `prefill_started`, with these uncached tokens."""
        if prefill is not None:
            self.pd_load(ep).ended(prefill, now, ok)
            if ep.role == "prefill":  # its limit is not used (`can_prefill` judges it)
                return
        if now is not None and started is not None:
            dt = now - self._t_ended
            if dt > 0:
                self._t_ended = now
                d = math.exp(-dt / _ENDED_TAU)
                self._ended_count *= d
                self._ended_life *= d
                self._ended_time = self._ended_time * d + _ENDED_TAU * (1.0 - d)
            self._ended_count += 1.0
            self._ended_life += max(0.0, now - started)
        load = self.pd_loads.get(ep) if self.pd_loads else None
        in_flight = ep.in_flight - load.legs if load is not None else ep.in_flight
        self.limiter(ep).on_done(ok, overloaded, in_flight)

    def prune(self, endpoints: Iterable[Endpoint]) -> None:
        """Forget the limits of backends that left the pool."""
        keep = set(endpoints)
        for ep in [ep for ep in self.limiters if ep not in keep]:
            del self.limiters[ep]
        for ep in [ep for ep in self.pd_loads if ep not in keep]:
            del self.pd_loads[ep]

    # ---------------------------------------------------------------- requests
    def admit(
        self, w: Waiter, endpoints: list[Endpoint], now: float, binder: Binder, shed: ShedFn
    ) -> bool:
        """A request arrives. Returns True if it was dispatched at once (through
        `binder.bind`), False if it waits (it is then dispatched or shed later, or already
        was inside this call). Raises Shed if it is refused at arrival, NoServer if no
        backend is in service."""
        self._tick(now)
        q = self.queue
        if not q.size:
            serving = [ep for ep in endpoints if ep.healthy and not ep.draining]
            if not serving:
                raise NoServer
            if self._try(w, serving, now, binder, queued=False):
                self.dispatched_direct += 1
                return True
        elif not any_in_service(endpoints):
            raise NoServer
        if self.shed_early and (rate := self.dispatch_rate()) is not None:
            expected = q.ahead_of(w.priority, w.flow) / rate
            if expected > self.max_wait:
                self.shed_counts[EXPECTED_WAIT] += 1
                raise Shed(
                    EXPECTED_WAIT,
                    self.retry_after(expected),
                    f"the pool is overloaded: the expected wait ({expected:.0f} s) exceeds "
                    f"max_wait ({self.max_wait:g} s)",
                )
        if q.size >= self.max_queue:
            victim = q.victim_for(w.priority, w.flow)
            if victim is None:
                self.shed_counts[QUEUE_FULL] += 1
                raise Shed(
                    QUEUE_FULL,
                    self.retry_after(None),
                    f"the pool is overloaded: {q.size} requests are already waiting",
                )
            q.remove(victim)
            self._shed(victim, QUEUE_FULL, shed)
        w.deadline = now + self.max_wait
        q.push(w)
        self._seq += 1
        heapq.heappush(self._deadlines, (w.deadline, self._seq, w))
        if q.size > 1:  # else it was just tried
            self.drain(endpoints, now, binder)
        return False

    def drain(self, endpoints: list[Endpoint], now: float, binder: Binder) -> int:
        """Dispatch waiting requests while backends can take them; returns how many."""
        q = self.queue
        if not q.size:
            return 0
        self._tick(now)
        serving = [ep for ep in endpoints if ep.healthy and not ep.draining]
        # Every request needs a backend that decodes it (a P/D pair too: its decode side).
        decoders = [ep for ep in serving if ep.role != "prefill"] if self.disaggregated else serving
        ranks: dict[int, Decision | None] = {}  # routing of each waiter, once per drain
        n = 0
        while q.size and any(self.can_take(ep, now, True) for ep in decoders):
            # A request whose own backend has room goes before one that would go cold
            # (its affinity wait over): under overload most requests are shed anyway, and
            # serving the cheap ones keeps every backend's cache on its own prefixes.
            spill: tuple[Waiter, Decision, Endpoint] | None = None
            for w in q.scan(_SCAN):
                choice = self._choose(w, serving, now, binder, queued=True, ranks=ranks)
                if choice is None:
                    continue
                decision, alt = choice
                if alt is None:
                    self._bind(w, decision, now, binder)
                    break
                if spill is None:
                    spill = (w, decision, alt)
            else:
                if spill is None:
                    break  # everyone tried waits for a backend that is full
                w, decision, alt = spill
                decision.choose(alt)
                self._bind(w, decision, now, binder)
            q.remove(w, rotate=True)
            self._backlog_count += 1.0
            n += 1
        self.dispatched_queued += n
        return n

    def _try(
        self, w: Waiter, serving: list[Endpoint], now: float, binder: Binder, queued: bool
    ) -> bool:
        """Dispatch `w` if the rule above lets it go now."""
        choice = self._choose(w, serving, now, binder, queued)
        if choice is None:
            return False
        decision, alt = choice
        if alt is not None:
            decision.choose(alt)
        self._bind(w, decision, now, binder)
        return True

    def _choose(
        self,
        w: Waiter,
        serving: list[Endpoint],
        now: float,
        binder: Binder,
        queued: bool,
        ranks: dict[int, Decision | None] | None = None,
    ) -> tuple[Decision, Endpoint | None] | None:
        """Where `w` may go now: (its decision, None) for the routing's first choice or a
        backend as good; (decision, alt) to go to `alt` instead, its affinity wait over;
        None to wait."""
        if ranks is not None and id(w) in ranks:
            decision = ranks[id(w)]
        else:
            decision = binder.rank(w, serving, now)
            if ranks is not None:
                ranks[id(w)] = decision
        if decision is None:
            return None
        best = decision.endpoint
        priv = queued and self._privileged(w)
        # A split request's decision is its prefill side's (its decode side has room):
        # held for its cached prefill backend by the same rule.
        if w.pair:
            if self.can_prefill(best, now):
                return decision, None
            alt = next((ep for ep in decision.ranked if self.can_prefill(ep, now)), None)
        else:
            if self.can_take(best, now, priv):
                return decision, None
            alt = next((ep for ep in decision.ranked if self.can_take(ep, now, priv)), None)
        if alt is None:
            return None
        gap = decision.total_of(best) - decision.total_of(alt)
        # Priority and fairness come before cache affinity: a privileged request does
        # not hold out for its backend.
        if priv or gap <= self.affinity_margin:
            decision.choose(alt)
            return decision, None
        if w.held_since is None:
            w.held_since = now
        if now - w.held_since < self.affinity_wait:
            return None
        return decision, alt

    def _bind(self, w: Waiter, decision: Decision, now: float, binder: Binder) -> None:
        w.state, w.dispatched_at = DISPATCHED, now
        binder.bind(w, decision, now)
        if not w.pair:  # a pair's: counted by `bind_pair`
            self.limiter(decision.endpoint).sent_tokens += w.tokens
        if w.max_tokens > 0:
            a = self._asked_tokens
            self._asked_tokens = (
                float(w.max_tokens) if a is None else a + _RAMP_WEIGHT * (w.max_tokens - a)
            )

    def _privileged(self, w: Waiter) -> bool:
        """A waiting request of a higher band than the lowest one waiting, or of a flow with
        fewer requests waiting than the longest flow of its band: the requests that
        priority and fairness are for. They may use the headroom above the limits, so
        that they are not stuck behind a backlog until slots free up."""
        return self.queue.outranks(w)

    def expire(self, now: float, shed: ShedFn) -> int:
        """Shed the requests whose `max_wait` has passed; returns how many."""
        self._tick(now)
        heap = self._deadlines
        n = 0
        while heap and heap[0][0] <= now:
            w = heapq.heappop(heap)[2]
            if w.state == QUEUED and self.queue.remove(w):
                self._shed(w, MAX_WAIT, shed)
                n += 1
        return n

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do (None: nobody waits)."""
        heap = self._deadlines
        while heap and heap[0][2].state != QUEUED:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def cancel(self, w: Waiter, now: float) -> bool:
        """The client left: take the request out if it still waits; True if it did."""
        if w.state != QUEUED:
            return False
        self._tick(now)
        self.queue.remove(w)
        w.state = CANCELLED
        self.shed_counts[CLIENT_LEFT] += 1
        return True

    # ---------------------------------------------------------------- rates
    def dispatch_rate(self) -> float | None:
        """Requests/s dispatched while requests waited; None until measured."""
        if self._backlog_time < _RATE_MIN_TIME or self._backlog_count < _RATE_MIN_COUNT:
            return None
        return self._backlog_count / self._backlog_time

    def _tick(self, now: float) -> None:
        dt = now - self._t_last
        if dt <= 0:
            return
        self._t_last = now
        if self.queue.size:
            d = math.exp(-dt / _RATE_TAU)
            self._backlog_count *= d
            self._backlog_time = self._backlog_time * d + _RATE_TAU * (1.0 - d)

    def retry_after(self, expected: float | None = None) -> int:
        """Seconds a shed client should wait: the expected wait, within [1, max_wait]."""
        if expected is None:
            rate = self.dispatch_rate()
            expected = self.queue.size / rate if rate else 1.0
        return max(1, min(math.ceil(expected), math.ceil(self.max_wait)))

    def _shed(self, w: Waiter, reason: str, shed: ShedFn) -> None:
        w.state, w.shed_reason = SHED, reason
        self.shed_counts[reason] += 1
        shed(w)
