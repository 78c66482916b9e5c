"""CPU cost of a `cache-aware` routing decision for ~7,000-token prompts, old code vs new.

Each request is a chat body (system + user message, ~28 KB of text, ~7,000 tokens at ~4
bytes per token) routed in-process by `Router.route()` of the `cache-aware` profile (the
saturation filter, the prefix-hash / queue / kv-cache-util scorers, max-score, and the
learning in `on_routed`), with a fresh RequestContext per request as in the proxy, so the
rendering of the prompt bytes is counted. Cases:

- unique: a never-seen prompt every time (it differs from every other from its first
  byte); before timing, unique prompts are routed until the index of every endpoint that
  receives them is full, so each timed decision hashes, inserts and evicts;
- shared 8 KB + unique: an 8 KB system prompt of one of 4 groups, then a user message of
  its own (~20 KB): the system prompt's hashes are reused, the rest is new and evicts;
- shared: one of 4 ~26 KB system prompts plus one of 64 questions (the decision_cost.py
  workload shape): everything hashed is known (the cached case).

Each endpoint's KV capacity is 30,000 blocks of 16 tokens (the index holds 30,000 units
per endpoint). "prefix part" is the prefix-hash scorer's score() + on_routed() alone.
The clock is this process's CPU time (time.process_time_ns), so other processes on the
cores do not inflate it. A cell is the median over --repeat runs of the per-run median of
--decisions decisions, after a warm-up run.

    python benchmarks/prefix_cost.py --compare OLD_TREE [NEW_TREE] [--out results.json]

runs this script as a worker under PYTHONPATH=OLD_TREE and =NEW_TREE (default: this
checkout), alternating old and new for each repeat, and prints a table old vs new;
without --compare it measures the lbproxy on the import path and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decision_cost import cpu_name, fleet

NOW = 1000.0
GROUPS = 4
PROMPT_BYTES = 28_000
CASES = ("unique", "shared 8 KB + unique", "shared")
_WORDS = (
    "the of and to in is was for on that with as by at from his her are this an be "
    "which or have had not but what all were when we there can more if will one about "
    "system cache request server model token block memory queue route prefix latency"
)


def english(rng: random.Random, n_bytes: int) -> str:
    """English-like text of about `n_bytes` bytes (Zipf-weighted words, sentences)."""
    words = _WORDS.split()
    weights = [1.0 / (i + 1) for i in range(len(words))]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choices(words, weights)[0]
        if rng.random() < 0.07:
            w += "."
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_bytes]


def chat(system: str, user: str) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


class Prompts:
    """Bodies for each case; `unique` ones are never repeated within a process."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.base = english(rng, PROMPT_BYTES)
        self.long_systems = [f"[group {g}] " + english(rng, PROMPT_BYTES - 1700) for g in range(4)]
        self.short_systems = [f"[group {g}] " + english(rng, 8_000) for g in range(GROUPS)]
        self.questions = [english(rng, 1_600) for _ in range(64)]
        self.n = 0

    def unique(self) -> dict[str, Any]:
        self.n += 1
        r = self.rng.random()
        # Cut the fresh marker into the base text at a moving point so no two are alike.
        return chat(f"[{self.n}:{r}] " + self.base[:12_000], self.base[12_000:])

    def shared_then_unique(self, i: int) -> dict[str, Any]:
        self.n += 1
        user = f"[{self.n}:{self.rng.random()}] " + self.base[: PROMPT_BYTES - 8_000]
        return chat(self.short_systems[i % GROUPS], user)

    def shared(self, i: int) -> dict[str, Any]:
        q = self.questions[(i * 7 + i // GROUPS) % len(self.questions)]
        return chat(self.long_systems[i % GROUPS], q)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    from lbproxy.routing.interfaces import BuildContext
    from lbproxy.routing.pipeline import Router
    from lbproxy.routing.profiles import build_router
    from lbproxy.routing.state import Endpoint, RequestContext

    prompts = Prompts(args.seed)
    makers: dict[str, Callable[[int], dict[str, Any]]] = {
        "unique": lambda i: prompts.unique(),
        "shared 8 KB + unique": prompts.shared_then_unique,
        "shared": prompts.shared,
    }
    clock = time.process_time_ns
    out: dict[str, Any] = {"rows": []}
    for nb in args.backends:
        for case in CASES:
            eps = fleet(nb)
            router: Router = build_router("cache-aware", BuildContext(pool="p", model="m"), seed=1)
            scorer = router.scorers[0].scorer
            make = makers[case]
            # Fill: every endpoint that receives these prompts ends up full (30,000 units).
            for i in range(args.fill):
                router.route(RequestContext(model="m", body=make(i)), eps, NOW)

            def route(c: Any, r: Router = router, eps: list[Endpoint] = eps) -> None:
                r.route(c, eps, NOW)

            def part(c: Any, s: Any = scorer, eps: list[Endpoint] = eps) -> None:
                scores = s.score(c, eps, NOW)
                s.on_routed(c, eps[scores.index(max(scores))], NOW)

            cells: dict[str, float] = {}
            for label, call in (("decision_us", route), ("prefix_part_us", part)):
                bodies = [make(i) for i in range(args.decisions)]
                ctxs = [RequestContext(model="m", body=b) for b in bodies]
                samples = []
                for c in ctxs:
                    t0 = clock()
                    call(c)
                    samples.append(clock() - t0)
                cells[label] = statistics.median(samples) / 1000.0
            sizes = [scorer.index.size(ep.name) for ep in eps]
            stats = scorer.index.stats()
            out["rows"].append(
                {
                    "case": case,
                    "backends": nb,
                    **cells,
                    "endpoints_full": sum(s >= 30_000 - 256 for s in sizes),
                    "index_entries": stats["entries"],
                }
            )
    return out


def tree_commit(tree: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compare(args: argparse.Namespace) -> None:
    here = str(Path(__file__).resolve().parents[1])
    trees = {"old": args.compare[0], "new": args.compare[1] if len(args.compare) > 1 else here}
    base_cmd = [sys.executable, __file__, "--worker", "--decisions", str(args.decisions)]
    base_cmd += ["--fill", str(args.fill), "--backends", *map(str, args.backends)]
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for rep in range(args.repeat + 1):  # run 0 is a warm-up, discarded
        for which, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            res = subprocess.run(
                [*base_cmd, "--seed", str(rep)], env=env, cwd=tree, capture_output=True, text=True
            )
            if res.returncode != 0:
                sys.exit(f"{which} worker failed:\n{res.stderr}")
            if rep:
                runs[which].append(json.loads(res.stdout))
            print(f"run {rep} {which} done", file=sys.stderr)
    table = []
    for i, row in enumerate(runs["old"][0]["rows"]):
        cell: dict[str, Any] = {"case": row["case"], "backends": row["backends"]}
        for which in ("old", "new"):
            for key in ("decision_us", "prefix_part_us"):
                cell[f"{which}_{key}"] = statistics.median(r["rows"][i][key] for r in runs[which])
            cell[f"{which}_endpoints_full"] = runs[which][-1]["rows"][i]["endpoints_full"]
            cell[f"{which}_index_entries"] = runs[which][-1]["rows"][i]["index_entries"]
        cell["decision_ratio_new_over_old"] = cell["new_decision_us"] / cell["old_decision_us"]
        cell["prefix_part_ratio_new_over_old"] = (
            cell["new_prefix_part_us"] / cell["old_prefix_part_us"]
        )
        table.append(cell)
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "clock": "process CPU time (time.process_time_ns)",
        "python": platform.python_version(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "trees": {which: {"path": t, "commit": tree_commit(t)} for which, t in trees.items()},
        "settings": {
            "decisions": args.decisions,
            "repeat": args.repeat,
            "fill": args.fill,
            "backends": args.backends,
        },
        "table": table,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| case | backends | old decision µs | new decision µs | new/old | old prefix part µs "
        "| new prefix part µs | new/old |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in table:
        print(
            f"| {c['case']} | {c['backends']} | {c['old_decision_us']:.1f} | "
            f"{c['new_decision_us']:.1f} | {c['decision_ratio_new_over_old']:.2f} | "
            f"{c['old_prefix_part_us']:.1f} | {c['new_prefix_part_us']:.1f} | "
            f"{c['prefix_part_ratio_new_over_old']:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs="+", metavar="TREE")
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--decisions", type=int, default=300)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--fill", type=int, default=1000, help="prompts routed before timing")
    p.add_argument("--backends", type=int, nargs="+", default=[4, 20, 256])
    args = p.parse_args()
    if args.compare:
        compare(args)
    else:
        print(json.dumps(worker(args)))


if __name__ == "__main__":
    main()
