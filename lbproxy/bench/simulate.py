"""Offline fleet simulator: every backend's engine model in virtual time, routed by the
very same `lbproxy.routing` code the proxy runs, fed as the proxy would be.

One discrete-event loop over all engines (a heap of step ends, metrics scrapes and KV-event
deliveries, merged with the sorted Poisson arrivals):

- Arrival: build a `RequestContext` like the proxy does (body, session key, prompt bytes
  on demand, token ids known up front), call `Router.route(ctx, endpoints, now)`, count
  the request in `Endpoint.in_flight` (exact, like the proxy, until its last token) and
  hand it to the chosen engine.
- Engine step end: `engine.step(t)`; each token output is recorded (first token, gaps,
  finish), and the engine's next step end is scheduled.
- Scrape: every `scrape_interval` virtual seconds per endpoint (each with its own phase,
  as independent pollers are), `Endpoint.metrics` is replaced by a snapshot of the engine,
  so routing sees load that ages exactly like real scrapes.
- KV events: drained after every engine call and applied to the precise prefix index
  (when the profile has one) `kv_event_delay` seconds later.

- Flow control (when given, as the proxy runs it by default): arrivals go through the same
  `lbproxy.flow.FlowController` the proxy drives, in virtual time: held while no backend
  can take more work, dispatched (routed among the backends that can) when a request
  ends or a scrape lands, shed with "429" (`rejected`) when the queue is full or a
  request waited `max_wait`; each record keeps its queue wait.

- Prefill/decode disaggregation (a fleet with backend `role`s or `disaggregation:`): each
  arrival gets the pool's P/D decision from `lbproxy.routing.disagg`, the proxy's own. A
  split request is a prefill on the prefill backend (max_tokens 1, its KV held: the
  engine's `hold_kv`), then, when that answer lands, the decode on the decode backend,
  whose engine pulls the prompt's KV over the fleet's link for the vendor pair
  (`remote_kv_gbps`: bytes / bandwidth) and decodes without recomputing it; the
  producer's blocks are freed when the pull completes. Otherwise the request is routed
  aggregated among the decode-capable backends. With flow control a split request is
  held and dispatched as a pair (a decode backend that can take it, and the prefill
  backend flow control's rule picks for its prefill leg: `FlowController.can_prefill`,
  with cache affinity; both slots counted at once, the decode one reserved until its leg
  starts, each freed when its leg ends) and shed as one. Flow control on or off, each
  prefill leg counts its uncached prompt tokens on its backend (`Endpoint.prefill_tokens`,
  `routing.disagg.prefill_leg_*`) until its answer lands, as the proxy's legs do; so
  does an aggregated request on a `role: both` backend, until its first token.
  Each step's `pd` entry counts the decisions and gives prefill time, decode TTFT and
  transfer time, as the proxy's P/D metrics do.

A rate step ends when every request finished, or at its deadline (`duration + drain`),
where the rest (waiting in the flow queue or running) are aborted and recorded as
incomplete; the next step starts there, on the same warm fleet, as a live `lbproxy bench`
ladder does. Each routing profile runs on a fresh fleet. Results go through the same
`stats.summarize_step` as live.
"""

from __future__ import annotations

import gc
import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbproxy.bench.mix import TrafficClass, class_sequence
from lbproxy.bench.pd_stats import PDStats
from lbproxy.bench.report import RunResult, StepResult
from lbproxy.bench.stats import RequestRecord, poisson_arrivals, summarize_step
from lbproxy.bench.workloads import Workload
from lbproxy.config import Disaggregation, FlowControl, Signals
from lbproxy.flow.controller import FlowController, NoServer, Shed, thresholds_for
from lbproxy.flow.queue import QUEUED, Waiter
from lbproxy.routing.disagg import (
    DisaggPlan,
    DisaggRouter,
    decode_capable,
    prefill_leg_ended,
    prefill_leg_started,
)
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.profiles import ProfileSpec, build_router
from lbproxy.routing.state import Decision, Endpoint, MetricsSnapshot, RequestContext
from lbproxy.sim.engine import Engine, EngineRequest
from lbproxy.sim.fleet import FleetSpec, check_roles
from lbproxy.sim.stream_chunks import chunk_due
from lbproxy.tokenization.tokenizer import Tokenizer

_DEFAULT_SIGNALS = Signals()

# Heap entry kinds; at equal times engines finish their steps first, then scrapes see the
# result, then KV events land, then flow-control deadlines pass.
_STEP, _SCRAPE, _KV, _DEADLINE, _RELEASE = 0, 1, 2, 3, 4


@dataclass(slots=True)
class SimOptions:
    scrape_interval: float = _DEFAULT_SIGNALS.metrics_interval
    metrics_max_age: float = _DEFAULT_SIGNALS.metrics_max_age
    kv_event_delay: float = 0.002  # publish -> ZMQ -> subscriber -> index
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.scrape_interval > 0:
            raise ValueError(f"scrape_interval must be > 0, got {self.scrape_interval}")
        if not self.metrics_max_age > 0:
            raise ValueError(f"metrics_max_age must be > 0, got {self.metrics_max_age}")
        if self.kv_event_delay < 0:
            raise ValueError(f"kv_event_delay must be >= 0, got {self.kv_event_delay}")


@dataclass(slots=True)
class _Live:
    """A request in an engine, and what has been seen of it so far."""

    rec: RequestRecord
    ep: int
    t0: float  # step start (records are relative to it)
    interval: int  # the backend's stream_interval: tokens per SSE chunk
    last: float = -1.0  # time of the last chunk
    pending: int = 0  # tokens not yet sent in a chunk
    itl: list[float] = field(default_factory=list)
    pd: _Split | None = None  # the decode leg of a split request
    # P/D fleets: an aggregated request's uncached prompt tokens, counted in its `both`
    # backend's prefill_tokens until its first token.
    prefill: int = 0
    started: float = 0.0  # when it was sent to the engine (flow control's lifetimes)


@dataclass(slots=True)
class _Arrival:
    """A request as it arrives: what routing and the engine need, and its record."""

    ctx: RequestContext
    ids: list[int]
    max_tokens: int
    rec: RequestRecord
    t0: float  # its step's start (records are relative to it)
    split: bool = False  # the P/D decision at arrival: serve it as a pair
    dec: Decision | None = None  # flow control: the decode side of its last ranking
    # Its P/D plan at arrival: a split's, for flow control's first try; an aggregated
    # one's, for the uncached figure its prefill counts.
    plan: DisaggPlan | None = None


@dataclass(slots=True)
class _Split:
    """A split request between its legs."""

    a: _Arrival
    p: int  # the prefill engine
    d: Endpoint  # where the decode goes
    t_sent: float  # prefill sent
    reserved: bool  # flow control counted the decode slot at dispatch
    uncached: int = 0  # the prefill leg's uncached tokens (its prefill_tokens, flow control)
    prefill_id: str = ""  # the prefill's engine request id (its held blocks)
    t_decode: float = 0.0  # decode sent


class FleetSimulator:
    """A fleet of engines behind one router; `run_step` plays one rate step.

    Virtual time starts at 0 and only moves forward; state (caches, router, in-flight
    counts) carries over from one step to the next.
    """

    def __init__(
        self,
        fleet: FleetSpec,
        profile: str | ProfileSpec,
        *,
        tokenizer: Tokenizer | None = None,
        options: SimOptions | None = None,
        pool: str = "sim",
        flow: FlowControl | None = None,
    ) -> None:
        self.options = opts = options or SimOptions()
        self.fleet = fleet
        vocab = tokenizer.vocab_size if tokenizer is not None else 32000
        self.engines = [Engine(b.profile, seed=b.seed, vocab_size=vocab) for b in fleet.backends]
        self.endpoints = [
            Endpoint(
                name=b.name,
                url=f"http://127.0.0.1:{b.port}",
                vendor=b.profile.name,
                pool=pool,
                role=b.role,
            )
            for b in fleet.backends
        ]
        # What aggregated requests are routed over (the proxy's `serving`).
        self.serving = [ep for ep in self.endpoints if decode_capable(ep)]
        self.bctx = BuildContext(
            pool=pool,
            model=fleet.model,
            metrics_max_age=opts.metrics_max_age,
            tokenizer=tokenizer,
            shared={},
            flow_control=flow is not None and flow.enabled,
        )
        self.router: Router = build_router(profile, self.bctx, seed=opts.seed)
        self.profile_name = self.router.profile_name
        self.disagg: DisaggRouter | None = None
        if fleet.disaggregated:
            check_roles(fleet)
            dis = fleet.disaggregation or Disaggregation()
            self.disagg = DisaggRouter(
                build_router(dis.prefill_routing, self.bctx, seed=opts.seed),
                build_router(dis.decode_routing, self.bctx, seed=opts.seed),
                dis.min_prompt_tokens,
            )
        self._prefills: dict[str, _Split] = {}  # prefill legs running, by engine request id
        self._holds: dict[str, tuple[int, str]] = {}  # decode id -> producer, prefill id
        self.pd = PDStats()  # this step's P/D figures
        self.precise = self.bctx.shared.get("precise_index")
        self.flow: FlowController | None = None
        if flow is not None and flow.enabled:
            self.flow = FlowController(flow, thresholds_for(self.router, opts.metrics_max_age))
            self.flow.disaggregated = self.disagg is not None
        self._armed: float | None = None  # the flow deadline an event is queued for
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._sched: list[float | None] = [None] * len(self.engines)
        self._live: dict[str, _Live] = {}
        self._waiting: dict[int, Waiter] = {}  # held by flow control, by id()
        self.rejected = 0  # requests shed by flow control, all steps
        self._next_id = 0
        self._index = {id(ep): i for i, ep in enumerate(self.endpoints)}
        self.routed = [0] * len(self.engines)  # requests per endpoint, all steps
        self.finished = 0  # requests that completed, all steps
        # Like the proxy's first scrape at start-up, then each poller on its own phase.
        phase = random.Random(opts.seed).random
        for i in range(len(self.engines)):
            self._scrape(i, 0.0)
            self._push(opts.scrape_interval * phase(), _SCRAPE, i)

    # ---------------------------------------------------------------- plumbing
    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def _reschedule(self, i: int) -> None:
        t = self.engines[i].next_event_time()
        if t is not None and t != self._sched[i]:
            self._sched[i] = t
            self._push(t, _STEP, i)

    def _drain_kv(self, i: int, t: float) -> None:
        """After every engine call: its KV events, and the remote-KV pulls it started."""
        e = self.engines[i]
        events = e.drain_kv_events()
        if events and self.precise is not None:
            self._push(t + self.options.kv_event_delay, _KV, (self.endpoints[i].name, events))
        if self.disagg is not None:
            for rid, done, secs in e.drain_pulls():
                held = self._holds.pop(rid, None)
                if held is not None:  # the producer frees its blocks once they are read
                    self._push(done, _RELEASE, held)
                    self.pd.kv_transfer_s.append(secs)

    def _scrape(self, i: int, t: float) -> None:
        e = self.engines[i]
        p = e.profile
        ep = self.endpoints[i]
        ep.metrics = MetricsSnapshot(
            time=t,
            num_running=float(e.num_running),
            num_waiting=float(e.num_waiting),
            kv_cache_usage=e.kv_cache_usage,
            block_size=p.block_size,
            num_gpu_blocks=p.num_gpu_blocks,
            prefix_cache_queries=float(e.prefix_cache_queries),
            prefix_cache_hits=float(e.prefix_cache_hits),
            prompt_tokens=float(e.prompt_tokens),
            generation_tokens=float(e.generation_tokens),
            num_preemptions=float(e.num_preemptions),
            itl_sum=e.itl_sum,
            itl_count=float(e.itl_count),
        )
        # The scraper copies the geometry of vllm:cache_config_info to the endpoint.
        ep.block_size = p.block_size
        ep.num_gpu_blocks = p.num_gpu_blocks

    # ---------------------------------------------------------------- events
    def _on_step(self, i: int, t: float) -> None:
        self._sched[i] = None
        outputs = self.engines[i].step(t)
        live = self._live
        ended = False  # a request left this engine (flow control's cue)
        for out in outputs:
            st = live.get(out.request_id)
            if st is None:
                pd = self._prefills.pop(out.request_id, None) if self._prefills else None
                if pd is not None:  # max_tokens 1: the prefill answered
                    self._prefilled(pd, out.num_cached_tokens, t)
                    ended = True
                continue
            rec = st.rec
            rel = t - st.t0
            n = len(out.new_token_ids)
            rec.output_tokens += n
            # Chunks as the server streams them; ITL is the gap between chunks.
            st.pending += n
            first = st.last < 0
            if chunk_due(st.pending, st.interval, first=first, finished=out.finished):
                if first:
                    rec.first_token = rel
                    if st.pd is None:
                        rec.cached_tokens = out.num_cached_tokens
                        if st.prefill:  # its prefill is done (the proxy's first byte)
                            prefill_leg_ended(self.endpoints[st.ep], st.prefill)
                            st.prefill = 0
                    else:
                        self.pd.decode_ttft_s.append(t - st.pd.t_decode)
                else:
                    st.itl.append(rel - st.last)
                st.last = rel
                st.pending = 0
            if out.finished:
                rec.end = rel
                rec.itl = st.itl
                ep = self.endpoints[st.ep]
                ep.in_flight -= 1
                if self.flow is not None:
                    self.flow.on_done(ep, True, now=t, started=st.started)
                ended = True
                self.finished += 1
                del live[out.request_id]
        self._drain_kv(i, t)
        self._reschedule(i)
        # Like the proxy, whose queue wakes when a request ends (not at every streamed
        # token): a step that ended nothing changed nothing flow control reads.
        if ended and self.flow is not None:
            self._flow_drain(t)

    def _arrive(self, a: _Arrival, t: float, klass: TrafficClass | None = None) -> None:
        rec = a.rec
        candidates = self.endpoints
        if self.disagg is not None:
            plan = self.disagg.plan(a.ctx, self.endpoints, t)
            self.pd.reasons[plan.reason] += 1
            if plan.disaggregated:
                assert plan.prefill is not None and plan.decode is not None
                if self.flow is None:
                    self._start_split(
                        a,
                        t,
                        plan.prefill.endpoint,
                        plan.decode.endpoint,
                        False,
                        plan.uncached_tokens,
                    )
                    return
                a.split, a.plan = True, plan
            else:
                a.plan = plan
                candidates = self.serving
        if self.flow is None:
            decision = self.router.route(a.ctx, candidates, t)
            if decision is None:
                rec.status, rec.error, rec.end = "error", "no backend", t - a.t0
                return
            self._start(a, t, decision.endpoint)
            return
        w = Waiter(
            priority=klass.priority if klass else 0,
            flow=klass.name if klass else "",
            arrival=t,
            deadline=t,
            payload=a,
            tokens=len(a.ids),
            max_tokens=a.max_tokens,
            pair=a.split,
        )
        try:
            if not self.flow.admit(w, self.endpoints, t, self, self._shed) and w.state == QUEUED:
                self._waiting[id(w)] = w  # (it may have gone or been shed inside admit)
                self._arm()
        except Shed:
            rec.status, rec.error, rec.end = "rejected", "429", t - a.t0
            self.rejected += 1
        except NoServer:
            rec.status, rec.error, rec.end = "error", "no backend", t - a.t0

    def _start_split(
        self,
        a: _Arrival,
        t: float,
        p_ep: Endpoint,
        d_ep: Endpoint,
        reserved: bool,
        uncached: int = 0,
    ) -> None:
        """Send the prefill leg (its KV held for the decode) to `p_ep`'s engine."""
        assert self.disagg is not None
        i = self._index[id(p_ep)]
        p_ep.in_flight += 1
        prefill_leg_started(p_ep, uncached)
        self.routed[i] += 1
        self.disagg.prefill.commit(a.ctx, p_ep, t)
        self._next_id += 1
        rid = str(self._next_id)
        req = EngineRequest(rid, a.ids, 1, arrival_time=t, hold_kv=True)
        self.engines[i].add_request(req, t)
        self._prefills[rid] = _Split(a, i, d_ep, t, reserved, uncached, rid)
        self._drain_kv(i, t)
        self._reschedule(i)

    def _prefilled(self, pd: _Split, cached: int, t: float) -> None:
        """The prefill answered: free its slot and send the decode, which pulls the KV."""
        assert self.disagg is not None
        p_ep = self.endpoints[pd.p]
        p_ep.in_flight -= 1
        prefill_leg_ended(p_ep, pd.uncached)
        if self.flow is not None:
            self.flow.on_done(p_ep, True, now=t, prefill=pd.uncached, started=pd.t_sent)
            self.flow.decode_started(pd.d)  # its reserved slot now decodes
        a, d_ep = pd.a, pd.d
        a.rec.cached_tokens = cached  # what the prefill reused of its prefix cache
        self.pd.prefill_s.append(t - pd.t_sent)
        j = self._index[id(d_ep)]
        if not pd.reserved:
            d_ep.in_flight += 1
        self.routed[j] += 1
        self.disagg.decode.commit(a.ctx, d_ep, t)
        self.pd.pairs[f"{p_ep.name}->{d_ep.name}"] += 1
        a.rec.backend = d_ep.name
        gbps = self.fleet.links.gbps(d_ep.vendor, p_ep.vendor)
        self._next_id += 1
        rid = str(self._next_id)
        pd.t_decode = t
        self._holds[rid] = (pd.p, pd.prefill_id)
        req = EngineRequest(rid, a.ids, a.max_tokens, arrival_time=t, remote_kv_gbps=gbps)
        self._live[rid] = _Live(
            a.rec, j, a.t0, self.fleet.backends[j].stream_interval, pd=pd, started=t
        )
        self.engines[j].add_request(req, t)
        self._drain_kv(j, t)
        self._reschedule(j)

    def _release(self, i: int, prefill_id: str, t: float) -> None:
        if self.engines[i].release_held(prefill_id, t):
            self._drain_kv(i, t)
            self._reschedule(i)
            if self.flow is not None:
                self._flow_drain(t)

    def _start(self, a: _Arrival, t: float, ep: Endpoint) -> None:
        """Hand the request to `ep`'s engine (counted in its in_flight until it ends)."""
        i = self._index[id(ep)]
        ep.in_flight += 1
        self.routed[i] += 1
        a.rec.backend = ep.name
        self._next_id += 1
        rid = str(self._next_id)
        self.engines[i].add_request(EngineRequest(rid, a.ids, a.max_tokens, arrival_time=t), t)
        st = _Live(a.rec, i, a.t0, self.fleet.backends[i].stream_interval, started=t)
        self._live[rid] = st
        if self.disagg is not None and ep.role == "both":
            # It prefills here as a split's prefill leg would: the same count, and the
            # plan's figure when the decision ranked this backend first (as the proxy).
            plan = a.plan
            if plan is not None and plan.prefill is not None and plan.prefill.endpoint is ep:
                st.prefill = plan.uncached_tokens
            else:
                st.prefill = self.disagg.uncached_tokens(a.ctx, ep)
            prefill_leg_started(ep, st.prefill)
        self._drain_kv(i, t)
        self._reschedule(i)

    # ---------------------------------------------------------------- flow control
    def rank(self, w: Waiter, candidates: list[Endpoint], now: float) -> Decision | None:
        a: _Arrival = w.payload
        if self.disagg is None:
            return self.router.rank(a.ctx, candidates, now, gates=False)
        if not a.split:
            eps = [ep for ep in candidates if decode_capable(ep)]
            return self.router.rank(a.ctx, eps, now, gates=False)
        flow = self.flow
        assert flow is not None
        plan, a.plan = a.plan, None
        pair = self.disagg.rank_pair(
            a.ctx, candidates, now, lambda ep: flow.can_take(ep, now), plan
        )
        if pair is None:
            return None
        a.dec = pair[1]
        return pair[0]  # flow control chooses the prefill side and binds by it

    def bind(self, w: Waiter, decision: Decision, now: float) -> None:
        self._waiting.pop(id(w), None)
        a: _Arrival = w.payload
        a.rec.queue_wait = now - w.arrival
        if a.split:
            self._bind_pair(w, a, decision.endpoint, now)
            return
        self.router.commit(a.ctx, decision.endpoint, now)
        self._start(a, now, decision.endpoint)

    def _bind_pair(self, w: Waiter, a: _Arrival, p_ep: Endpoint, now: float) -> None:
        """Dispatch a split request as one: both slots counted now (the prefill's by its
        leg, the decode's reserved until its leg ends), never one side alone."""
        flow, disagg = self.flow, self.disagg
        assert flow is not None and disagg is not None and a.dec is not None
        dec = disagg.pick_decode(
            a.ctx, a.dec, p_ep, self.endpoints, now, lambda ep: flow.can_take(ep, now)
        )
        assert dec is not None  # rank_pair leaves every prefill side a partner
        d_ep = dec.endpoint
        uncached = disagg.uncached_tokens(a.ctx, p_ep)
        flow.bind_pair(p_ep, d_ep, uncached, w.tokens, now)
        d_ep.in_flight += 1
        self._start_split(a, now, p_ep, d_ep, True, uncached)

    def _shed(self, w: Waiter) -> None:
        self._waiting.pop(id(w), None)
        rec, t0 = w.payload.rec, w.payload.t0
        rec.status, rec.error = "rejected", "429"
        rec.end = self.now - t0
        self.rejected += 1
        rec.queue_wait = self.now - w.arrival

    def _flow_drain(self, t: float) -> None:
        flow = self.flow
        assert flow is not None
        if flow.queue.size:
            flow.drain(self.endpoints, t, self)
            self._arm()

    def _arm(self) -> None:
        """Queue an event for the next flow-control deadline, unless one is queued."""
        t = self.flow.next_deadline()  # type: ignore[union-attr]
        if t is not None and (self._armed is None or t < self._armed):
            self._armed = t
            self._push(t, _DEADLINE, t)

    # ---------------------------------------------------------------- a rate step
    def run_step(
        self,
        workload: Workload,
        arrivals: Sequence[float],
        *,
        first_index: int,
        deadline: float,
        model: str | None = None,
        on_done: Callable[[int], None] | None = None,
        mix: list[TrafficClass] | None = None,
    ) -> list[RequestRecord]:
        """Offer `arrivals` (seconds from now) of workload requests first_index, ...;
        return one record per request, times relative to the step's start."""
        # The loop allocates millions of short-lived objects and no cycles: the cyclic GC's
        # full passes over the growing heap would cost ~30% of the run for nothing.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run_step(workload, arrivals, first_index, deadline, model, on_done, mix)
        finally:
            if enabled:
                gc.enable()

    def _run_step(
        self,
        workload: Workload,
        arrivals: Sequence[float],
        first_index: int,
        deadline: float,
        model: str | None,
        on_done: Callable[[int], None] | None,
        mix: list[TrafficClass] | None,
    ) -> list[RequestRecord]:
        t0 = self.now
        classes = (
            class_sequence(mix, first_index, len(arrivals), self.options.seed) if mix else None
        )
        model = model or self.fleet.model
        records: list[RequestRecord] = []
        heap = self._heap
        pop = heapq.heappop
        n_arr = len(arrivals)
        a = 0
        end = t0 + deadline
        interval = self.options.scrape_interval
        live = self._live
        waiting = self._waiting
        reported = self.finished + self.rejected
        while True:
            next_arrival = t0 + arrivals[a] if a < n_arr else float("inf")
            if a >= n_arr and not live and not waiting and not self._prefills:
                break
            t_heap = heap[0][0] if heap else float("inf")
            if min(next_arrival, t_heap) >= end:
                break
            if next_arrival < t_heap:
                t = next_arrival
                self.now = t
                req = workload.request(first_index + a)
                ids = workload.token_ids(first_index + a)
                rec = RequestRecord(start=t - t0, prompt_tokens=len(ids))
                klass = classes[a] if classes is not None else None
                if klass is not None:
                    rec.klass = klass.name
                records.append(rec)
                ctx = RequestContext(
                    model=model,
                    body=req.body(model),
                    route=req.route,
                    session_key=req.session,
                    request_id=str(first_index + a),
                    max_tokens=req.max_tokens,
                    prompt_token_estimate=len(ids),
                    _token_ids=ids,
                )
                self._arrive(_Arrival(ctx, ids, req.max_tokens, rec, t0), t, klass)
                a += 1
                continue
            t, kind, _, payload = pop(heap)
            self.now = t
            if kind == _STEP:
                if self._sched[payload] == t:
                    self._on_step(payload, t)
                    if on_done is not None and self.finished + self.rejected != reported:
                        on_done(self.finished + self.rejected - reported)
                        reported = self.finished + self.rejected
            elif kind == _SCRAPE:
                self._scrape(payload, t)
                self._push(t + interval, _SCRAPE, payload)
                if self.flow is not None:
                    self.flow.on_metrics(self.endpoints[payload])
                    self._flow_drain(t)
            elif kind == _RELEASE:
                self._release(payload[0], payload[1], t)
            elif kind == _DEADLINE:
                if payload == self._armed:
                    self._armed = None
                    self.flow.expire(t, self._shed)  # type: ignore[union-attr]
                    self._arm()
            else:
                name, events = payload
                self.precise.apply_events(name, events)  # type: ignore[union-attr]

        if waiting:  # still held by flow control at the deadline: the client gives up
            self.now = max(self.now, end)
            for w in list(waiting.values()):
                self.flow.cancel(w, end)  # type: ignore[union-attr]
                rec = w.payload.rec
                rec.status, rec.end, rec.queue_wait = "incomplete", end - t0, end - w.arrival
            if on_done is not None:
                on_done(len(waiting))
            waiting.clear()
        if self._prefills:  # split requests still in their prefill: both legs go
            self.now = max(self.now, end)
            for rid, pd in list(self._prefills.items()):
                self.engines[pd.p].abort(rid, end)
                self.endpoints[pd.p].in_flight -= 1
                prefill_leg_ended(self.endpoints[pd.p], pd.uncached)
                if pd.reserved:
                    pd.d.in_flight -= 1
                    flow = self.flow
                    assert flow is not None
                    flow.on_done(self.endpoints[pd.p], False, prefill=pd.uncached)
                    flow.decode_started(pd.d)
                    flow.on_done(pd.d, False)
                pd.a.rec.status, pd.a.rec.end = "incomplete", end - t0
            if on_done is not None:
                on_done(len(self._prefills))
            self._prefills.clear()
        if live:  # the deadline: abort what is left, as the client's disconnect would
            self.now = max(self.now, end)
            for rid, st in list(live.items()):
                i = st.ep
                self.engines[i].abort(rid, end)
                st.rec.status = "incomplete"
                st.rec.end = end - t0
                st.rec.itl = st.itl
                st.rec.output_tokens -= st.pending  # generated, not yet sent in a chunk
                self.endpoints[i].in_flight -= 1
                if st.prefill:  # aborted before its first token
                    prefill_leg_ended(self.endpoints[i], st.prefill)
                    st.prefill = 0
                held = self._holds.pop(rid, None)
                if held is not None:  # never pulled: the producer's hold ends
                    self.engines[held[0]].release_held(held[1], end)
            if on_done is not None:
                on_done(len(live))
            live.clear()
            for i in range(len(self.engines)):
                self.engines[i].step(end)  # steps that ended meanwhile: outputs discarded
                self._drain_kv(i, end)
                self._reschedule(i)
        return records


# A callback per rate step: (run label, rate, requests offered) -> advance(n finished).
StepProgress = Callable[[str, float, int], Callable[[int], None]]


def simulate_run(
    fleet: FleetSpec,
    workload: Workload,
    profile: str | ProfileSpec,
    rates: Sequence[float],
    *,
    duration: float,
    drain: float | None = None,
    max_requests: int | None = None,
    tokenizer: Tokenizer | None = None,
    options: SimOptions | None = None,
    label: str | None = None,
    target: str = "",
    progress: StepProgress | None = None,
    flow: FlowControl | None = None,
    mix: list[TrafficClass] | None = None,
    slo_ttft: float = 5.0,
    slo_itl: float = 0.1,
    warmup: float = 0.0,
) -> RunResult:
    """One routing profile over the rate ladder, on a fresh fleet: a results.json run.

    `flow`: flow-control settings (None or `enabled: false`: requests go straight to the
    router, as lbproxy without flow control); `mix`: traffic classes (tenants, priorities)."""
    opts = options or SimOptions()
    sim = FleetSimulator(fleet, profile, tokenizer=tokenizer, options=opts, flow=flow)
    name = sim.profile_name
    label = label or name
    drain = duration if drain is None else drain
    steps: list[StepResult] = []
    index = 0
    for k, rate in enumerate(rates):
        arrivals = poisson_arrivals(rate, duration, opts.seed + k, max_requests=max_requests)
        advance = progress(label, rate, len(arrivals)) if progress else None
        before = list(sim.routed)
        records = sim.run_step(
            workload,
            arrivals,
            first_index=index,
            deadline=duration + drain,
            on_done=advance,
            mix=mix,
        )
        index += len(arrivals)
        step = summarize_step(
            records,
            rate=rate,
            duration=duration,
            slo_ttft=slo_ttft,
            slo_itl=slo_itl,
            warmup=warmup,
        )
        step["backends"] = {
            ep.name: sim.routed[i] - before[i] for i, ep in enumerate(sim.endpoints)
        }
        if sim.disagg is not None:
            step["pd"] = sim.pd.summary()
        sim.pd = PDStats()
        steps.append(step)  # type: ignore[arg-type]
    return RunResult(profile=name, label=label, target=target, steps=steps)
