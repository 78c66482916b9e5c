"""Reuse what a plugin computed from scraped metrics until the metrics or the candidates change.

The saturation filter and the `queue` and `kv-cache-util` scorers read each candidate's
snapshot, if fresh, and nothing else; their result changes only when (a) a snapshot
changes (`state.load_epoch()` moves), (b) the candidate list differs, or (c) time makes
a fresh snapshot stale (or, were the clock to step back, a stale one fresh). So each
keeps the last result with what it depended on, and a request costs a list comparison
(identity of endpoints, at C speed) instead of a pass over every candidate in Python.

(c) is checked exactly as `Endpoint.fresh_metrics` decides: with `now - t > max_age` on
the oldest fresh snapshot time and the newest stale one (the subtraction is monotonic,
so those two decide for all). In-flight counts, which change with every request, are not
part of any cached result: plugins that read them do so per request.
"""

from __future__ import annotations

from math import inf
from typing import Generic, TypeVar

from lbproxy.routing.state import Endpoint, load_epoch

T = TypeVar("T")


class LoadCache(Generic[T]):
    """The last result of one metrics-only computation over a list of endpoints."""

    __slots__ = ("_endpoints", "_epoch", "_newest_stale", "_oldest_fresh", "_value", "max_age")

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._endpoints: list[Endpoint] = []
        self._epoch = -1
        self._value: T | None = None
        self._oldest_fresh = inf  # snapshot time; inf: no fresh snapshot
        self._newest_stale: float | None = None  # snapshot time; None: no stale snapshot

    def get(self, endpoints: list[Endpoint], now: float) -> T | None:
        """The stored result if it still holds for `endpoints` at `now`, else None."""
        if (
            self._epoch == load_epoch()
            and endpoints == self._endpoints
            and not now - self._oldest_fresh > self.max_age
            and (self._newest_stale is None or now - self._newest_stale > self.max_age)
        ):
            return self._value
        return None

    def epoch(self) -> int:
        """Read before computing: a change during the computation then invalidates it."""
        return load_epoch()

    def put(self, epoch: int, endpoints: list[Endpoint], now: float, value: T) -> None:
        """Store `value`, computed from `endpoints` at `now` with metrics of `epoch`."""
        max_age = self.max_age
        oldest_fresh: float = inf
        newest_stale: float | None = None
        for ep in endpoints:
            m = ep.metrics
            if m is None:
                continue
            t = m.time
            if now - t > max_age:
                if newest_stale is None or t > newest_stale:
                    newest_stale = t
            elif t < oldest_fresh:
                oldest_fresh = t
        self._epoch = epoch
        self._endpoints = list(endpoints)
        self._oldest_fresh = oldest_fresh
        self._newest_stale = newest_stale
        self._value = value
