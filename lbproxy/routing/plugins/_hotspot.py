"""What the prefix scorers (prefix-hash, precise-prefix) share; not a plugin itself.

Plugins do not import each other: a helper two of them use lives in a module like this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import add, attrgetter

from lbproxy.routing.state import Endpoint

_in_flight = attrgetter("in_flight")


@dataclass(frozen=True, slots=True)
class HotspotRule:
    """Keep a hot prefix from piling every request onto the endpoints that hold it.

    Load is the in-flight request count, kept exactly by the proxy, so the rule reacts
    within a burst, before the next metrics scrape shows a queue. An endpoint is hot when

        load - min_load > margin  and  load > factor * min_load

    (min_load over the candidates; both conditions, as in SGLang's cache-aware router).
    A hot endpoint's prefix score is multiplied by `discount` (0: its cache no longer
    attracts requests and the load scorers decide). The spilled request teaches another
    endpoint the prefix, so a hot prefix spreads only when one holder is clearly busier.
    The defaults (32, 2.0) leave random imbalance at moderate load alone: a spill makes
    a prefix group permanently two-homed, so it must not happen by chance.

    When no candidate matches more than `spread` of the prompt (a new prefix, a short
    common head, or every holder is hot), `tie_break` is added to the scores: a small term
    so that new prefix groups land where the cache has room and on idle endpoints rather
    than collide by coin-flip while the metrics are still equal. It is small next to the
    load scorers, and a match worth more than it is left alone.
    """

    margin: float = 32.0
    factor: float = 2.0
    discount: float = 0.0
    spread: float = 0.1

    def adjust(
        self,
        scores: list[float],
        endpoints: Sequence[Endpoint],
        free_room: Callable[[], list[float]] | None = None,
    ) -> list[float]:
        """Apply the rule to a scorer's prefix scores (in place when possible).

        `free_room()` gives each endpoint's free cache room (any unit, the same for all),
        asked only when a tie is to be broken; None when the scorer cannot tell."""
        if len(endpoints) < 2:
            return scores
        if self.discount < 1.0 and any(scores):
            lo = min(map(_in_flight, endpoints))
            limit = max(lo + self.margin, lo * self.factor)
            for i in compress(range(len(scores)), scores):  # the matched ones only
                if endpoints[i].in_flight > limit:
                    scores[i] *= self.discount
        if self.spread and max(scores) < self.spread:
            tie = self.tie_break(endpoints, free_room() if free_room else None)
            if tie is not None:
                return list(map(add, scores, tie)) if any(scores) else tie
        return scores

    def tie_break(
        self, endpoints: Sequence[Endpoint], free: list[float] | None
    ) -> list[float] | None:
        """spread x (least-in-flight + 2 x room) / 3 per endpoint, None when all are equal.

        room = free / the most free among the candidates (1 when unknown or all equal):
        proportional, so that the few units a short prompt takes do not outweigh a
        request in flight (which would herd unmatched requests onto one endpoint until
        the next scrape), while a group's worth of cache does. Room counts double: it
        decides where the group's later requests hit, and the load scorers weigh load.
        """
        # One comprehension per case (faster than chains of maps): this runs for every
        # unmatched request, over every candidate. A negative room (a capacity that shrank
        # below the working set) is left negative: the pipeline clamps the score.
        loads = list(map(_in_flight, endpoints))
        lo, hi = min(loads), max(loads)
        w = self.spread / 3.0
        top = max(free) if free else 0.0
        if not (free and top > 0.0 and min(free) < top):  # rooms equal or unknown
            if lo == hi:
                return None  # nothing to break ties with
            k = w / (hi - lo)
            return [k * (hi - ld) + 2.0 * w for ld in loads]
        r = 2.0 * w / top
        if lo == hi:  # least-in-flight 1 for all
            return [w + r * f for f in free]
        k = w / (hi - lo)
        return [k * (hi - ld) + r * f for ld, f in zip(loads, free, strict=True)]
