"""queue scorer: waiting requests from fresh metrics, (max - waiting) / (max - min).

`vllm:num_requests_waiting` from a snapshot at most `metrics_max_age` old, normalised over
the candidates with known values (fewest waiting scores 1, most 0, all equal all 1).
Unknown or stale metrics score `stale_as`: "worst" (0, default: a backend whose load we
cannot see is not preferred; when all are unknown the scorer is neutral anyway) or
"neutral" (0.5). Scores are kept until the metrics change (see `_metrics`).
"""

from __future__ import annotations

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins._metrics import STALE_SCORES as STALE_SCORES  # re-exported
from lbproxy.routing.plugins._metrics import FreshMetricsScorer, StaleAsParams
from lbproxy.routing.plugins._scores import normalise_low_is_good
from lbproxy.routing.state import Endpoint

TYPE = "queue"
KIND = "scorer"

Params = StaleAsParams  # stale_as: "worst" (default) | "neutral"


class QueueScorer(FreshMetricsScorer):
    name = TYPE

    def compute(self, endpoints: list[Endpoint], now: float) -> list[float]:
        max_age = self.max_age
        values: list[float | None] = []
        for ep in endpoints:
            m = ep.fresh_metrics(now, max_age)
            values.append(None if m is None else m.num_waiting)
        known: list[float] = [v for v in values if v is not None]
        if len(known) == len(values):
            return normalise_low_is_good(known)
        if not known:
            return [self.stale_score] * len(values)
        it = iter(normalise_low_is_good(known))
        stale = self.stale_score
        return [stale if v is None else next(it) for v in values]


def build(params: Params, bctx: BuildContext) -> QueueScorer:
    return QueueScorer(bctx.metrics_max_age, params.stale_as)
