"""The routing pipeline: filters -> weighted scorers -> picker -> Decision.

The pipeline, not the plugins, enforces the contracts of `interfaces`: an empty filter
result keeps the previous candidates, scores are clamped to [0, 1] and weighted, and
ties are left to the picker's seeded random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lbproxy.routing.interfaces import Filter, LoadGate, Picker, RoutedObserver, Scorer
from lbproxy.routing.state import Decision, Endpoint, RequestContext


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
        self._observers: list[RoutedObserver] = [
            p for p in plugins if isinstance(p, RoutedObserver)
        ]
        self._ungated = [f for f in filters if not (isinstance(f, LoadGate) and f.load_gate)]

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
        reasons: list[str] = []
        for f in self.filters if gates else self._ungated:
            kept = f.filter(ctx, candidates, now)
            if kept:
                if len(kept) != len(candidates):
                    reasons.append(f"{f.name} kept {len(kept)}/{len(candidates)}")
                candidates = kept
            else:
                reasons.append(f"{f.name} would drop all; kept all")

        totals = [0.0] * len(candidates)
        score_lists: list[tuple[str, list[float]]] = []
        for ws in self.scorers:
            # Clamp to [0, 1]; NaN (s != s) counts as 0.
            clamped = [
                0.0 if s != s or s < 0.0 else (1.0 if s > 1.0 else s)
                for s in ws.scorer.score(ctx, candidates, now)
            ]
            w = ws.weight
            totals = [t + w * s for t, s in zip(totals, clamped, strict=True)]
            score_lists.append((ws.scorer.name, clamped))

        ranked = self.picker.pick(ctx, candidates, totals, self.rng)
        return Decision(
            endpoint=ranked[0],
            ranked=ranked,
            candidates=candidates,
            score_lists=score_lists,
            total_list=totals,
            reason="; ".join(reasons),
        )

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
