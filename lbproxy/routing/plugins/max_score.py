"""max-score picker: the highest total score wins; ties are broken at random.

Candidates are shuffled and then stably sorted by score, so equal scores come out in
random order (seeded in tests) and the rest of the list is the retry order.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "max-score"
KIND = "picker"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaxScorePicker:
    name = TYPE

    def pick(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        totals: list[float],
        rng: random.Random,
    ) -> list[Endpoint]:
        pairs = list(zip(totals, endpoints, strict=True))
        rng.shuffle(pairs)
        pairs.sort(key=lambda p: p[0], reverse=True)
        return [ep for _, ep in pairs]


def build(params: Params, bctx: BuildContext) -> MaxScorePicker:
    return MaxScorePicker()
