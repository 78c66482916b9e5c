"""kv-cache-util scorer: 1 - kv_cache_usage from fresh metrics.

`vllm:kv_cache_usage_perc` (0..1) from a snapshot at most `metrics_max_age` old; not
normalised across candidates, so a nearly idle pool does not look full of differences.
Unknown or stale metrics score `stale_as`: "worst" (0, default) or "neutral" (0.5).
Scores are kept until the metrics change (see `_metrics`).
"""

from __future__ import annotations

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins._metrics import FreshMetricsScorer, StaleAsParams
from lbproxy.routing.state import Endpoint

TYPE = "kv-cache-util"
KIND = "scorer"

Params = StaleAsParams  # stale_as: "worst" (default) | "neutral"


class KVCacheUtilScorer(FreshMetricsScorer):
    name = TYPE

    def compute(self, endpoints: list[Endpoint], now: float) -> list[float]:
        max_age = self.max_age
        stale = self.stale_score
        out = []
        for ep in endpoints:
            m = ep.fresh_metrics(now, max_age)
            usage = None if m is None else m.kv_cache_usage
            out.append(stale if usage is None else 1.0 - usage)
        return out


def build(params: Params, bctx: BuildContext) -> KVCacheUtilScorer:
    return KVCacheUtilScorer(bctx.metrics_max_age, params.stale_as)
