"""least-request scorer: (max - in_flight) / (max - min) over the candidates.

In-flight counts are kept exactly by the proxy, so this needs no scrape. The endpoint
with the fewest requests scores 1, the most 0; when all are equal all score 1.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins._scores import normalise_low_is_good
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "least-request"
KIND = "scorer"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LeastRequestScorer:
    name = TYPE

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        return normalise_low_is_good([float(ep.in_flight) for ep in endpoints])


def build(params: Params, bctx: BuildContext) -> LeastRequestScorer:
    return LeastRequestScorer()
