"""Where flow control's dispatches land, step by step of the abc-20 overload ladder.

For each dispatched request of a step (those sent after the warm-up) it records how flow
control chose its backend: the routing's first choice (`first`), another backend within
`affinity_margin` of it (`margin`), or the best free one after `affinity_wait`
(`spill`); whether the prefix index predicted a hit there (the prefix scorer's score over
0.5), and whether the engine's cache held the shared system prompt (4,000 cached tokens
or more of the 7,200). Per step it also counts the backends each prefix group was served
by (its spread) and the groups each backend served. Runs `lbproxy simulate`'s fleet
simulator in virtual time with the ladder's settings (BENCHMARKS.md, "The ladder"):

    python benchmarks/flow_placement.py --profile cache-aware-plus --rates 5,10,25,50,85 \
        --out benchmarks/results/flow/placement/footprint.json

`--profile` takes what `lbproxy simulate --profiles` takes (a built-in name or a YAML file).
`--table A.json B.json ...` prints the files' steps side by side (BENCHMARKS.md's table).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbproxy.bench.cli import load_profile_arg
from lbproxy.bench.simulate import FleetSimulator, SimOptions
from lbproxy.bench.stats import poisson_arrivals, summarize_step
from lbproxy.bench.workloads import Workload, make_workload
from lbproxy.config import FlowControl
from lbproxy.flow.controller import FlowController
from lbproxy.routing.state import Decision
from lbproxy.sim.fleet import load_fleet
from lbproxy.tokenization.tokenizer import default_tokenizer

FLEET = Path(__file__).resolve().parent.parent / "configs" / "fleets" / "abc-20.yaml"
COLD_BELOW = 4_000  # cached tokens: under this the 6,000-token system prompt was not cached


@contextmanager
def _instrumented(sim: FleetSimulator, tags: dict[int, tuple[str, bool]]) -> Iterator[None]:
    """Tag each dispatch with its path and the index's prediction (no change to what runs);
    the classes' methods are restored on exit."""
    choose_fc = FlowController._choose

    def _choose(self: FlowController, *a: Any, **k: Any) -> Any:
        r = choose_fc(self, *a, **k)
        if r is not None and r[1] is not None:
            r[0].reason = "spill-candidate"  # if it goes to its alternative, it spills
        return r

    choose = Decision.choose

    def decision_choose(self: Decision, ep: Any) -> None:
        self.reason = "spill" if self.reason == "spill-candidate" else "margin"
        choose(self, ep)

    bind = sim.bind

    def sim_bind(w: Any, decision: Decision, now: float) -> None:
        i = decision.candidates.index(decision.endpoint)
        prefix = dict(decision.score_lists).get("prefix-hash")
        path = decision.reason if decision.reason in ("spill", "margin") else "first"
        tags[id(w.payload.rec)] = (path, prefix is not None and prefix[i] > 0.5)
        decision.reason = ""
        bind(w, decision, now)

    FlowController._choose = _choose  # type: ignore[method-assign]
    Decision.choose = decision_choose  # type: ignore[method-assign]
    sim.bind = sim_bind  # type: ignore[method-assign]
    try:
        yield
    finally:
        FlowController._choose = choose_fc  # type: ignore[method-assign]
        Decision.choose = choose  # type: ignore[method-assign]


def ladder_sim(profile: str) -> tuple[FleetSimulator, Workload]:
    """The ladder's fleet simulator and workload (abc-20, shared-prefix, `max_wait` 4 s) for
    a `--profiles` item (a built-in name or a YAML file)."""
    tok = default_tokenizer()
    _, spec = load_profile_arg(profile)
    flow = FlowControl(max_wait=4)
    sim = FleetSimulator(load_fleet(FLEET), spec, tokenizer=tok, options=SimOptions(), flow=flow)
    return sim, make_workload("shared-prefix", tok)


def write_result(path: str, steps: list[dict[str, Any]]) -> None:
    """The steps, with the command that made them, as a JSON result file."""
    out = {"command": " ".join(sys.argv), "fleet": "configs/fleets/abc-20.yaml", "steps": steps}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sim, wl = ladder_sim(args.profile)
    tags: dict[int, tuple[str, bool]] = {}
    with _instrumented(sim, tags):
        return _steps(args, sim, wl, tags)


def _steps(
    args: argparse.Namespace,
    sim: FleetSimulator,
    wl: Workload,
    tags: dict[int, tuple[str, bool]],
) -> list[dict[str, Any]]:
    steps = []
    index = 0
    for k, rate in enumerate(args.rates):
        arrivals = poisson_arrivals(rate, args.duration, sim.options.seed + k)  # as simulate_run
        tags.clear()
        records = sim.run_step(wl, arrivals, first_index=index, deadline=args.duration + 120)
        step = summarize_step(records, rate=rate, duration=args.duration, warmup=args.warmup)
        paths: Counter[str] = Counter()
        served: defaultdict[int, set[str]] = defaultdict(set)
        per_backend: defaultdict[str, set[int]] = defaultdict(set)
        for a, r in enumerate(records):
            if r.backend is None or r.start < args.warmup:
                continue
            path, predicted = tags[id(r)]
            cold = r.cached_tokens < COLD_BELOW
            key = f"{path}, predicted {'hit' if predicted else 'miss'}, {'cold' if cold else 'hit'}"
            paths[key] += 1
            group = wl.request(index + a).group
            served[group].add(r.backend)
            per_backend[r.backend].add(group)
        index += len(arrivals)
        dispatched = sum(paths.values())
        cold = sum(n for key, n in paths.items() if key.endswith("cold"))
        steps.append(
            {
                "rate": rate,
                "completed_output_tokens_per_s": step["completed_output_tokens_per_s"],
                "prefix_cache_hit_rate": step["prefix_cache_hit_rate"],
                "dispatched": dispatched,
                "cold": cold,
                "false_hits": sum(
                    n for key, n in paths.items() if "predicted hit" in key and "cold" in key
                ),
                "paths": dict(sorted(paths.items())),
                "backends_per_group": sum(map(len, served.values())) / max(1, len(served)),
                "groups_per_backend": {b: len(g) for b, g in sorted(per_backend.items())},
            }
        )
        s = steps[-1]
        print(
            f"{rate:g} req/s: completed {s['completed_output_tokens_per_s']:,.0f} tok/s, "
            f"{cold} of {dispatched} cold ({s['false_hits']} predicted hits), "
            f"{s['backends_per_group']:.2f} backends per group",
            flush=True,
        )
    return steps


def table(paths: list[str]) -> str:
    """One row per file and step: what the step completed and where its dispatches went."""
    rows = [
        "| run | rate | completed tok/s | prefix hits | dispatched | cold | of them predicted"
        " hits | of them spilled | backends per group |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        name = Path(path).stem
        for s in json.loads(Path(path).read_text())["steps"]:
            spilled = sum(
                n for k, n in s["paths"].items() if k.startswith("spill") and k.endswith("cold")
            )
            rows.append(
                f"| {name} | {s['rate']:g} | {s['completed_output_tokens_per_s']:,.0f} | "
                f"{s['prefix_cache_hit_rate']:.0%} | {s['dispatched']} | {s['cold']} | "
                f"{s['false_hits']} | {spilled} | {s['backends_per_group']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cache-aware-plus")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=120.0)
    ap.add_argument("--out")
    ap.add_argument("--table", nargs="+", metavar="RESULT", help="print these results' table")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.rates or not args.out:
        ap.error("--rates and --out are required (or --table)")
    write_result(args.out, run(args))


if __name__ == "__main__":
    main()
