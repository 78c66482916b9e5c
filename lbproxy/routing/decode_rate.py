"""A backend's decode speed from its own counters: output-token rate and inter-token latency.

Shared by the `decode-latency` scorer and flow control's concurrency limiter, so both read
one estimate the same way. From consecutive snapshots, the output-token rate is the growth
of `vllm:generation_tokens_total` per second, smoothed with time constant `tau`; the
backend's current inter-token latency is then itl = num_running / rate: it counts the
hardware's speed, the batch and the context lengths being read, which neither waiting
counts nor KV usage do. Where the backend reports vLLM's inter-token latency histogram,
`itl()` is instead its mean over the last interval (growth of `_sum` / growth of
`_count`, smoothed the same way): exactly the latency users see, free of the estimate's
noise (a rate over a scrape interval spans only a few engine steps).
"""

from __future__ import annotations

import math

from lbproxy.routing.state import MetricsSnapshot


class DecodeRate:
    """One backend's track; `observe` folds each new snapshot in once."""

    __slots__ = (
        "generated",
        "hist_itl",
        "in_flight_at_scrape",
        "itl_count",
        "itl_sum",
        "rate",
        "running",
        "tau",
        "time",
    )

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = tau
        self.time: float | None = None  # of the last snapshot folded in
        self.generated = 0.0  # its cumulative generation tokens
        self.running = 0.0  # its num_running
        self.rate: float | None = None  # smoothed output tokens/s
        self.in_flight_at_scrape = 0  # the proxy's exact count when it was folded in
        self.itl_sum: float | None = None  # the histogram's _sum and _count, last seen
        self.itl_count = 0.0
        self.hist_itl: float | None = None  # smoothed mean ITL from the histogram

    def observe(self, m: MetricsSnapshot, in_flight: int) -> bool:
        """Fold `m` in if it is newer than the last one; True if it was."""
        if m.generation_tokens is None or m.num_running is None:
            return False
        if self.time is None or m.generation_tokens < self.generated:  # first sight, restart
            self.time, self.generated, self.rate = m.time, m.generation_tokens, None
            self.running, self.in_flight_at_scrape = m.num_running, in_flight
            self.itl_sum, self.itl_count, self.hist_itl = m.itl_sum, m.itl_count or 0.0, None
            return True
        dt = m.time - self.time
        if dt <= 0:
            return False
        inst = (m.generation_tokens - self.generated) / dt
        a = 1.0 - math.exp(-dt / self.tau)
        self.rate = inst if self.rate is None else self.rate + a * (inst - self.rate)
        if m.itl_sum is not None and m.itl_count is not None and self.itl_sum is not None:
            dc = m.itl_count - self.itl_count
            if dc > 0:
                mean = (m.itl_sum - self.itl_sum) / dc
                h = self.hist_itl
                self.hist_itl = mean if h is None else h + a * (mean - h)
        if m.itl_sum is not None:
            self.itl_sum, self.itl_count = m.itl_sum, m.itl_count or 0.0
        self.time, self.generated, self.running = m.time, m.generation_tokens, m.num_running
        self.in_flight_at_scrape = in_flight
        return True

    def itl(self) -> float | None:
        """Seconds per output token of a running request; None while unknown or idle."""
        if not self.running:
            return None
        if self.hist_itl is not None:
            return self.hist_itl
        if not self.rate:
            return None
        return self.running / self.rate
