"""What the scorers that read scraped metrics share (not a plugin itself).

A snapshot older than `metrics_max_age` (or none at all) is unknown, and so is a value
the backend did not report. An unknown value scores `stale_as`: "worst" (0, default: a
backend whose load we cannot see is not preferred) or "neutral" (0.5).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

STALE_SCORES = {"worst": 0.0, "neutral": 0.5}


class StaleAsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stale_as: Literal["worst", "neutral"] = "worst"


class FreshMetricsScorer:
    """Base of a scorer of fresh metrics: holds `max_age` and the score of the unknown."""

    name: str

    def __init__(self, max_age: float, stale_as: str) -> None:
        self.max_age = max_age
        self.stale_score = STALE_SCORES[stale_as]
