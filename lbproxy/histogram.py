"""`Histogram`: fixed-bucket counts, shared by lbproxy's metrics and the simulator's.

A module of its own so that the simulator does not import the proxy.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.utils import floatToGoString

__all__ = ["Histogram"]


class Histogram:
    """Fixed buckets (`le` inclusive, as Prometheus); `counts[-1]` is the +Inf bucket."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Count `n` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs as prometheus_client wants them."""
        out = []
        acc = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += c
            out.append((floatToGoString(bound), acc))
        return out
