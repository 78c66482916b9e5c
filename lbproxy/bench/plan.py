"""`lbproxy plan`: which prefill/decode role layout of a fleet serves a workload best at a
rate, by simulation (`lbproxy simulate`'s engine model, lbproxy's own routing and P/D
decision, in virtual time).

Candidates (a layout gives each backend a role: prefill, decode or both):

- the baseline: every backend `both`, no disaggregation (all requests aggregated);
- by card type (the backends' hardware profile): every assignment of prefill / decode /
  both to the T card types but the baseline's all-both and those without a
  prefill-capable or a decode-capable card (3^T - 3: 24 for abc-20's three types, 6 for
  ab-12's two);
- count splits within a type: the `refine` best layouts so far (the baseline included)
  again, with the cards of one type of N >= 2 split into k prefill + N-k decode for k =
  N/4, N/2, 3N/4 (rounded, distinct, 1..N-1), one type at a time (at most
  refine x T x 3 more: 18 for abc-20);
- ascent (several types changed together): from the best layout so far, every move of
  one card type to another of its options (all prefill, all decode, all both, or the k =
  N/4, N/2, 3N/4 splits: at most 5 moves a type), and, when two or more types have a
  move with more goodput (or as much and more completed tokens/s) than the start, those
  types' best moves applied together (one more candidate); the best improving one starts
  the next round, for at most `rounds` rounds (default 2), ending early when a round
  improves nothing. At most rounds x (5T + 1)
  more (32 for abc-20); layouts already run are not run again, so when the best is a
  by-type layout or a `refine` seed its first round is mostly free.

That is a coordinate search, not the 3^N of every per-card assignment: a layout better
than all of these that only a mix of per-card choices reaches, or that no chain of
improving type moves leads to, is not found. Each
candidate runs once on a fresh fleet at the rate (Poisson arrivals, the same seed, so
every candidate sees the same requests) and is ranked by goodput (output tokens/s of
requests within the SLO), then completed output tokens/s.

A split request whose prefill and decode run on cards of different vendors needs a KV
transfer between vendors, which vLLM does not have today: such layouts are marked
`cross_vendor_kv`, with the link the model assumed (the fleet's `links:` /
`kv_link_gbps`, default 100 Gb/s). The model's transfer is bytes / bandwidth: no
handshake, no per-block overhead, no KV layout conversion.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lbproxy.bench import report
from lbproxy.bench.simulate import SimOptions, simulate_run
from lbproxy.bench.workloads import Workload
from lbproxy.config import Disaggregation, FlowControl
from lbproxy.sim.fleet import ROLES, FleetSpec
from lbproxy.tokenization.tokenizer import Tokenizer

__all__ = [
    "PlanOptions",
    "card_types",
    "combine",
    "count_splits",
    "layouts_by_type",
    "plan",
    "search",
    "type_moves",
    "write_plan",
]

PLAN_JSON = "plan.json"
PLAN_MD = "plan.md"
SPLIT_STEPS = (0.25, 0.5, 0.75)
SEARCH = (
    "baseline (all both, aggregated); every prefill/decode/both assignment per card type "
    "(3^T - 3, T card types); then, for the {refine} best so far, each type of N >= 2 "
    "cards split into k prefill + N-k decode, k = N/4, N/2, 3N/4; then up to {rounds} "
    "rounds of ascent from the best so far: every move of one card type to all prefill, "
    "all decode, all both or one of those splits, plus the best improving moves of two or "
    "more types applied together (at most {rounds} x (5T + 1))"
)
_PLOTTED = 8  # candidates in the plots (the baseline and the best others)

Layout = tuple[str, ...]  # a role per backend, in the fleet's order
Done = dict[Layout, tuple[dict[str, Any], Any]]  # layout -> (its candidate, its run)
Evaluate = Callable[[list[Layout], str], None]  # runs the layouts not in `done` yet


@dataclass(slots=True)
class PlanOptions:
    rate: float
    duration: float = 60.0
    drain: float = 120.0
    warmup: float = 20.0
    profile: str = "cache-aware"
    min_prompt_tokens: int | None = None  # None: the fleet's `disaggregation:`, else 512
    flow: FlowControl | None = None  # None (or enabled false): flow control off
    slo_ttft: float = 5.0
    slo_itl: float = 0.1
    refine: int = 2
    rounds: int = 2  # ascent rounds (several types changed together); 0: none
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not 0 <= self.warmup < self.duration:
            raise ValueError(f"warmup must be within [0, duration), got {self.warmup}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")


def card_types(fleet: FleetSpec) -> dict[str, list[int]]:
    """Backend indexes by card type (hardware profile name), in the fleet's order."""
    out: dict[str, list[int]] = {}
    for i, b in enumerate(fleet.backends):
        out.setdefault(b.profile.name, []).append(i)
    return out


def _valid(layout: Layout) -> bool:
    return any(r != "decode" for r in layout) and any(r != "prefill" for r in layout)


def layouts_by_type(fleet: FleetSpec) -> list[Layout]:
    """Every role assignment per card type but all-both and the invalid ones."""
    types = card_types(fleet)
    n = len(fleet.backends)
    out: list[Layout] = []
    for roles in itertools.product(ROLES, repeat=len(types)):
        if all(r == "both" for r in roles):
            continue
        layout = ["both"] * n
        for r, idx in zip(roles, types.values(), strict=True):
            for i in idx:
                layout[i] = r
        if _valid(tuple(layout)):
            out.append(tuple(layout))
    return out


def count_splits(fleet: FleetSpec, seed: Layout) -> list[Layout]:
    """`seed` with one card type's cards split k prefill + rest decode (see the module)."""
    out: list[Layout] = []
    for idx in card_types(fleet).values():
        for k in _split_ks(len(idx)):
            layout = list(seed)
            for j, i in enumerate(idx):
                layout[i] = "prefill" if j < k else "decode"
            if _valid(tuple(layout)):
                out.append(tuple(layout))
    return out


def _split_ks(n: int) -> list[int]:
    return sorted({min(n - 1, max(1, round(n * f))) for f in SPLIT_STEPS}) if n >= 2 else []


def type_moves(fleet: FleetSpec, layout: Layout) -> dict[str, list[Layout]]:
    """By card type: `layout` with that type's cards all prefill, all decode, all both or
    split k prefill + rest decode (`SPLIT_STEPS`), the others kept; the valid ones that
    differ from `layout` (at most 5 a type)."""
    out: dict[str, list[Layout]] = {}
    for name, idx in card_types(fleet).items():
        options = [[r] * len(idx) for r in ROLES]
        options += [["prefill"] * k + ["decode"] * (len(idx) - k) for k in _split_ks(len(idx))]
        moves: list[Layout] = []
        for roles in options:
            moved = list(layout)
            for i, r in zip(idx, roles, strict=True):
                moved[i] = r
            lay = tuple(moved)
            if lay != layout and _valid(lay) and lay not in moves:
                moves.append(lay)
        out[name] = moves
    return out


def combine(base: Layout, moves: list[Layout]) -> Layout:
    """`base` with every card that one of `moves` changed set as that move has it (moves of
    different card types, so they touch different cards)."""
    out = list(base)
    for move in moves:
        for i, (b, m) in enumerate(zip(base, move, strict=True)):
            if m != b:
                out[i] = m
    return tuple(out)


def describe(fleet: FleetSpec, layout: Layout) -> tuple[dict[str, str], str]:
    """(roles by card type, or by backend where a type is split; a one-line summary)."""
    roles: dict[str, str] = {}
    parts: list[str] = []
    for name, idx in card_types(fleet).items():
        rs = [layout[i] for i in idx]
        if len(set(rs)) == 1:
            roles[name] = rs[0]
            parts.append(f"{name} x{len(idx)} {rs[0]}")
        else:
            for i in idx:
                roles[fleet.backends[i].name] = layout[i]
            counts = [f"{rs.count(r)} {r}" for r in ROLES if rs.count(r)]
            parts.append(f"{name} x{len(idx)}: {' + '.join(counts)}")
    return roles, "; ".join(parts)


def link_info(fleet: FleetSpec, layout: Layout) -> tuple[bool, list[dict[str, Any]]]:
    """(whether a split can cross vendors, the links assumed for the vendor pairs a split
    can use)."""
    pre = {b.profile.name for b, r in zip(fleet.backends, layout, strict=True) if r != "decode"}
    dec = {b.profile.name for b, r in zip(fleet.backends, layout, strict=True) if r != "prefill"}
    pairs = sorted({(p, d) for p in pre for d in dec if p != d})
    links = [{"prefill": p, "decode": d, "gbps": fleet.links.gbps(d, p)} for p, d in pairs]
    return bool(pairs), links


def _fleet_with(fleet: FleetSpec, layout: Layout, opts: PlanOptions) -> FleetSpec:
    if all(r == "both" for r in layout):  # the baseline: aggregated
        backends = tuple(replace(b, role="both") for b in fleet.backends)
        return replace(fleet, backends=backends, disaggregation=None)
    backends = tuple(replace(b, role=r) for b, r in zip(fleet.backends, layout, strict=True))
    return replace(fleet, backends=backends, disaggregation=_disaggregation(fleet, opts))


def _disaggregation(fleet: FleetSpec, opts: PlanOptions) -> Disaggregation:
    """The P/D settings of the split candidates: the fleet's, else the pool defaults."""
    dis = fleet.disaggregation or Disaggregation()
    if opts.min_prompt_tokens is not None:
        dis = dis.model_copy(update={"min_prompt_tokens": opts.min_prompt_tokens})
    return dis


_FIGURES = (
    "goodput_output_tokens_per_s",
    "completed_output_tokens_per_s",
    "slo_attainment",
    "ttft_p50_s",
    "ttft_p90_s",
    "itl_p50_s",
    "itl_p90_s",
    "requests",
    "completed",
    "incomplete",
    "rejected",
)

Progress = Callable[[int, str], None]  # (candidate number, its summary) before each run


def plan(
    fleet: FleetSpec,
    workload: Workload,
    tokenizer: Tokenizer | None,
    opts: PlanOptions,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], list[report.RunResult]]:
    """Search and evaluate (see the module); returns (plan.json's content, the runs of
    the candidates in the same order, for the plots)."""
    started = time.perf_counter()
    done: Done = {}

    def evaluate(layouts: list[Layout], stage: str) -> None:
        for layout in layouts:
            if layout in done:
                continue
            roles, summary = describe(fleet, layout)
            if progress is not None:
                progress(len(done) + 1, summary)
            run = simulate_run(
                _fleet_with(fleet, layout, opts),
                workload,
                opts.profile,
                [opts.rate],
                duration=opts.duration,
                drain=opts.drain,
                warmup=opts.warmup,
                tokenizer=tokenizer,
                options=SimOptions(seed=opts.seed),
                label=summary,
                target=fleet.source,
                flow=opts.flow,
                slo_ttft=opts.slo_ttft,
                slo_itl=opts.slo_itl,
            )
            step: dict[str, Any] = dict(run["steps"][0])
            cross, links = link_info(fleet, layout) if stage != "baseline" else (False, [])
            pd = step.get("pd")
            cand: dict[str, Any] = {"roles": roles, "layout": summary, "stage": stage}
            cand.update({k: step.get(k) for k in _FIGURES})
            cand["cross_vendor_kv"] = cross
            if cross:
                cand["assumed_links"] = links
                cand["note"] = (
                    "needs a KV transfer between vendors, which vLLM does not have today; "
                    "modelled as KV bytes / the assumed link, nothing else"
                )
            if pd is not None:
                n = pd["disaggregated"] + pd["aggregated"]
                cand["split_share"] = pd["disaggregated"] / n if n else None
                crossed = sum(
                    c
                    for pair, c in pd["pairs"].items()
                    if _vendor(fleet, pair.split("->")[0]) != _vendor(fleet, pair.split("->")[1])
                )
                cand["cross_vendor_share"] = crossed / max(1, sum(pd["pairs"].values()))
                cand["pd"] = pd
            done[layout] = (cand, run)

    baseline: Layout = ("both",) * len(fleet.backends)
    rounds = search(fleet, done, evaluate, opts.refine, opts.rounds)

    base = done[baseline][0]
    order = sorted(done, key=lambda lay: _key(done[lay][0]))
    candidates = []
    for lay in order:
        cand = done[lay][0]
        b = base["goodput_output_tokens_per_s"]
        g = cand["goodput_output_tokens_per_s"]
        cand["goodput_vs_baseline"] = g / b if b else None
        candidates.append(cand)
    links = {
        "default_gbps": fleet.links.default_gbps,
        "pairs": {"/".join(sorted(k)): v for k, v in fleet.links.pairs.items()},
    }
    result = {
        "schema": 1,
        "tool": "lbproxy plan",
        "settings": {
            "fleet": fleet.source,
            "model": fleet.model,
            "workload": workload.describe(),
            "rate": opts.rate,
            "duration_s": opts.duration,
            "drain_s": opts.drain,
            "warmup_s": opts.warmup,
            "seed": opts.seed,
            "routing": opts.profile,
            "disaggregation": _disaggregation(fleet, opts).model_dump(mode="json"),
            "flow_control": (
                opts.flow.model_dump(mode="json") if opts.flow else {"enabled": False}
            ),
            "slo_ttft_s": opts.slo_ttft,
            "slo_itl_s": opts.slo_itl,
            "links": links,
            "search": SEARCH.format(refine=opts.refine, rounds=opts.rounds),
            "ascent_rounds_run": rounds,
            "candidates_evaluated": len(done),
            "wall_time_s": round(time.perf_counter() - started, 2),
        },
        "baseline": base,
        "best": candidates[0],
        "candidates": candidates,
    }
    return result, [done[lay][1] for lay in order]


def search(fleet: FleetSpec, done: Done, evaluate: Evaluate, refine: int, rounds: int) -> int:
    """The stages of the module's docstring, in order, each ranking what `done` holds so
    far; returns the ascent rounds run."""
    evaluate([("both",) * len(fleet.backends)], "baseline")
    evaluate(layouts_by_type(fleet), "by-type")
    for seed in sorted(done, key=lambda lay: _key(done[lay][0]))[:refine]:
        evaluate(count_splits(fleet, seed), "count-split")
    return _ascend(fleet, done, evaluate, rounds)


def _ascend(fleet: FleetSpec, done: Done, evaluate: Evaluate, rounds: int) -> int:
    """The ascent stage (see the module); returns the rounds run. A move counts as better
    only for more goodput (or as much and more completed output tokens/s), not for the
    ranking's last tie-break (TTFT p50): at equal goodput that is noise not worth a round."""
    current = min(done, key=lambda lay: _key(done[lay][0]))
    for n in range(1, rounds + 1):
        improving: list[Layout] = []
        for moves in type_moves(fleet, current).values():
            evaluate(moves, "ascent")
            _note_move(fleet, done, current, moves, "ascent")
            better = [m for m in moves if _gain(done[m][0]) > _gain(done[current][0])]
            if better:
                improving.append(min(better, key=lambda lay: _key(done[lay][0])))
        if len(improving) >= 2:
            together = combine(current, improving)
            if _valid(together):
                evaluate([together], "combined")
                _note_move(fleet, done, current, [together], "combined")
                if _gain(done[together][0]) > _gain(done[current][0]):
                    improving.append(together)
        if not improving:
            return n
        current = min(improving, key=lambda lay: _key(done[lay][0]))
    return rounds


def _gain(cand: dict[str, Any]) -> tuple[float, float]:
    return (
        cand["goodput_output_tokens_per_s"] or 0.0,
        cand["completed_output_tokens_per_s"] or 0.0,
    )


def _note_move(
    fleet: FleetSpec, done: Done, start: Layout, moves: list[Layout], stage: str
) -> None:
    """Record, in the candidates this stage ran, the layout they moved from and the card
    types they changed (plan.json: `moved_from`, `moved_types`)."""
    for lay in moves:
        cand = done[lay][0]
        if cand["stage"] == stage and "moved_from" not in cand:
            cand["moved_from"] = describe(fleet, start)[1]
            cand["moved_types"] = [
                name
                for name, idx in card_types(fleet).items()
                if any(lay[i] != start[i] for i in idx)
            ]


def _vendor(fleet: FleetSpec, name: str) -> str:
    for b in fleet.backends:
        if b.name == name:
            return b.profile.name
    return name


def _key(cand: dict[str, Any]) -> tuple[float, float, float]:
    """Best first: goodput, then completed output tokens/s, then the lower TTFT p50."""
    ttft = cand.get("ttft_p50_s")
    return (
        -(cand["goodput_output_tokens_per_s"] or 0.0),
        -(cand["completed_output_tokens_per_s"] or 0.0),
        ttft if ttft is not None else float("inf"),
    )


def _f(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _flow_text(flow: dict[str, Any] | None) -> str:
    if not flow or not flow.get("enabled"):
        return "off"
    return f"on (max_wait {flow['max_wait']:g} s, max_queue {flow['max_queue']})"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    wl = s["workload"]
    lines = [
        f"# lbproxy plan: {s['fleet']}, {wl.get('name')} at {s['rate']:g} requests/s",
        "",
        f"Simulated {s['duration_s']:g} s of arrivals per candidate ({s['warmup_s']:g} s of "
        f"warm-up not counted, {s['drain_s']:g} s to drain), routing `{s['routing']}`, "
        f"flow control {_flow_text(s['flow_control'])}; SLO TTFT <= "
        f"{s['slo_ttft_s']:g} s, ITL <= {s['slo_itl_s'] * 1000:g} ms. "
        f"{s['candidates_evaluated']} candidates in {s['wall_time_s']:.0f} s. "
        f"Search: {s['search']}.",
        "",
        "| # | layout | goodput tok/s | vs all-aggregated | completed tok/s | SLO met "
        "| rejected | TTFT p50 | ITL p50 | split | cross-vendor KV |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(result["candidates"], 1):
        gain = c.get("goodput_vs_baseline")
        slo = c.get("slo_attainment")
        split = c.get("split_share")
        cross = "no"
        if c["cross_vendor_kv"]:
            gbps = sorted({lk["gbps"] for lk in c["assumed_links"]})
            share = c.get("cross_vendor_share")
            used = "" if share is None else f"{share:.0%} of splits, "
            cross = f"yes ({used}{'/'.join(f'{g:g}' for g in gbps)} Gb/s assumed)"
        tag = " (baseline)" if c["stage"] == "baseline" else ""
        lines.append(
            f"| {i} | {c['layout']}{tag} | {_f(c['goodput_output_tokens_per_s'])} | "
            f"{'-' if gain is None else f'x{gain:.2f}'} | "
            f"{_f(c['completed_output_tokens_per_s'])} | "
            f"{'-' if slo is None else f'{slo:.0%}'} | {_f(c.get('rejected'))} | "
            f"{_f(c['ttft_p50_s'], 3)} s | "
            f"{_f(c['itl_p50_s'] and c['itl_p50_s'] * 1000, 1)} ms | "
            f"{'-' if split is None else f'{split:.0%}'} | {cross} |"
        )
    lines += [
        "",
        "Cross-vendor KV: the layout lets a request's prefill and decode run on cards of "
        "different vendors, which needs a KV transfer vLLM does not have today; the model "
        "charges only KV bytes / the assumed link (no handshake, no per-block overhead, no "
        "KV layout conversion between vendors).",
        "",
    ]
    return "\n".join(lines)


def write_plan(
    out_dir: str | Path, result: dict[str, Any], runs: list[report.RunResult], plots: bool = True
) -> list[Path]:
    """plan.json, plan.md and (with `plots`) bench's plots of the baseline and the best
    candidates at the rate (goodput.png, ttft.png, throughput.png, slo.png)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / PLAN_JSON, out / PLAN_MD]
    paths[0].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    if plots:
        stages = [c["stage"] for c in result["candidates"]]
        keep = [r for r, st in zip(runs, stages, strict=True) if st == "baseline"]
        keep += [r for r, st in zip(runs, stages, strict=True) if st != "baseline"][: _PLOTTED - 1]
        s = result["settings"]
        results = report.new_results("lbproxy simulate", s["workload"], {"plan": s}, keep)
        paths += report.plot(results, out)
    return paths
