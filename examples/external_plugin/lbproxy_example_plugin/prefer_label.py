"""prefer-label scorer: 1 for a backend whose label `label` equals `value`, else 0.

Use it to keep traffic in a zone or on a hardware generation while the load scorers
still spread it among the preferred backends, e.g.

    routing:
      profile: load-aware
      scorers:
        - {type: prefer-label, weight: 4, label: zone, value: near}
        - {type: least-request, weight: 1}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "prefer-label"  # optional: must equal the entry point's name
KIND = "scorer"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in YAML is a config error
    label: str
    value: str


class PreferLabelScorer:
    name = TYPE

    def __init__(self, params: Params) -> None:
        self.label = params.label
        self.value = params.value

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        return [1.0 if ep.labels.get(self.label) == self.value else 0.0 for ep in endpoints]


def build(params: Params, bctx: BuildContext) -> PreferLabelScorer:
    return PreferLabelScorer(params)
