"""A fleet's capacity bound on a workload: `lbproxy simulate --capacity`.

The bound is what the fleet's cards deliver when every one of them is saturated: the sum,
over backends, of the card's saturated output-token throughput on the workload. Each
distinct card type (hardware profile) of the fleet is simulated once, alone, with the
engine model `lbproxy simulate` uses (`FleetSimulator`, one backend, round-robin, no flow
control), so a 20-backend fleet of three card types costs three single-engine runs per
figure, not a 20-backend simulation.

What one backend can do depends on how much prefix it shares, which is what the routing
decides, so each card gets two figures:

- shared: the workload restricted to ceil(groups / backends) of its prefix groups
  (`num_groups` of shared-prefix, `num_prompts` of diverse-prefix, `num_conversations` of
  multi-turn; 150 / 20 -> 8 for abc-20), what a cache-affine router hands one backend.
  `bound_output_tokens_per_s` is the sum of these.
- cold: the whole workload (all groups), what round-robin hands a backend.
  `bound_cold_output_tokens_per_s` is the sum of these.

Each run offers Poisson arrivals at `overload` (default 2) times the card's decode
roofline on the workload, 1 / (per_request_overhead + kv_bytes_per_token x prompt_tokens /
(kv_read_efficiency x mem_bandwidth)) tokens/s (the batch-to-infinity limit of the
step-time model at the shortest decode context: no card can do more), divided by the
output length: at least twice what the card can serve, so its waiting queue never
empties. Arrivals run for `duration` virtual seconds (default 1,800). The figure is the
steady-state rate: the engine's `generation_tokens` counter, read each time requests
finish, from the first reading after `warmup` (default 600 s: a 1,000-token request at a
saturated batch lives about 100 s, and the waiting queue takes a few of those lifetimes to
build up behind the first wave of admissions) to the end of the arrivals, divided by that
time. Both halves of the window are reported too (`first_half_...`, `second_half_...`) as
a check that the rate is steady, and `saturated` says whether requests were waiting in the
engine at every reading of the window. `prefix_hit_rate` is results.json's
(prompt tokens found cached when a request was first scheduled, over the requests that
started in the window); `engine_prefix_hit_rate` is vLLM's counters' (recomputation after
a preemption included). On abc-20 with the default shared-prefix workload the six runs
(3 cards x shared, cold) take about 30 s of one core.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbproxy.bench.simulate import FleetSimulator, SimOptions
from lbproxy.bench.stats import poisson_arrivals
from lbproxy.bench.workloads import Workload, make_workload
from lbproxy.sim.fleet import FleetSpec
from lbproxy.sim.hardware import HardwareProfile
from lbproxy.tokenization.tokenizer import Tokenizer

CAPACITY_JSON = "capacity.json"
CAPACITY_MD = "capacity.md"

# The workload parameter that counts prefix groups (a cache-affine router's unit).
GROUP_PARAM = {
    "shared-prefix": "num_groups",
    "diverse-prefix": "num_prompts",
    "multi-turn": "num_conversations",
}
_DEFAULT_GROUPS = {"num_groups": 150, "num_prompts": 1000, "num_conversations": 64}

# (card name, "shared" | "cold", rate offered, requests offered) -> advance(n finished)
CapacityProgress = Callable[[str, str, float, int], Callable[[int], None]]
# (rate offered, requests offered) -> advance(n finished)
RunProgress = Callable[[float, int], Callable[[int], None]]


@dataclass(slots=True)
class CapacityOptions:
    duration: float = 1800.0  # virtual seconds of arrivals per run
    warmup: float = 600.0  # virtual seconds before the measurement window opens
    overload: float = 2.0  # offered rate / the card's decode roofline on the workload
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0, got {self.duration}")
        if not 0 <= self.warmup < self.duration:
            raise ValueError(f"warmup must be in [0, duration), got {self.warmup}")
        if not self.overload >= 1:
            raise ValueError(f"overload must be >= 1, got {self.overload}")


def decode_roofline(profile: HardwareProfile, context_tokens: float) -> float:
    """Output tokens/s of an infinite decode batch at `context_tokens` of context each: the
    step-time model's per-sequence cost (request overhead + reading its KV context)."""
    kv = profile.kv_bytes_per_token * context_tokens
    per_seq = profile.per_request_overhead_s + kv / (
        profile.kv_read_efficiency * profile.mem_bandwidth_bytes_per_s
    )
    return 1.0 / per_seq


def card_types(fleet: FleetSpec) -> list[tuple[str, int, FleetSpec]]:
    """(card name, backends of that card, a one-backend fleet of it) per distinct profile,
    in the fleet's order."""
    seen: dict[HardwareProfile, list[Any]] = {}
    for b in fleet.backends:
        entry = seen.setdefault(b.profile, [b, 0])
        entry[1] += 1
    out: list[tuple[str, int, FleetSpec]] = []
    names: set[str] = set()
    for profile, (backend, count) in seen.items():
        name = profile.name
        k = 2
        while name in names:  # two different profiles with one name: keep both
            name, k = f"{profile.name}-{k}", k + 1
        names.add(name)
        single = dataclasses.replace(fleet, backends=(backend,))
        out.append((name, count, single))
    return out


def shared_workload(workload: Workload, tokenizer: Tokenizer, backends: int) -> Workload:
    """The workload cut to ceil(groups / backends) prefix groups (same other parameters)."""
    desc = workload.describe()
    key = GROUP_PARAM[workload.name]
    params = dict(desc["params"])
    params["api"] = desc["api"]
    groups = int(params.get(key, _DEFAULT_GROUPS[key]))
    params[key] = max(1, math.ceil(groups / backends))
    return make_workload(
        workload.name, tokenizer, params, prompt_format=desc.get("prompt_format", "text")
    )


def _groups(workload: Workload) -> int:
    key = GROUP_PARAM[workload.name]
    return int(workload.params.get(key, _DEFAULT_GROUPS[key]))


def saturated_throughput(
    fleet: FleetSpec,
    workload: Workload,
    tokenizer: Tokenizer,
    options: CapacityOptions,
    *,
    progress: RunProgress | None = None,
) -> dict[str, Any]:
    """One card (a one-backend fleet) saturated with the workload: its steady-state
    output tokens/s and what goes with it (see the module docstring)."""
    (backend,) = fleet.backends
    profile = backend.profile
    sample_n = min(len(workload), 64)
    prompt = sum(len(workload.token_ids(i)) for i in range(sample_n)) / sample_n
    output = sum(workload.request(i).max_tokens for i in range(sample_n)) / sample_n
    roofline = decode_roofline(profile, prompt)
    rate = options.overload * roofline / output
    arrivals = poisson_arrivals(rate, options.duration, options.seed)
    on_done = progress(rate, len(arrivals)) if progress is not None else None
    sim = FleetSimulator(
        fleet, "round-robin", tokenizer=tokenizer, options=SimOptions(seed=options.seed)
    )
    engine = sim.engines[0]
    # (time, generation tokens, prefix queries, prefix hits, preemptions, waiting)
    samples: list[tuple[float, int, int, int, int, int]] = []

    def read(n: int) -> None:
        samples.append(
            (
                sim.now,
                engine.generation_tokens,
                engine.prefix_cache_queries,
                engine.prefix_cache_hits,
                engine.num_preemptions,
                engine.num_waiting,
            )
        )
        if on_done is not None:
            on_done(n)

    records = sim.run_step(
        workload, arrivals, first_index=0, deadline=options.duration, on_done=read
    )
    end = (
        sim.now,
        engine.generation_tokens,
        engine.prefix_cache_queries,
        engine.prefix_cache_hits,
        engine.num_preemptions,
        0,
    )
    window = [s for s in samples if options.warmup <= s[0] < end[0]]
    if not window:
        raise ValueError(
            f"{profile.name}: no request finished between the warm-up ({options.warmup:g} s) "
            f"and the end ({options.duration:g} s); lengthen the duration"
        )
    first = window[0]
    span = end[0] - first[0]
    mid_t = first[0] + span / 2
    mid = min(window, key=lambda s: abs(s[0] - mid_t))

    def tok_rate(a: tuple[float, ...], b: tuple[float, ...]) -> float | None:
        return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else None

    queries = end[2] - first[2]
    completed = sum(1 for r in records if r.status == "ok" and r.end is not None)
    # Prompt tokens found in the cache when a request was first scheduled (results.json's
    # prefix_cache_hit_rate), for the requests that started in the window.
    started = [r for r in records if r.first_token is not None and r.first_token >= first[0]]
    prompt_tokens = sum(r.prompt_tokens for r in started)
    return {
        "output_tokens_per_s": tok_rate(first, end),
        "prefix_hit_rate": (
            sum(r.cached_tokens for r in started) / prompt_tokens if prompt_tokens else None
        ),
        # vLLM's prefix_cache_hits / queries counters: recomputes after preemption included.
        "engine_prefix_hit_rate": (end[3] - first[3]) / queries if queries else None,
        "first_half_output_tokens_per_s": tok_rate(first, mid),
        "second_half_output_tokens_per_s": tok_rate(mid, end),
        "window_s": [first[0], end[0]],
        "saturated": all(s[5] > 0 for s in window),
        "preemptions": end[4] - first[4],
        "rate_offered": rate,
        "requests_offered": len(arrivals),
        "requests_completed": completed,
        "prompt_tokens_mean": prompt,
        "output_tokens_mean": output,
        "roofline_output_tokens_per_s": roofline,
        "groups": _groups(workload),
    }


def capacity(
    fleet: FleetSpec,
    workload: Workload,
    tokenizer: Tokenizer,
    options: CapacityOptions | None = None,
    *,
    progress: CapacityProgress | None = None,
) -> dict[str, Any]:
    """The fleet's capacity bound on `workload`: the content of capacity.json."""
    opts = options or CapacityOptions()
    n = len(fleet.backends)
    shared_wl = shared_workload(workload, tokenizer, n)
    cards: dict[str, Any] = {}
    bound = bound_cold = 0.0
    for name, count, single in card_types(fleet):
        figures: dict[str, Any] = {}
        for mode, wl in (("shared", shared_wl), ("cold", workload)):
            run_progress = None
            if progress is not None:
                run_progress = _bind_progress(progress, name, mode)
            figures[mode] = saturated_throughput(single, wl, tokenizer, opts, progress=run_progress)
        shared, cold = figures["shared"], figures["cold"]
        cards[name] = {
            "count": count,
            "shared_output_tokens_per_s": shared["output_tokens_per_s"],
            "cold_output_tokens_per_s": cold["output_tokens_per_s"],
            "shared_prefix_hit_rate": shared["prefix_hit_rate"],
            "cold_prefix_hit_rate": cold["prefix_hit_rate"],
            "rate_offered": shared["rate_offered"],
            "roofline_output_tokens_per_s": shared["roofline_output_tokens_per_s"],
            "shared": shared,
            "cold": cold,
        }
        bound += count * (shared["output_tokens_per_s"] or 0.0)
        bound_cold += count * (cold["output_tokens_per_s"] or 0.0)
    return {
        "bound_output_tokens_per_s": bound,
        "bound_cold_output_tokens_per_s": bound_cold,
        "backends": n,
        "cards": cards,
        "workload": workload.describe(),
        "shared_workload": shared_wl.describe(),
        "settings": {
            "fleet": fleet.source,
            "model": fleet.model,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "overload": opts.overload,
            "seed": opts.seed,
            "profile": "round-robin",
            "flow_control": False,
        },
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _bind_progress(progress: CapacityProgress, name: str, mode: str) -> RunProgress:
    return lambda rate, total: progress(name, mode, rate, total)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    wl = result["workload"]
    params = ", ".join(f"{k}={v}" for k, v in wl.get("params", {}).items())
    first_card = next(iter(result["cards"].values()), {})
    shared_groups = first_card.get("shared", {}).get("groups")
    all_groups = first_card.get("cold", {}).get("groups")
    lines = [
        f"# Capacity bound: {s['fleet']}",
        "",
        f"Workload `{wl['name']}` ({wl['api']}): {params}. Each card type alone, saturated "
        f"(offered {s['overload']:g}x its decode roofline), round-robin, no flow control; "
        f"{s['duration_s']:g} s of arrivals, measured from the first request end after "
        f"{s['warmup_s']:g} s to the end of the arrivals (virtual time, seed {s['seed']}). "
        f"Shared: {shared_groups} prefix groups per backend (ceil({all_groups} groups / "
        f"{result['backends']} backends), what a cache-affine router hands one); cold: all "
        f"{all_groups}. Figures in the window only (steady state); the halves of the window "
        "are shown as a check.",
        "",
        f"**Bound: {result['bound_output_tokens_per_s']:,.0f} output tok/s** (shared); cold: "
        f"{result['bound_cold_output_tokens_per_s']:,.0f}.",
        "",
        "| card | count | shared tok/s | (prefix hits) | cold tok/s | (prefix hits) "
        "| roofline tok/s | rate offered | shared halves | cold halves |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]

    def halves(f: dict[str, Any]) -> str:
        a, b = f["first_half_output_tokens_per_s"], f["second_half_output_tokens_per_s"]
        text = f"{a:,.0f} / {b:,.0f}" if a is not None and b is not None else "-"
        return text + ("" if f["saturated"] else " (not saturated)")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.0f}%"

    for name, c in result["cards"].items():
        lines.append(
            f"| {name} | {c['count']} | {c['shared_output_tokens_per_s']:,.0f} "
            f"| {pct(c['shared_prefix_hit_rate'])} | {c['cold_output_tokens_per_s']:,.0f} "
            f"| {pct(c['cold_prefix_hit_rate'])} | {c['roofline_output_tokens_per_s']:,.0f} "
            f"| {c['rate_offered']:.2f} req/s | {halves(c['shared'])} | {halves(c['cold'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_capacity(out_dir: str | Path, result: dict[str, Any]) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / CAPACITY_JSON, out / CAPACITY_MD]
    paths[0].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    return paths
