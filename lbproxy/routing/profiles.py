"""Routing profiles: the built-in ones by name, inline ones from YAML, and building them.

A profile is filters, weighted scorers and a picker. In YAML `routing:` is either a
built-in name or a mapping; a mapping may name a built-in `profile:` to start from and
override any of `filters`, `scorers` and `picker`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router, WeightedScorer
from lbproxy.routing.registry import PluginError, lookup


class PluginRef(BaseModel):
    """`{type: NAME, weight: W, ...params}`; everything but type and weight is params."""

    model_config = ConfigDict(extra="allow")
    type: str
    weight: float = Field(1.0, ge=0)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ProfileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: str | None = None
    filters: list[PluginRef] | None = None
    scorers: list[PluginRef] | None = None
    picker: PluginRef | str | None = None


BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "round-robin": {"picker": "round-robin"},
    "random": {"picker": "random"},
    "least-request": {"scorers": [{"type": "least-request"}], "picker": "max-score"},
    # The reference router's default weights: prefix 3, queue 2, KV-cache 2.
    "cache-aware": {
        "filters": [{"type": "saturation"}],
        "scorers": [
            {"type": "prefix-hash", "weight": 3},
            {"type": "queue", "weight": 2},
            {"type": "kv-cache-util", "weight": 2},
        ],
        "picker": "max-score",
    },
    # cache-aware plus two load terms it lacks (BENCHMARKS.md, "Beyond the reference"):
    # decode-latency (each backend's measured ITL, so speed and long-context decode count)
    # and least-request (exact in-flight counts, so bursts between scrapes do not herd).
    "cache-aware-plus": {
        "filters": [{"type": "saturation"}],
        "scorers": [
            {"type": "prefix-hash", "weight": 3},
            {"type": "queue", "weight": 2},
            {"type": "kv-cache-util", "weight": 2},
            {"type": "decode-latency", "weight": 1},
            {"type": "least-request", "weight": 1},
        ],
        "picker": "max-score",
    },
    "precise-cache-aware": {
        "filters": [{"type": "saturation"}],
        "scorers": [
            {"type": "precise-prefix", "weight": 3},
            {"type": "queue", "weight": 2},
            {"type": "kv-cache-util", "weight": 2},
        ],
        "picker": "max-score",
    },
    # The two sides of a prefill/decode split (pool `disaggregation`). Prefill: prefix
    # affinity (a cached prefix is prefill work not done) and prefill load (waiting
    # requests; the uncached prompt tokens of the prefill legs in flight). Decode: decode
    # speed (measured ITL) and KV headroom for the whole context, with in-flight counts
    # against bursts.
    "pd-prefill": {
        "filters": [{"type": "saturation"}],
        "scorers": [
            {"type": "prefix-hash", "weight": 3},
            {"type": "queue", "weight": 2},
            # Prefill work in flight in tokens, not requests (weights measured:
            # benchmarks/results/pd-prefill-load).
            {"type": "prefill-load", "weight": 2},
        ],
        "picker": "max-score",
    },
    "pd-decode": {
        "filters": [{"type": "saturation"}],
        "scorers": [
            {"type": "decode-latency", "weight": 2},
            {"type": "kv-cache-util", "weight": 2},
            {"type": "least-request", "weight": 1},
        ],
        "picker": "max-score",
    },
}


def resolve(spec: str | ProfileSpec) -> tuple[str, ProfileSpec]:
    """Turn a name or an inline spec into a complete spec and a display name."""
    if isinstance(spec, str):
        if spec not in BUILTIN_PROFILES:
            raise PluginError(
                f"unknown routing profile '{spec}' (built-in: {', '.join(BUILTIN_PROFILES)})"
            )
        return spec, ProfileSpec.model_validate(BUILTIN_PROFILES[spec])
    merged = ProfileSpec()
    base = spec.profile
    if base is not None:
        merged = resolve(base)[1]
    overridden = False
    for key in ("filters", "scorers", "picker"):
        value = getattr(spec, key)
        if value is not None:
            setattr(merged, key, value)
            overridden = True
    if base is None:
        return "inline", merged
    return (f"{base}+inline" if overridden else base), merged


def build_router(spec: str | ProfileSpec, bctx: BuildContext, *, seed: int | None = None) -> Router:
    name, full = resolve(spec)
    filters = [lookup(ref.type, "filter").build(ref.params(), bctx) for ref in full.filters or []]
    scorers = [
        WeightedScorer(lookup(ref.type, "scorer").build(ref.params(), bctx), ref.weight)
        for ref in full.scorers or []
    ]
    picker_ref = full.picker or "max-score"
    if isinstance(picker_ref, str):
        picker_ref = PluginRef(type=picker_ref)
    picker = lookup(picker_ref.type, "picker").build(picker_ref.params(), bctx)
    return Router(filters, scorers, picker, profile_name=name, seed=seed)
