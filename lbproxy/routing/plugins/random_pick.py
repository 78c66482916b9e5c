"""random picker: a candidate drawn with probability proportional to its weight."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "random"
KIND = "picker"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomPicker:
    name = TYPE

    def pick(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        totals: list[float],
        rng: random.Random,
    ) -> list[Endpoint]:
        order = list(endpoints)
        rng.shuffle(order)
        chosen = rng.choices(endpoints, weights=[ep.weight for ep in endpoints])[0]
        order.remove(chosen)
        return [chosen, *order]


def build(params: Params, bctx: BuildContext) -> RandomPicker:
    return RandomPicker()
