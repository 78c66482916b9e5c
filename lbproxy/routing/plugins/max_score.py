"""max-score picker: the highest total score wins; ties are broken at random.

The winner is drawn uniformly from the candidates sharing the highest total. The rest
follow by total, highest first (the retry order); among equal totals they come in the
candidates' order rotated by a random offset. One C-level sort and two draws from `rng`
(seeded in tests), not a Python shuffle of every candidate per request.
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
        n = len(endpoints)
        if n != len(totals):
            raise ValueError(f"{n} endpoints but {len(totals)} totals")
        if n < 2:
            return list(endpoints)
        r = rng.randrange(n)
        order = [*range(r, n), *range(r)]
        # Stable, so equal totals keep the rotated order; the key calls and the float
        # comparisons run in C.
        order.sort(key=totals.__getitem__, reverse=True)
        ties = totals.count(totals[order[0]])
        if ties > 1:
            j = rng.randrange(ties)
            if j:
                order.insert(0, order.pop(j))
        return list(map(endpoints.__getitem__, order))


def build(params: Params, bctx: BuildContext) -> MaxScorePicker:
    return MaxScorePicker()
