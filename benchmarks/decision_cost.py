"""In-process cost of one routing decision for a ~7,200-token prompt, by pool size.

The headline workload shape: 4 prefix groups, each a long shared system prompt plus a
fresh question per request (~7,200 tokens, ~29 KB of text in all). For 4, 20 and 256
backends it times `Router.route()` (filters, every scorer, the picker and the learning
in `on_routed`) with:

- `cache-aware` (prefix-hash): steady state, the groups already learnt; and "unique", a
  never-seen prompt every time (nothing reusable to hash, nothing to match);
- `precise-cache-aware` (precise-prefix), the index fed with KV events for each group's
  system prompt on its home backend, tokenising with `lbproxy.tokenization.token_cache.
  PromptTokenizer` over `lbproxy.tokenization.tokenizer.Tokenizer` (the shipped small BPE):
  cold = the first request of a group (an empty cache: the whole prompt encoded, plus
  the cost of caching it); warm = a later request of the group (the system prompt's ids
  spliced from the cache, the rest encoded); "warm, ids as array" = the same returning
  `array('I')`, which the precise index converts to bytes without a per-token loop;
  "token ids given" = the prompt's ids handed to routing as an `array('I')`, as the
  proxy's forwarder does after tokenising off the event loop (`proxy/prompt_ids.py`):
  routing work alone. The precise rows mark each
  request's question with a number of its own (first, so it differs from every earlier
  prompt right after the system prompt, and never repeats across runs). If the lbproxy
  modules are absent, `tokenizers` directly: cold = a full encode, warm = the system
  prompt's ids reused by hand plus the question encoded.

Each decision gets a fresh RequestContext, as in the proxy. Every cell is the median over
`--repeat` runs of the per-run median of `--decisions` decisions (after a warm-up);
"prefix part" is the prefix scorer's own score() + on_routed() measured the same way,
sent to its best-scoring backend, to show what does and does not grow with the pool (the
pipeline itself, and the queue / KV / saturation plugins, are O(backends)).

    python benchmarks/decision_cost.py [--decisions 300] [--repeat 7] [--backends 4 20 256]
        [--clock wall|cpu] [--out FILE]
    python benchmarks/decision_cost.py --table FILE [AFTER_FILE]

`--out FILE` writes the rows as JSON with the command line, the commit of the lbproxy
code measured (the checkout the `lbproxy` package was imported from: run it from another
checkout with PYTHONPATH to measure that code), the date and the machine's load averages
before and after. An existing FILE is extended, and each cell of its table is the median over
the runs that measured it: runs of one pool size at a time can be interleaved with
another checkout's, in as many rounds as wanted.
`--table FILE` prints the markdown table from a file; with two files, "before -> after".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.profiles import build_router
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

NOW = 1000.0
# The clock `timed` reads: wall time, or this thread's CPU time (--clock cpu), which
# other processes competing for the cores do not inflate.
CLOCK = [time.perf_counter_ns]
TICKS = itertools.count()
GROUPS = 4
TARGET_TOKENS = 7200
QUESTION_TOKENS = 400
BLOCK_SIZE = 16

# ---- deterministic English-like text -------------------------------------------------------

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her are this an be which or "
    "have had not but what all were when we there can more if will one about up out them so "
    "some would other into has time two like then these its than could only new first any may "
    "over such where most after also made many before must through back years much way well "
    "down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another "
    "know while last might great old year off come since against go came right used take three "
    "system cache request server model token block memory queue route prefix latency "
    "throughput backend engine batch scheduler"
)
_WORDS = _VOCABULARY.split()


def english(rng: random.Random, n_words: int) -> str:
    weights = [1.0 / (i + 1) for i in range(len(_WORDS))]  # Zipf-like
    words = rng.choices(_WORDS, weights, k=n_words)
    out, sentence = [], 0
    for w in words:
        if sentence == 0:
            w = w.capitalize()
        sentence += 1
        if sentence > rng.randrange(8, 22):
            w += rng.choice(".....?!")
            sentence = 0
        elif rng.random() < 0.06:
            w += ","
        out.append(w)
    return " ".join(out)


def make_text(rng: random.Random, encode: Callable[[str], list[int]], tokens: int) -> str:
    """English-like text of about `tokens` tokens under `encode`."""
    text = english(rng, tokens)
    ratio = tokens / max(1, len(encode(text)))
    return english(rng, max(1, int(tokens * ratio)))


# ---- tokenizer -------------------------------------------------------------------------------


def load_encoder() -> tuple[Callable[[str], list[int]], str, Any]:
    """(encode without special tokens, description, lbproxy Tokenizer or None)."""
    try:
        from lbproxy.tokenization.tokenizer import Tokenizer
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None:
        tok = Tokenizer.from_file()

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)

        name = f"lbproxy.tokenization.tokenizer.Tokenizer ({tok.name}, vocab {tok.vocab_size})"
        return encode, name, tok
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    corpus = [english(random.Random(i), 2000) for i in range(20)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4096, show_progress=False))
    name = "tokenizers BPE trained in-process (vocab 4096)"
    return (lambda text: tk.encode(text).ids), name, None


def prompt_tokenizer(tok: Any) -> Any:
    """A PromptTokenizer over `tok`, or None without lbproxy.tokenization.token_cache."""
    try:
        from lbproxy.tokenization.token_cache import PromptTokenizer
    except ImportError:
        return None
    return PromptTokenizer(tok) if tok is not None else None


# ---- fleet -----------------------------------------------------------------------------------


def fleet(n: int) -> list[Endpoint]:
    eps = []
    for i in range(n):
        ep = Endpoint(name=f"b{i:03d}", url=f"http://b{i}", block_size=BLOCK_SIZE)
        ep.num_gpu_blocks = 30_000
        ep.metrics = MetricsSnapshot(
            time=NOW, num_running=4.0, num_waiting=float(i % 3), kv_cache_usage=0.2 + i % 5 / 10
        )
        ep.in_flight = 4 + i % 3
        eps.append(ep)
    return eps


class Stored:
    """A BlockStored event as the KV-event decoder produces it (matched by class name)."""

    def __init__(self, hashes: list[int], tokens: list[int]) -> None:
        self.block_hashes = hashes
        self.parent_block_hash = None
        self.token_ids = tokens
        self.block_size = BLOCK_SIZE


Stored.__name__ = "BlockStored"


def timed(
    make_ctx: Callable[[int], RequestContext], call: Callable[[RequestContext], Any], n: int
) -> float:
    """Median µs of `call` over n fresh contexts (built outside the timing)."""
    ctxs = [make_ctx(i) for i in range(n)]
    clock = CLOCK[0]
    samples = []
    for c in ctxs:
        t0 = clock()
        call(c)
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000.0


def median_of_runs(run: Callable[[], float], repeat: int) -> float:
    run()  # warm-up, discarded
    return statistics.median(run() for _ in range(repeat))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- scenarios -------------------------------------------------------------------------------


class Workload:
    def __init__(self, encode: Callable[[str], list[int]], seed: int = 0) -> None:
        rng = random.Random(seed)
        self.encode = encode
        self.systems = [
            make_text(rng, encode, TARGET_TOKENS - QUESTION_TOKENS) for _ in range(GROUPS)
        ]
        self.system_ids = [encode(s) for s in self.systems]
        self.questions = [
            " " + make_text(rng, encode, QUESTION_TOKENS) for _ in range(64)
        ]  # a pool to draw from; each request picks group and question
        self.rng = rng

    def prompt(self, i: int) -> tuple[int, str]:
        g = i % GROUPS
        q = self.questions[(i * 7 + i // GROUPS) % len(self.questions)]
        return g, self.systems[g] + q + f" ({i})"

    def fresh(self, i: int) -> tuple[int, str]:
        """Like prompt(i), with its number before the question: nothing after the system
        prompt matches an earlier prompt (as for a fresh question from a new user)."""
        g = i % GROUPS
        q = self.questions[(i * 7 + i // GROUPS) % len(self.questions)]
        return g, self.systems[g] + f" ({i})" + q

    def unique(self, i: int) -> str:
        return f"[{i}:{self.rng.random()}] " + self.prompt(i)[1]


def prime_prefix(router: Router, wl: Workload, eps: list[Endpoint]) -> None:
    for i in range(GROUPS * 4):
        _, text = wl.prompt(i)
        router.route(RequestContext(model="m", raw_prompt=text.encode()), eps, NOW)


def prime_precise(shared: dict[str, Any], wl: Workload, eps: list[Endpoint]) -> None:
    index = shared["precise_index"]
    for g, ids in enumerate(wl.system_ids):
        full = len(ids) // BLOCK_SIZE * BLOCK_SIZE
        hashes = [g * 1_000_000 + j for j in range(full // BLOCK_SIZE)]
        index.apply_events(eps[g % len(eps)].name, [Stored(hashes, ids[:full])])


def run(args: argparse.Namespace) -> None:
    encode, tok_name, tok = load_encoder()
    wl = Workload(encode)
    sample_tokens = len(encode(wl.prompt(0)[1]))
    sample_bytes = len(wl.prompt(0)[1].encode())
    n, rep = args.decisions, args.repeat
    seq = itertools.count(1_000_000)  # request numbers for the precise rows, never reused

    def text_ctx(text: str) -> RequestContext:
        return RequestContext(model="m", raw_prompt=text.encode())

    full_cache: dict[str, array[int]] = {}
    # One warm PromptTokenizer for the whole run, primed with the first requests of each
    # group (cold), then past its first self-checked splices (a full encode each).
    warm_pt = prompt_tokenizer(tok)
    if warm_pt is not None:
        for i in range(GROUPS + warm_pt.verify_first):
            warm_pt.ids_for_body(body_of(wl.fresh(next(seq) // GROUPS * GROUPS + i % GROUPS)[1]))

    def tok_ctx(i: int, mode: str) -> RequestContext:
        if mode == "given":
            g, text = wl.prompt(i)
            ids = full_cache.get(text)
            if ids is None:
                ids = full_cache[text] = array("I", encode(text))
            ctx = RequestContext(model="m", raw_prompt=text.encode())
            ctx.set_token_ids(ids)
            return ctx
        g, text = wl.fresh(next(seq) // GROUPS * GROUPS + i % GROUPS)
        body = body_of(text)
        if warm_pt is None:  # no lbproxy.tokenization.token_cache: the old by-hand versions
            if mode == "cold":
                fn = lambda c: encode(text)  # noqa: E731
            else:
                question = text[len(wl.systems[g]) :]
                fn = lambda c: wl.system_ids[g] + encode(question)  # noqa: E731
        elif mode == "cold":  # the first request of its group: an empty cache
            fn: Callable[[RequestContext], Any] = prompt_tokenizer(tok)
        elif mode == "warm":
            fn = warm_pt
        else:  # "warm-array"
            fn = lambda c: warm_pt.array_for_body(c.body)  # noqa: E731
        return RequestContext(model="m", body=body, raw_prompt=text.encode(), _tokenize=fn)

    def question_ctx(i: int) -> RequestContext:
        g, text = wl.fresh(next(seq) // GROUPS * GROUPS + i % GROUPS)
        question = text[len(wl.systems[g]) :]
        return RequestContext(model="m", _tokenize=lambda c: encode(question))

    rows: list[tuple[str, int, float, float]] = []
    load_before = os.getloadavg()
    for nb in args.backends:
        # prefix-hash, steady state
        eps = fleet(nb)
        r = build_router("cache-aware", BuildContext(pool="p", model="m"), seed=1)
        prime_prefix(r, wl, eps)
        scorer = r.scorers[0].scorer

        def route(c: RequestContext, r: Router = r, eps: list[Endpoint] = eps) -> Any:
            return r.route(c, eps, NOW)

        def part(c: RequestContext, s: Any = scorer, eps: list[Endpoint] = eps) -> None:
            scores = s.score(c, eps, NOW)
            s.on_routed(c, eps[scores.index(max(scores))], NOW)

        full = median_of_runs(lambda: timed(lambda i: text_ctx(wl.prompt(i)[1]), route, n), rep)
        own = median_of_runs(lambda: timed(lambda i: text_ctx(wl.prompt(i)[1]), part, n), rep)
        rows.append(("cache-aware (prefix-hash), shared prefixes", nb, full, own))
        full = median_of_runs(lambda: timed(lambda i: text_ctx(wl.unique(i)), route, n), rep)
        own = median_of_runs(lambda: timed(lambda i: text_ctx(wl.unique(i)), part, n), rep)
        rows.append(("cache-aware (prefix-hash), unique prompts", nb, full, own))

        # precise-prefix
        for mode, label in (
            ("cold", "tokeniser cold"),
            ("warm", "tokeniser warm"),
            ("warm-array", "tokeniser warm, ids as array"),
            ("given", "token ids given (routing alone)"),
        ):
            if mode == "warm-array" and warm_pt is None:
                continue
            eps = fleet(nb)
            shared: dict[str, Any] = {}
            bctx = BuildContext(pool="p", metrics_max_age=1e12, shared=shared)
            r = build_router("precise-cache-aware", bctx, seed=1)
            prime_precise(shared, wl, eps)
            scorer = r.scorers[0].scorer

            # Time moves 10 ms per decision, so speculative entries (2 s) expire as live.
            def route2(c: RequestContext, r: Router = r, eps: list[Endpoint] = eps) -> Any:
                return r.route(c, eps, NOW + next(TICKS) * 0.01)

            def part2(c: RequestContext, s: Any = scorer, eps: list[Endpoint] = eps) -> None:
                now = NOW + next(TICKS) * 0.01
                scores = s.score(c, eps, now)
                s.on_routed(c, eps[scores.index(max(scores))], now)

            reps = max(3, rep // 2) if mode == "cold" else rep
            full = median_of_runs(lambda m=mode: timed(lambda i: tok_ctx(i, m), route2, n), reps)
            own = median_of_runs(lambda m=mode: timed(lambda i: tok_ctx(i, m), part2, n), reps)
            rows.append((f"precise-cache-aware (precise-prefix), {label}", nb, full, own))

    tok_alone = median_of_runs(lambda: timed(lambda i: tok_ctx(i, "cold"), _tokens, n), 3)
    warm_alone = median_of_runs(lambda: timed(lambda i: tok_ctx(i, "warm"), _tokens, n), 3)
    array_alone = median_of_runs(lambda: timed(lambda i: tok_ctx(i, "warm-array"), _tokens, n), 3)
    question_alone = median_of_runs(lambda: timed(question_ctx, _tokens, n), 3)

    stats = warm_pt.stats() if warm_pt is not None else None
    result = {
        "command": "python " + " ".join(sys.argv),
        "commit": code_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "clock": "thread CPU time" if CLOCK[0] is time.thread_time_ns else "wall time",
        "python": platform.python_version(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "tokenizer": tok_name,
        "prompt": {"tokens": sample_tokens, "bytes": sample_bytes},
        "settings": {"decisions": n, "repeat": rep, "backends": args.backends},
        "tokenising_alone_us": {
            "cold": tok_alone,
            "warm": warm_alone,
            "warm_array": array_alone,
            "question": question_alone,
        },
        "warm_prompt_tokenizer": stats,
        "rows": [
            {"case": label, "backends": nb, "decision_us": full, "prefix_part_us": own}
            for label, nb, full, own in rows
        ],
    }
    if args.out:
        write_result(Path(args.out), result)
    print_run(result)


# ---- result files ------------------------------------------------------------------------------


def code_commit() -> str:
    """The commit of the checkout `lbproxy` was imported from ("+dirty" if it has changes)."""
    import lbproxy

    tree = Path(lbproxy.__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tree), *cmd], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lbproxy")
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({tree})"
    return commit + ("+dirty" if dirty else "")


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write `result` to `path`, or merge it into the runs already there."""
    runs: list[dict[str, Any]] = []
    if path.exists():
        runs = json.loads(path.read_text())["runs"]
    runs.append(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs, "rows": merged_rows(runs)}, indent=1) + "\n")


def merged_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (case, backends) row of the runs: the median over the runs that have it (so
    rounds of interleaved runs add up), with how many runs and which commits."""
    rows: dict[tuple[str, int], list[tuple[dict[str, Any], str]]] = {}
    for run_ in runs:
        for r in run_["rows"]:
            rows.setdefault((r["case"], r["backends"]), []).append((r, run_["commit"]))
    out = []
    for (case, nb), got in rows.items():
        out.append(
            {
                "case": case,
                "backends": nb,
                "decision_us": statistics.median(r["decision_us"] for r, _ in got),
                "prefix_part_us": statistics.median(r["prefix_part_us"] for r, _ in got),
                "runs": len(got),
                "commits": sorted({c for _, c in got}),
            }
        )
    return out


def print_run(result: dict[str, Any]) -> None:
    p = result["prompt"]
    t = result["tokenising_alone_us"]
    print(f"# Routing decision cost, {p['tokens']} tokens / {p['bytes']} bytes per prompt")
    print()
    print(f"command: {result['command']}")
    print(f"commit {result['commit']}, {result['date']}, clock: {result['clock']}")
    print(f"load average before {fmt_load(result['load_before'])}, after "
          f"{fmt_load(result['load_after'])}")  # fmt: skip
    print(f"python {result['python']}, {result['cpu']}")
    print(f"tokenizer: {result['tokenizer']}")
    print(
        f"tokenising alone: cold {t['cold']:.0f} µs, warm {t['warm']:.0f} µs, "
        f"warm as array {t['warm_array']:.0f} µs (the question alone: {t['question']:.0f} µs)"
    )
    stats = result["warm_prompt_tokenizer"]
    if stats is not None:
        print(
            f"warm PromptTokenizer: {stats['hits']} hits, {stats['misses']} misses, "
            f"{stats['verifications']} self-checks, {stats['cached_tokens']} tokens cached "
            f"in {stats['entries']} prompts"
        )
    print()
    print("| profile / case | backends | decision µs (median) | prefix part µs |")
    print("|---|---:|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['case']} | {r['backends']} | {r['decision_us']:.1f} | "
            f"{r['prefix_part_us']:.1f} |"
        )


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def table(paths: list[str]) -> str:
    """The markdown table of one result file, or "before -> after" of two."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    cells: list[dict[tuple[str, int], float]] = []
    cases: list[str] = []
    sizes: list[int] = []
    for f in files:
        c: dict[tuple[str, int], float] = {}
        for r in f["rows"]:
            whole = f"{r['case']}: whole decision"
            part = f"{r['case']}: ... of which the prefix scorer"
            c[(whole, r["backends"])] = r["decision_us"]
            c[(part, r["backends"])] = r["prefix_part_us"]
            for case in (whole, part):
                if case not in cases:
                    cases.append(case)
            if r["backends"] not in sizes:
                sizes.append(r["backends"])
        cells.append(c)
    sizes.sort()
    lines = []
    for f, p in zip(files, paths, strict=True):
        runs = f["runs"]
        commits = sorted({r["commit"] for r in runs})
        loads = [x for r in runs for x in (r["load_before"][0], r["load_after"][0])]
        lines.append(
            f"{p}: commit {', '.join(commits)}; {len(runs)} run(s) {runs[0]['date']} to "
            f"{runs[-1]['date']}; {runs[0]['clock']}; 1-min load {min(loads):.2f}-"
            f"{max(loads):.2f}; {runs[0]['cpu']}"
        )
    lines.append("")
    head = " -> ".join(["before", "after"][: len(files)]) if len(files) > 1 else ""
    lines.append(
        "| case | "
        + " | ".join(f"{n} backends{' (' + head + ')' if head else ''}" for n in sizes)
        + " |"
    )
    lines.append("|---|" + "---:|" * len(sizes))
    for case in cases:
        row = []
        for n in sizes:
            vals = [c.get((case, n)) for c in cells]
            row.append(" -> ".join("-" if v is None else fmt_us(v) for v in vals))
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def body_of(text: str) -> dict[str, Any]:
    # No BOS: the ids must match the system prompts' ids the index was primed with.
    return {"model": "m", "prompt": text, "add_special_tokens": False}


def _tokens(c: RequestContext) -> None:
    c.token_ids()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decisions", type=int, default=300)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--backends", type=int, nargs="+", default=[4, 20, 256])
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--out", help="write (or extend) this JSON result file")
    p.add_argument("--table", nargs="+", metavar="FILE", help="print the table of result files")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.clock == "cpu":
        CLOCK[0] = time.thread_time_ns
    run(args)


if __name__ == "__main__":
    main()
