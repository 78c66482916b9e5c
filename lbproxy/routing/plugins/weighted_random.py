"""weighted-random picker: draw a candidate with probability proportional to its total.

`temperature` sharpens (< 1) or flattens (> 1) the draw: weights are total**(1/T). A
small floor keeps zero-score candidates possible so that load can still spread.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "weighted-random"
KIND = "picker"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, gt=0)
    floor: float = Field(1e-3, ge=0)


class WeightedRandomPicker:
    name = TYPE

    def __init__(self, temperature: float, floor: float) -> None:
        self.exponent = 1.0 / temperature
        self.floor = floor

    def pick(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        totals: list[float],
        rng: random.Random,
    ) -> list[Endpoint]:
        weights = [max(t, 0.0) ** self.exponent + self.floor for t in totals]
        chosen = rng.choices(range(len(endpoints)), weights=weights)[0]
        rest = sorted(
            (i for i in range(len(endpoints)) if i != chosen),
            key=lambda i: totals[i],
            reverse=True,
        )
        return [endpoints[chosen], *(endpoints[i] for i in rest)]


def build(params: Params, bctx: BuildContext) -> WeightedRandomPicker:
    return WeightedRandomPicker(params.temperature, params.floor)
