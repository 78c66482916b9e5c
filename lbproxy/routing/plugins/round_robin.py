"""round-robin picker: smooth weighted rotation over the candidates (nginx's algorithm).

Each pick adds every candidate's weight to its running credit, takes the candidate with
the most credit and subtracts the total weight from it. With equal weights this is a
strict rotation; weights 1:2 give 1:2 with the picks interleaved, not bunched.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "round-robin"
KIND = "picker"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundRobinPicker:
    name = TYPE

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def pick(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        totals: list[float],
        rng: random.Random,
    ) -> list[Endpoint]:
        credit = self._credit
        total_weight = 0.0
        best: Endpoint | None = None
        best_credit = 0.0
        for ep in endpoints:
            w = ep.weight
            total_weight += w
            c = credit.get(ep.name, 0.0) + w
            credit[ep.name] = c
            if best is None or c > best_credit:
                best, best_credit = ep, c
        assert best is not None
        credit[best.name] = best_credit - total_weight
        rest = sorted(
            (ep for ep in endpoints if ep is not best),
            key=lambda ep: credit.get(ep.name, 0.0),
            reverse=True,
        )
        return [best, *rest]


def build(params: Params, bctx: BuildContext) -> RoundRobinPicker:
    return RoundRobinPicker()
