"""Score arithmetic several scorers share (not a plugin itself)."""

from __future__ import annotations


def normalise_low_is_good(values: list[float]) -> list[float]:
    """Map values to [0, 1] so that the smallest scores 1 and the largest 0."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
