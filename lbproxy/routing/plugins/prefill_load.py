"""prefill-load scorer: the uncached prompt tokens of the P/D prefill legs each candidate
runs (lower is better).

A prefill engine's queue is measured in tokens, not requests: two cold 8 K-token prompts
take longer than ten short or mostly cached ones. `Endpoint.prefill_tokens` is kept
exactly by the data path (the proxy and the simulator, `routing.disagg.prefill_leg_*`)
for every split request's prefill leg while it runs, each counted with the prompt tokens
its backend does not hold by the prefill profile's prefix scorer; no scrape is needed.
Aggregated requests on a `role: both` backend are not counted (their prefill ends at
their first token, which the data path does not hand back per request).

`scale` says what a difference in tokens weighs:
- "prompt" (default): tokens ahead of the least loaded candidate in units of this
  request's prompt, score = max(0, 1 - (tokens - least) / prompt tokens). Next to a
  prefix scorer of the same weight (whose score is the fraction of the prompt cached) the
  sum ranks by the tokens a prefill waits for plus those it computes, so a cached backend
  keeps the request unless its queue costs more than the prefix saves;
- "span": (max - tokens) / (max - min) over the candidates, like least-request: any
  difference counts fully.
When all candidates run the same tokens all score 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from lbproxy.routing.disagg import prompt_tokens_estimate
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.plugins._scores import normalise_low_is_good
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "prefill-load"
KIND = "scorer"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: Literal["prompt", "span"] = "prompt"


class PrefillLoadScorer:
    name = TYPE

    def __init__(self, scale: str = "prompt") -> None:
        self.by_prompt = scale == "prompt"

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        tokens = [ep.prefill_tokens for ep in endpoints]
        if not self.by_prompt:
            return normalise_low_is_good([float(t) for t in tokens])
        least = min(tokens)
        inv = 1.0 / max(1, prompt_tokens_estimate(ctx))
        return [max(0.0, 1.0 - (t - least) * inv) for t in tokens]


def build(params: Params, bctx: BuildContext) -> PrefillLoadScorer:
    return PrefillLoadScorer(params.scale)
