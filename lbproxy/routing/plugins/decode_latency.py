"""decode-latency scorer: each backend's predicted inter-token latency, as itl_min / itl.

The scorer the cache-aware weights lack: a term for decode load that knows backends
differ in speed. From consecutive fresh snapshots it measures each backend's output
token rate (`vllm:generation_tokens_total` per second, smoothed with time constant
`tau`), so its current inter-token latency is itl = num_running / rate: this counts
the hardware's speed, the batch and the context lengths being read, which neither
waiting counts nor KV usage do (with shared prefixes, hundreds of long decodes fit in
a cache that looks half empty). Between scrapes the estimate is scaled by the growth of
the exact in-flight count, itl * (in_flight + 1) / (in_flight_at_scrape + 1), so a burst
does not herd onto the backend that looked fastest at the last scrape.

Scores are itl_min / itl over the candidates with an estimate (the fastest scores 1, one
twice as slow 0.5). An idle backend (nothing running, nothing in flight) scores 1. No
estimate yet, or stale metrics, score `unknown_score` (default 0.5, neutral).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.decode_rate import DecodeRate
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "decode-latency"
KIND = "scorer"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau: float = Field(1.0, gt=0)  # seconds: smoothing of the token rate
    unknown_score: float = Field(0.5, ge=0, le=1)


class DecodeLatencyScorer:
    name = TYPE

    def __init__(self, max_age: float, tau: float, unknown_score: float) -> None:
        self.max_age = max_age
        self.tau = tau
        self.unknown_score = unknown_score
        self._tracks: dict[Endpoint, DecodeRate] = {}

    def _observe(self, ep: Endpoint, now: float) -> DecodeRate | None:
        """Fold a new snapshot of `ep` into its track; None while its metrics are unusable."""
        m = ep.fresh_metrics(now, self.max_age)
        if m is None or m.generation_tokens is None or m.num_running is None:
            return None
        tr = self._tracks.get(ep)
        if tr is None:
            tr = self._tracks[ep] = DecodeRate(self.tau)
        if tr.time != m.time:  # a snapshot is folded in once (routing reads it many times)
            tr.observe(m, ep.in_flight)
        return tr

    def _itl(self, ep: Endpoint, now: float) -> float | None:
        """Predicted seconds per output token on `ep`; 0 when idle; None when unknown."""
        tr = self._observe(ep, now)
        if tr is None:
            return None
        running = ep.metrics.num_running if ep.metrics else None
        if not running and ep.in_flight == 0:
            return 0.0
        if not running or not tr.rate:
            return None  # busy, but no decode rate measured yet
        itl = running / tr.rate
        return itl * (ep.in_flight + 1) / (tr.in_flight_at_scrape + 1)

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        itls = [self._itl(ep, now) for ep in endpoints]
        known = [v for v in itls if v is not None and v > 0]
        best = min(known) if known else 0.0
        out = []
        for v in itls:
            if v is None:
                out.append(self.unknown_score)
            elif v == 0.0:
                out.append(1.0)
            else:
                out.append(best / v)
        return out


def build(params: Params, bctx: BuildContext) -> DecodeLatencyScorer:
    return DecodeLatencyScorer(bctx.metrics_max_age, params.tau, params.unknown_score)
