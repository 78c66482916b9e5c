"""The routing pipeline: filters -> weighted scorers -> picker -> Decision.

The pipeline, not the plugins, enforces the contracts of `interfaces`: an empty filter
result keeps the previous candidates, scores are clamped to [0, 1] and weighted, and
ties are left to the picker's seeded random source.

The router also sorts its plugins by the optional hooks of `interfaces` once, when it is
built (`forgetful`, `prefix_matchers`, `index_stats`, the observers of `commit`): callers
use these lists, never a plugin's name or `getattr`.

Cost of each plugin: one decision in `TIME_EVERY` is timed, plugin by plugin (filter,
score or pick call), into `plugin_seconds[plugin name]`, which `/metrics` exposes as
`lbproxy_routing_plugin_seconds`. Sampling keeps the clock reads off most decisions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from time import perf_counter

from lbproxy.histogram import Histogram
from lbproxy.routing.interfaces import (
    Filter,
    Forgetful,
    IndexStatsProvider,
    LoadGate,
    Picker,
    PrefixMatcher,
    RoutedObserver,
    Scorer,
)
from lbproxy.routing.state import Decision, Endpoint, RequestContext

# One decision in this many is timed plugin by plugin (a power of two: a mask test).
TIME_EVERY = 16
# Seconds: a cheap plugin takes a few microseconds, a prefix scorer over 256 backends
# or a long prompt up to a millisecond or more.
PLUGIN_SECONDS_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1,
)  # fmt: skip


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


class Router:
    """Routes requests of one pool with one profile. Not thread-safe; no I/O."""

    def __init__(
        self,
        filters: list[Filter],
        scorers: list[WeightedScorer],
        picker: Picker,
        *,
        profile_name: str = "",
        seed: int | None = None,
    ) -> None:
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        self.profile_name = profile_name
        self.rng = random.Random(seed)
        plugins: list[object] = [*filters, *(ws.scorer for ws in scorers), picker]
        # The optional hooks, sorted out once (isinstance on a runtime-checkable protocol
        # is slow, and a plugin's hooks do not change).
        self._observers: list[RoutedObserver] = [
            p for p in plugins if isinstance(p, RoutedObserver)
        ]
        self.forgetful: list[Forgetful] = [p for p in plugins if isinstance(p, Forgetful)]
        self.prefix_matchers: list[PrefixMatcher] = [
            ws.scorer for ws in scorers if isinstance(ws.scorer, PrefixMatcher)
        ]
        self.index_stats: list[IndexStatsProvider] = [
            p for p in plugins if isinstance(p, IndexStatsProvider)
        ]
        self._ungated = [f for f in filters if not (isinstance(f, LoadGate) and f.load_gate)]
        # Plugin name -> its time per call, on sampled decisions (one histogram per name:
        # two instances of a plugin share it).
        self.plugin_seconds: dict[str, Histogram] = {}
        for p in plugins:
            name = p.name  # type: ignore[attr-defined]
            if name not in self.plugin_seconds:
                self.plugin_seconds[name] = Histogram(PLUGIN_SECONDS_BUCKETS)
        self._decisions = 0
        # Per scorer: the last list it returned and that list clamped. A scorer may return
        # the very same list while its scores hold (the load scorers, between scrapes),
        # and never changes a list it returned; the pipeline never changes one either.
        self._last_scores: list[tuple[list[float], list[float]] | None] = [None] * len(scorers)
        # The weighted sum of such kept lists, and which lists it was made of.
        self._kept_sum: tuple[list[tuple[float, list[float]]], list[float]] | None = None

    def route(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> Decision | None:
        """Choose an endpoint for `ctx`, or None when no endpoint is available."""
        decision = self.rank(ctx, endpoints, now)
        if decision is not None:
            self.commit(ctx, decision.endpoint, now)
        return decision

    def rank(
        self, ctx: RequestContext, endpoints: list[Endpoint], now: float, *, gates: bool = True
    ) -> Decision | None:
        """The decision `route` would make, without telling learning plugins: for a caller
        (flow control) that may still send the request elsewhere, or not yet; it then
        calls `commit` with the endpoint the request goes to. `gates=False` skips the
        load gates (flow control applies their thresholds itself, and waits)."""
        candidates = [ep for ep in endpoints if ep.healthy and not ep.draining]
        if not candidates:
            return None
        self._decisions += 1
        # One decision in TIME_EVERY times each plugin call; the others read no clock.
        hist = None if self._decisions & (TIME_EVERY - 1) else self.plugin_seconds
        reasons: list[str] = []
        for f in self.filters if gates else self._ungated:
            t0 = perf_counter() if hist is not None else 0.0
            kept = f.filter(ctx, candidates, now)
            if hist is not None:
                hist[f.name].observe(perf_counter() - t0)
            if kept:
                if len(kept) != len(candidates):
                    reasons.append(f"{f.name} kept {len(kept)}/{len(candidates)}")
                candidates = kept
            else:
                reasons.append(f"{f.name} would drop all; kept all")

        score_lists: list[tuple[str, list[float]]] = []
        last = self._last_scores
        same: list[tuple[float, list[float]]] = []  # scorers that gave the same list again
        fresh: list[tuple[float, list[float]]] = []
        for i, ws in enumerate(self.scorers):
            t0 = perf_counter() if hist is not None else 0.0
            raw = ws.scorer.score(ctx, candidates, now)
            if hist is not None:
                hist[ws.scorer.name].observe(perf_counter() - t0)
            prev = last[i]
            if prev is not None and prev[0] is raw:
                clamped = prev[1]  # a load scorer's list, unchanged since the last scrape
                same.append((ws.weight, clamped))
            else:
                # Clamp to [0, 1]; NaN (s != s) counts as 0.
                clamped = [0.0 if s != s or s < 0.0 else (1.0 if s > 1.0 else s) for s in raw]
                last[i] = (raw, clamped)
                fresh.append((ws.weight, clamped))
            score_lists.append((ws.scorer.name, clamped))
        totals = self._kept_total(same, len(candidates))
        for w, clamped in fresh:
            totals = [t + w * s for t, s in zip(totals, clamped, strict=True)]

        t0 = perf_counter() if hist is not None else 0.0
        ranked = self.picker.pick(ctx, candidates, totals, self.rng)
        if hist is not None:
            hist[self.picker.name].observe(perf_counter() - t0)
        return Decision(
            endpoint=ranked[0],
            ranked=ranked,
            candidates=candidates,
            score_lists=score_lists,
            total_list=totals,
            reason="; ".join(reasons),
        )

    def _kept_total(self, kept: list[tuple[float, list[float]]], n: int) -> list[float]:
        """The weighted sum of the scorers' lists that are the same as last time (a fresh
        copy: the caller adds to it), computed once while they stay the same."""
        cached = self._kept_sum
        if (
            cached is not None
            and len(cached[1]) == n
            and len(cached[0]) == len(kept)
            and all(a[1] is b[1] for a, b in zip(cached[0], kept, strict=True))
        ):
            return list(cached[1])
        total = [0.0] * n
        for w, clamped in kept:
            total = [t + w * s for t, s in zip(total, clamped, strict=True)]
        self._kept_sum = (kept, total)
        return list(total)

    def add_observer(self, obs: RoutedObserver) -> None:
        """Also tell `obs` where each request went (one observer per type: a new one
        replaces an earlier one of its type, so a router kept over a reload is not told
        twice)."""
        self._observers = [o for o in self._observers if type(o) is not type(obs)]
        self._observers.append(obs)

    def commit(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        """Tell learning plugins (round-robin, prefix indexes) where the request went."""
        for obs in self._observers:
            obs.on_routed(ctx, endpoint, now)

    # A retry sent the request to another endpoint after all: the same lesson.
    routed_elsewhere = commit
