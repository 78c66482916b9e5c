"""A backend's concurrency limit that adapts to what the backend sustains.

In the spirit of Netflix's gradient limiter and Envoy's adaptive concurrency filter, with
the latency an LLM server's users feel: the decode (inter-token) latency, read from the
backend's own counters (`routing.decode_rate`), rather than a request's whole latency,
which mostly depends on how many tokens it asks for.

After each fresh scrape with a known decode latency `itl` at `running` requests:

    estimate = running x target_itl / itl

the batch at which the latency would meet the target if it grew in proportion to the
batch. Decode steps cost a fixed part (weights) plus a part per sequence (KV reads), so the
latency grows less than in proportion and iterating the estimate converges to the batch
where itl = target_itl from either side.

- Over the target: the limit moves toward the estimate (a share `smoothing` of the way).
- Under it, and the backend is using at least half its limit: the limit moves toward the
  estimate, by at most a factor `max_growth` per scrape, and only once the requests
  dispatched under the previous limit show in the backend's running count (the latency
  they cause is not measured before), so a limit cannot run ahead of its evidence.
- Under it with the limit unused: unchanged (an idle backend's latency says nothing about
  how much more it can take).
- No decode-latency estimate (new backend, stale or absent metrics): unchanged; a backend
  that never reports metrics grows by one per request completed while it uses at least
  half its limit, so it is ramped, never flooded.
- The engine preempting requests (`vllm:num_preemptions_total` grows: its KV cache ran
  out and running requests were evicted, to be recomputed): the limit drops to 90% of
  what runs, as for a 429.
- The engine queueing more than 2 requests itself (its KV cache or batch is full): the
  limit moves toward running + 2, so that what lbproxy holds back waits in lbproxy, in
  order, where it can still go to another backend, rather than in the engine for blocks.
- A backend answering 429/503 (overloaded) has its limit cut by a tenth.
- Growth above the highest limit a backend has had can be paced by the requests' expected
  duration (`ramp`, seconds, given by the controller while requests wait): the limit rises
  by at most its estimate x (time since the last snapshot) / ramp, so an empty backend
  fills over about one request's lifetime rather than in a second. Filled at once under a
  backlog, a backend's requests (of similar lengths) would all end together, free every
  slot at once and be replaced at once, cycle after cycle: a minute of 429s to everyone,
  then a burst of dispatches. Freed slots are refilled at once, and a limit that dipped
  regrows to its peak unpaced: only new room is paced.
- A limit the backend no longer uses is forgotten, as TCP forgets an idle congestion window
  (RFC 7661): while fewer than half of it are in flight, the part above twice what is in
  flight (and above `initial`) decays with time constant `idle_tau` (a quarter of the
  expected request lifetime, given by the controller), and the peak with it. Otherwise,
  after a lull (load falling off, or a benchmark's drain), the next surge would find every
  backend empty under its old limit, refill it at once and, requests being of similar
  lengths, form the cohorts that pacing prevents; a forgotten limit is regrown, paced.
- In a P/D pool (`flow.prefill_load`) the limit counts what decodes on the backend, not
  the prefill legs a `role: both` backend runs for others: those are taken out of its
  running and waiting counts, and a latency over the target while it ran any does not cut
  the limit (fewer decoding would not make its prefills cheaper). A decode slot reserved
  while its prefill runs elsewhere is not expected in the engine's running count before
  the limit may grow.
- `sent_tokens` counts the prompt tokens sent to the backend since its last scrape, for
  the controller's KV check (see `flow.controller`).

The limit starts at `initial` and stays within [min, max].
"""

from __future__ import annotations

import math

from lbproxy.config import ConcurrencyLimit
from lbproxy.routing.decode_rate import DecodeRate
from lbproxy.routing.state import MetricsSnapshot

# Smoothing of the latency estimate (seconds): short, because the limiter must see the
# effect of its own changes quickly.
_RATE_TAU = 0.5
# Requests an engine may hold waiting (those sent since its last step, about to be
# admitted); more, and it is not admitting them.
_ENGINE_QUEUE = 2


class ConcurrencyLimiter:
    __slots__ = (
        "adaptive",
        "decode",
        "hi",
        "initial",
        "itl",
        "limit",
        "lo",
        "max_growth",
        "metered",
        "peak",
        "preemptions",
        "sent_tokens",
        "smoothing",
        "t_snapshot",
        "target_itl",
    )

    def __init__(self, params: ConcurrencyLimit) -> None:
        self.adaptive = params.type == "gradient"
        self.lo, self.hi = float(params.min), float(max(params.min, params.max))
        self.limit = min(max(float(params.initial), self.lo), self.hi)
        self.initial = self.limit
        self.target_itl = params.target_itl
        self.smoothing = params.smoothing
        self.max_growth = params.max_growth
        self.decode = DecodeRate(_RATE_TAU)
        self.itl: float | None = None  # last decode-latency estimate (s/token)
        self.metered = False  # the backend has reported decode counters
        self.preemptions: float | None = None  # vllm:num_preemptions_total, last seen
        self.sent_tokens = 0  # prompt tokens dispatched since its last fresh snapshot
        self.t_snapshot: float | None = None  # time of the last snapshot folded in
        self.peak = self.limit  # the highest limit it has had (growth up to it is not paced)

    def value(self) -> int:
        return int(self.limit)

    def on_metrics(
        self,
        m: MetricsSnapshot,
        in_flight: int,
        queue_depth: float = 5.0,
        ramp: float | None = None,
        reserved: int = 0,
        prefill_legs: int = 0,
        prefill_seen: int = 0,
        idle_tau: float | None = None,
    ) -> bool:
        """Fold in a fresh snapshot; True if the limit changed. `ramp`: the seconds over
        which an empty backend may fill (None: growth is not paced). `idle_tau`: the time
        constant with which a limit left unused decays (None: it does not). In a P/D pool:
        `in_flight` counts what decodes here, `reserved` of it the decode slots whose
        prefill still runs elsewhere, `prefill_legs` the prefill legs it runs for others
        (`prefill_seen` the most since the last snapshot)."""
        if not self.decode.observe(m, in_flight):
            return False
        dt = 0.0 if self.t_snapshot is None else max(0.0, m.time - self.t_snapshot)
        self.t_snapshot = m.time
        self.metered = True
        self.sent_tokens = 0
        itl = self.itl = self.decode.itl()
        preempted = (
            m.num_preemptions is not None
            and self.preemptions is not None
            and m.num_preemptions > self.preemptions
        )
        if m.num_preemptions is not None:
            self.preemptions = m.num_preemptions
        if self.adaptive and idle_tau and dt > 0 and self.unused(in_flight):
            self._forget(in_flight, dt, idle_tau)
        old = self.limit
        if self.adaptive and preempted:
            # The engine ran out of KV blocks and evicted running requests (to recompute
            # them later): it was sent more than its cache holds. Back off below what runs.
            running = m.num_running if m.num_running is not None else in_flight
            self.limit = min(max(min(old, running) * 0.9, self.lo), self.hi)
            return int(self.limit) != int(old)
        if not self.adaptive or itl is None or itl <= 0:
            return False
        running = self.decode.running
        waiting = m.num_waiting
        if prefill_legs and waiting is not None:
            # Its prefill legs for others: those not waiting run in its batch.
            running = max(0.0, running - max(0.0, prefill_legs - waiting))
            waiting = max(0.0, waiting - prefill_legs)
        estimate = running * self.target_itl / itl
        if waiting is not None and waiting > _ENGINE_QUEUE:
            # The engine itself queues (its KV cache or batch is full): more in flight
            # only waits there, for blocks that free up when running requests end, while
            # lbproxy could have sent it elsewhere; so the limit follows what it runs.
            new = old + self.smoothing * (min(estimate, running + _ENGINE_QUEUE) - old)
            if new >= old:
                return False
        elif itl > self.target_itl:
            if prefill_seen:
                # Prefills it ran for others slow its decode steps: fewer decoding here
                # would not bring the latency down, only leave the backend idle.
                return False
            new = old + self.smoothing * (estimate - old)
        elif (
            estimate > old
            and in_flight >= 0.5 * old
            # Against the cap lbproxy enforces (the integer part): a limit of 2.6 lets 2
            # in flight, and 0.8 x 2.6 running would never be seen, so it could not grow.
            and running >= 0.8 * (int(old) - reserved)
        ):
            new = old + self.smoothing * (min(estimate, old * self.max_growth) - old)
            if ramp:  # paced only above the highest limit it has had
                new = min(new, max(self.peak, old + estimate * dt / ramp))
        else:
            return False
        self.limit = min(max(new, self.lo), self.hi)
        self.peak = max(self.peak, self.limit)
        return int(self.limit) != int(old)

    def unused(self, in_flight: int) -> bool:
        """Fewer than half of its limit in flight, the limit above what it forgets to."""
        return in_flight < 0.5 * self.limit and self.limit > max(self.initial, 2.0 * in_flight)

    def _forget(self, in_flight: int, dt: float, tau: float) -> None:
        floor = max(self.initial, 2.0 * in_flight)
        self.limit = floor + (self.limit - floor) * math.exp(-dt / tau)
        self.peak = min(self.peak, self.limit)

    def on_done(self, ok: bool, overloaded: bool, in_flight: int) -> bool:
        """A request on this backend ended; True if the limit changed."""
        old = self.limit
        if overloaded:
            self.limit = max(self.lo, old * 0.9)
        elif ok and self.adaptive and not self.metered and in_flight + 1 >= 0.5 * old:
            self.limit = min(self.hi, old + 1.0)
        return int(self.limit) != int(old)
