"""What the scorers that read scraped metrics share (not a plugin itself).

A snapshot older than `metrics_max_age` (or none at all) is unknown, and so is a value
the backend did not report. An unknown value scores `stale_as`: "worst" (0, default: a
backend whose load we cannot see is not preferred) or "neutral" (0.5).

Such scores depend on the snapshots alone, so they are kept until a snapshot, the
candidates or their freshness change (`routing.load_cache`): a request then costs a list
comparison and a copy, not a pass over every candidate in Python.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.load_cache import LoadCache
from lbproxy.routing.state import Endpoint, RequestContext

STALE_SCORES = {"worst": 0.0, "neutral": 0.5}


class StaleAsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stale_as: Literal["worst", "neutral"] = "worst"


class FreshMetricsScorer:
    """Base of a scorer of fresh metrics: holds `max_age` and the score of the unknown,
    and keeps the last scores; subclasses implement `compute`."""

    name: str

    def __init__(self, max_age: float, stale_as: str) -> None:
        self.max_age = max_age
        self.stale_score = STALE_SCORES[stale_as]
        self._cache: LoadCache[list[float]] = LoadCache(max_age)

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        cache = self._cache
        scores = cache.get(endpoints, now)
        if scores is None:
            epoch = cache.epoch()
            scores = self.compute(endpoints, now)
            cache.put(epoch, endpoints, now, scores)
        return scores  # the same list while it holds: the pipeline keeps its sum (read-only)

    def compute(self, endpoints: list[Endpoint], now: float) -> list[float]:
        """The scores from the endpoints' fresh snapshots (metrics only, no in-flight)."""
        raise NotImplementedError
