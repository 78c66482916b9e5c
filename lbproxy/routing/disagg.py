"""Prefill/decode disaggregation: whether to split a request, and where each leg goes.

Pure and synchronous like the rest of routing (no I/O, `now` passed in), so the proxy and
the offline simulator share it. A pool with `disaggregation` has two extra routers, one
per side, built from `prefill_routing` and `decode_routing`. For each request:

- only /v1/completions and /v1/chat/completions without a client-set
  `kv_transfer_params` are candidates;
- prompt tokens: `ctx.prompt_token_estimate` when the caller knows it (the simulator
  does), else ~4 prompt bytes per token (`prompt_tokens_estimate`);
- the prefill side is ranked over prefill-capable endpoints (role prefill or both); the
  uncached part is the prompt minus what the chosen prefill endpoint holds by the prefill
  profile's prefix scorer (prefix-hash or precise-prefix), or the whole prompt when the
  profile has none;
- uncached >= `min_prompt_tokens` and a decode-capable endpoint (role decode or both)
  other than the prefill one: disaggregated; otherwise aggregated, served by the pool's
  own router over the decode-capable endpoints (the caller routes it).

Nothing is committed here: the caller tells each router where its leg went
(`Router.commit`) once it is sent, so that a prefill that fails teaches no index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lbproxy.routing.pipeline import Router
from lbproxy.routing.state import Decision, Endpoint, RequestContext

__all__ = [
    "BYTES_PER_TOKEN",
    "SPLIT_ROUTES",
    "DisaggPlan",
    "DisaggRouter",
    "decode_capable",
    "prefill_capable",
    "prefill_leg_ended",
    "prefill_leg_started",
    "prompt_tokens_estimate",
]

BYTES_PER_TOKEN = 4  # the prefix scorers' estimate too
# What vLLM's P/D connector serves split (its toy proxy's routes).
SPLIT_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})


def prefill_capable(ep: Endpoint) -> bool:
    return ep.role != "decode"


def decode_capable(ep: Endpoint) -> bool:
    return ep.role != "prefill"


def prefill_leg_started(ep: Endpoint, tokens: int) -> None:
    """A prefill leg of `tokens` uncached prompt tokens was sent to `ep` (the proxy and the
    simulator call this and `prefill_leg_ended` around every leg, flow control on or off,
    and around each aggregated request on a `role: both` backend until its first byte:
    `Endpoint.prefill_tokens` is what the `prefill-load` scorer reads)."""
    ep.prefill_tokens += tokens


def prefill_leg_ended(ep: Endpoint, tokens: int) -> None:
    """The leg counted by `prefill_leg_started(ep, tokens)` ended: answered, failed or
    abandoned."""
    ep.prefill_tokens = max(0, ep.prefill_tokens - tokens)


def prompt_tokens_estimate(ctx: RequestContext) -> int:
    """The context's prompt-size estimate, filled from the prompt bytes when unset."""
    if not ctx.prompt_token_estimate:
        ctx.prompt_token_estimate = len(ctx.prompt_bytes()) // BYTES_PER_TOKEN
    return ctx.prompt_token_estimate


def cached_prompt_tokens(router: Router, ctx: RequestContext, ep: Endpoint) -> int | None:
    """What the router's prefix scorers believe `ep` holds of the prompt (the best of
    them), or None when the profile has no prefix scorer."""
    best: int | None = None
    for matcher in router.prefix_matchers:
        n = matcher.cached_tokens(ctx, ep)
        if best is None or n > best:
            best = n
    return best


@dataclass(slots=True)
class DisaggPlan:
    """The outcome for one request. `disaggregated` False: serve it aggregated (reason
    says why); `prefill` / `decode` are the two sides' rankings when they were made."""

    disaggregated: bool
    # split | short_prompt | no_prefill_backend | no_decode_backend | route (not
    # completions or chat) | client_kv_params (the body has its own kv_transfer_params)
    reason: str
    prompt_tokens: int
    uncached_tokens: int
    prefill: Decision | None = None
    decode: Decision | None = None

    def log_fields(self) -> dict[str, Any]:
        """The decision with both sides' scores, for the access and debug logs."""
        out: dict[str, Any] = {
            "mode": "disaggregated" if self.disaggregated else "aggregated",
            "reason": self.reason,
            "prompt_tokens_est": self.prompt_tokens,
            "uncached_tokens_est": self.uncached_tokens,
        }
        for side, d in (("prefill", self.prefill), ("decode", self.decode)):
            if d is not None:
                out[side] = {"backend": d.endpoint.name, "scores": d.scores, "totals": d.totals}
        return out


class DisaggRouter:
    """The P/D decision of one pool: a prefill router, a decode router and the threshold."""

    def __init__(self, prefill: Router, decode: Router, min_prompt_tokens: int) -> None:
        self.prefill = prefill
        self.decode = decode
        self.min_prompt_tokens = min_prompt_tokens

    def plan(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> DisaggPlan:
        tokens = prompt_tokens_estimate(ctx)
        if ctx.route not in SPLIT_ROUTES:  # embeddings and the like: nothing to decode
            return DisaggPlan(False, "route", tokens, tokens)
        if "kv_transfer_params" in ctx.body:  # the client runs its own P/D: pass it on
            return DisaggPlan(False, "client_kv_params", tokens, tokens)
        p_eps = [ep for ep in endpoints if prefill_capable(ep)]
        pre = self.prefill.rank(ctx, p_eps, now) if p_eps else None
        if pre is None:
            return DisaggPlan(False, "no_prefill_backend", tokens, tokens)
        cached = cached_prompt_tokens(self.prefill, ctx, pre.endpoint) or 0
        uncached = max(0, tokens - cached)
        if uncached < self.min_prompt_tokens:
            return DisaggPlan(False, "short_prompt", tokens, uncached, pre)
        # A role-both endpoint never decodes its own prefill: that is an aggregated request.
        d_eps = [ep for ep in endpoints if decode_capable(ep) and ep is not pre.endpoint]
        dec = self.decode.rank(ctx, d_eps, now) if d_eps else None
        if dec is None:
            return DisaggPlan(False, "no_decode_backend", tokens, uncached, pre)
        return DisaggPlan(True, "split", tokens, uncached, pre, dec)

    def rank_pair(
        self,
        ctx: RequestContext,
        endpoints: list[Endpoint],
        now: float,
        can_take: Callable[[Endpoint], bool],
        plan: DisaggPlan | None = None,
    ) -> tuple[Decision, Decision] | None:
        """The two sides of a split that flow control holds as one: (prefill, decode)
        rankings, or None (wait) while no decode-capable endpoint `can_take` it. The
        decode side is ranked over those that can (a split's decode gets its KV over the
        link: no prefix to wait for); the prefill side over every prefill-capable
        endpoint but the only decode side with room, for flow control to choose among by
        its own rule (`FlowController._choose`: the best that can take a prefill leg,
        after waiting briefly for the one that holds the prefix). The decode side used is
        its best that can take it and is not the prefill side (`pick_decode`). `plan`:
        the request's split plan, made just now; its rankings are taken as they are when
        its decode side can take it (ranking again costs time, and moves stateful pickers
        such as round-robin)."""
        d_eps = [ep for ep in endpoints if decode_capable(ep) and can_take(ep)]
        if not d_eps:
            return None
        only = d_eps[0] if len(d_eps) == 1 else None
        if (
            plan is not None
            and plan.prefill is not None
            and plan.decode is not None
            and (only is None or all(ep is not only for ep in plan.prefill.ranked))
            and can_take(plan.decode.endpoint)
        ):
            return plan.prefill, plan.decode
        p_eps = [ep for ep in endpoints if prefill_capable(ep) and ep is not only]
        pre = self.prefill.rank(ctx, p_eps, now, gates=False) if p_eps else None
        if pre is None:
            return None
        dec = self.decode.rank(ctx, d_eps, now, gates=False)
        if dec is None:
            return None
        return pre, dec

    def pick_decode(
        self,
        ctx: RequestContext,
        dec: Decision,
        p_ep: Endpoint,
        endpoints: list[Endpoint],
        now: float,
        can_take: Callable[[Endpoint], bool],
    ) -> Decision | None:
        """The decode side of a pair whose prefill goes to `p_ep`: `dec` (without `p_ep`)
        set to its best that can take it; else (its ranking is from earlier, or left out
        `p_ep`'s only partner) the decode router's choice among the others that can, or,
        failing that, among all the others."""
        ranked = [ep for ep in dec.ranked if ep is not p_ep]
        ep = next((ep for ep in ranked if can_take(ep)), None)
        if ep is not None:
            dec.ranked = ranked
            if ep is not dec.endpoint:
                dec.choose(ep)
            return dec
        others = [ep for ep in endpoints if decode_capable(ep) and ep is not p_ep]
        eps = (
            [ep for ep in others if can_take(ep)]
            or [ep for ep in others if ep.healthy and not ep.draining]
            or others
        )
        return self.decode.rank(ctx, eps, now, gates=False) if eps else None

    def uncached_tokens(self, ctx: RequestContext, ep: Endpoint) -> int:
        """The prompt tokens a prefill on `ep` computes: the prompt less what the prefill
        profile's prefix scorers believe `ep` holds."""
        cached = cached_prompt_tokens(self.prefill, ctx, ep) or 0
        return max(0, prompt_tokens_estimate(ctx) - cached)

    def rank_prefill(
        self, ctx: RequestContext, endpoints: list[Endpoint], now: float
    ) -> list[Endpoint]:
        """Prefill candidates best first, ranked anew: for a fresh prefill after the first
        one's KV could not be used."""
        eps = [ep for ep in endpoints if prefill_capable(ep)]
        d = self.prefill.rank(ctx, eps, now) if eps else None
        return d.ranked if d is not None else []
