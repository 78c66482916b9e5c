"""saturation filter: drop endpoints with waiting > queue_depth, KV usage > kv_cache_util,
or in-flight > max_in_flight.

Waiting and KV usage come from a snapshot at most `metrics_max_age` old. A check whose
value is unknown (stale or never scraped, or not reported) follows `stale_as`:
"saturated" (default, as llm-d's saturation detector: unseen load is not trusted) drops
the endpoint, "available" keeps it. In-flight counts are exact and always checked. When
every candidate would be dropped the pipeline keeps them all. With flow control on, the
filter is not applied (it is a load gate, see `routing.interfaces.LoadGate`): flow
control holds a request while its backend is over these thresholds instead.

Cost: the metrics verdicts are kept until a snapshot, the candidates or their freshness
change (`routing.load_cache`), so a request pays a list comparison, plus one pass over
the kept endpoints when `max_in_flight` is set (in-flight counts change every request).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.load_cache import LoadCache
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "saturation"
KIND = "filter"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue_depth: float = Field(5, ge=0)
    kv_cache_util: float = Field(0.8, ge=0, le=1)
    max_in_flight: int | None = Field(None, ge=0)
    stale_as: Literal["saturated", "available"] = "saturated"


class SaturationFilter:
    name = TYPE
    load_gate = True  # flow control checks the same thresholds (`can_take`) and waits

    def __init__(self, params: Params, max_age: float) -> None:
        self.queue_depth = params.queue_depth
        self.kv_cache_util = params.kv_cache_util
        self.max_in_flight = params.max_in_flight
        self.unknown_ok = params.stale_as == "available"
        self.max_age = max_age
        self._cache: LoadCache[list[Endpoint]] = LoadCache(max_age)

    def saturated(self, ep: Endpoint, now: float) -> bool:
        if self.max_in_flight is not None and ep.in_flight > self.max_in_flight:
            return True
        return self.metrics_saturated(ep, now)

    def metrics_saturated(self, ep: Endpoint, now: float) -> bool:
        """The verdict of the scraped metrics alone (in-flight counts aside)."""
        m = ep.fresh_metrics(now, self.max_age)
        if m is None:
            return not self.unknown_ok
        waiting, usage = m.num_waiting, m.kv_cache_usage
        if waiting is None or usage is None:
            if not self.unknown_ok:
                return True
            return (waiting is not None and waiting > self.queue_depth) or (
                usage is not None and usage > self.kv_cache_util
            )
        return waiting > self.queue_depth or usage > self.kv_cache_util

    def filter(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        cache = self._cache
        kept = cache.get(endpoints, now)
        if kept is None:
            epoch = cache.epoch()
            kept = [ep for ep in endpoints if not self.metrics_saturated(ep, now)]
            cache.put(epoch, endpoints, now, kept)
        limit = self.max_in_flight
        if limit is None:
            return list(kept)  # a copy: the caller may keep or change it
        return [ep for ep in kept if ep.in_flight <= limit]


def build(params: Params, bctx: BuildContext) -> SaturationFilter:
    return SaturationFilter(params, bctx.metrics_max_age)
