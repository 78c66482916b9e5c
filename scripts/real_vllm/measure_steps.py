#!/usr/bin/env python3
"""Measure the engine step times of real vLLM servers, for a simulator hardware profile.

    python scripts/real_vllm/measure_steps.py \\
        --urls http://127.0.0.1:8111,http://127.0.0.1:8112 \\
        --tokenizer ~/.cache/lbproxy-real-vllm/tiny-llama/tokenizer.json \\
        --out benchmarks/results/real-vllm/steps.json

Every experiment runs on all the servers at once (the same requests to each, so the
servers are loaded together as in a benchmark) and sends streaming completions exactly
as `lbproxy bench` does (`ignore_eos`, `min_tokens = max_tokens`, usage in every chunk),
prompts as token ids of single-token words (nothing cached unless stated):

- decode: B requests of L prompt tokens sent together, N tokens out each. Once their
  prefills are done all B decode in lockstep, one token each per engine step, so the time
  per token of each request between 20% and 90% of its output is the step time of a
  pure-decode batch of B with a KV context of B x (L + tokens so far). Reported: the
  median over requests (client clock), the server's mean `vllm:inter_token_latency_seconds`
  and its engine steps (`vllm:iteration_tokens_total` count) over the experiment.
- prefill: one request of L tokens at a time on an idle server, 2 tokens out; its TTFT
  (client clock, send to first token) is one prefill step plus the fixed latency of the
  HTTP/API-server path, so its growth with L gives the prefill cost per token.
- cached: a prompt of P cached + L new tokens (the P-token prefix sent once before), its
  TTFT against the same prompt with nothing cached: a check of the prefix-hit cost.

Results go to --out as JSON (raw per-experiment figures); scripts/real_vllm/fit_profile.py
fits the step-time model to them. Nothing here looks at a routing or flow-control result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cpuwatch  # scripts/real_vllm/cpuwatch.py, next to this file
import orjson

from lbproxy.bench.workloads import word_bank
from lbproxy.tokenization.tokenizer import Tokenizer

JSON = {"Content-Type": "application/json"}


@dataclass
class Stream:
    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens so far)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def tokens_at(self, t: float) -> float:
        """Tokens received by time t (linear between chunks)."""
        prev = (self.sent, 0)
        for c in self.chunks:
            if c[0] >= t:
                span = c[0] - prev[0]
                return prev[1] + (c[1] - prev[1]) * ((t - prev[0]) / span if span > 0 else 1)
            prev = c
        return float(prev[1])

    def per_token(self, start: float, end: float) -> float | None:
        """Seconds per token of this request between `start` and `end`."""
        n = self.tokens_at(end) - self.tokens_at(start)
        return (end - start) / n if n >= 4 else None


async def stream(
    session: aiohttp.ClientSession, url: str, model: str, ids: list[int], max_tokens: int
) -> Stream:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    st = Stream(sent=time.perf_counter())
    buf = b""
    try:
        async with session.post(
            f"{url}/v1/completions", data=orjson.dumps(body), headers=JSON
        ) as resp:
            if resp.status != 200:
                st.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return st
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                        continue
                    obj = orjson.loads(ev[6:])
                    usage = obj.get("usage") or {}
                    n = usage.get("completion_tokens")
                    if n is None:
                        continue
                    st.prompt_tokens = usage.get("prompt_tokens") or 0
                    details = usage.get("prompt_tokens_details") or {}
                    st.cached_tokens = details.get("cached_tokens") or 0
                    if obj.get("choices") and (not st.chunks or n > st.chunks[-1][1]):
                        st.chunks.append((now, n))
    except Exception as e:  # one failed stream is reported, not fatal
        st.error = f"{type(e).__name__}: {e}"
    return st


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The counters this script reads from a server's /metrics."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    want = {
        "vllm:iteration_tokens_total_count": "steps",
        "vllm:iteration_tokens_total_sum": "step_tokens",
        "vllm:inter_token_latency_seconds_sum": "itl_sum",
        "vllm:inter_token_latency_seconds_count": "itl_count",
        "vllm:num_preemptions_total": "preemptions",
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:prefix_cache_hits_total": "prefix_hits",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in want:
            out[want[name]] = out.get(want[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Prompts:
    """Token ids of single-token words: distinct prompts, or shared prefixes."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        bank = word_bank(tokenizer)
        self.ids = [int(i) for i in bank.ids]
        self.bos = tokenizer.tokenizer.token_to_id("<|begin_of_text|>")
        self.rng = random.Random(seed)

    def words(self, n: int) -> list[int]:
        return [self.rng.choice(self.ids) for _ in range(n)]

    def prompt(self, n: int, prefix: list[int] | None = None) -> list[int]:
        """n tokens in all, BOS first (as the server's tokenizer would add it)."""
        head = prefix if prefix is not None else [self.bos]
        return head + self.words(n - len(head))


async def run_decode(
    session: aiohttp.ClientSession,
    urls: list[str],
    model: str,
    prompts: Prompts,
    batch: int,
    length: int,
    out_tokens: int,
    shared: int = 0,
    groups: int = 1,
) -> dict[str, Any]:
    """B requests of `length` tokens sent together; with `shared`, request i starts with
    the `shared`-token prefix i mod `groups` (each server has its own prefixes)."""
    before = await asyncio.gather(*(scrape(session, u) for u in urls))
    t0 = time.perf_counter()
    tasks = []
    for u in urls:
        prefixes = [prompts.prompt(shared) for _ in range(groups)] if shared else [None]
        for i in range(batch):
            ids = prompts.prompt(length, prefixes[i % len(prefixes)])
            tasks.append(stream(session, u, model, ids, out_tokens))
    streams = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    after = await asyncio.gather(*(scrape(session, u) for u in urls))
    res: dict[str, Any] = {
        "kind": "decode",
        "batch": batch,
        "prompt_len": length,
        "shared_prefix": shared,
        "groups": groups if shared else 0,
        "out_tokens": out_tokens,
        "wall_s": wall,
        "errors": [s.error for s in streams if s.error][:3],
        "servers": [],
    }
    for k, u in enumerate(urls):
        mine = streams[k * batch : (k + 1) * batch]
        ttfts = sorted(t for s in mine if (t := s.ttft) is not None)
        d = {key: after[k].get(key, 0.0) - before[k].get(key, 0.0) for key in after[k]}
        # Lockstep: every request has its first token and none has finished; a margin of
        # two chunks at each end keeps the last prefill step and the first exit out.
        last_first = max((s.chunks[min(2, len(s.chunks) - 1)][0] for s in mine if s.chunks),
                         default=t0)  # fmt: skip
        first_end = min((s.chunks[max(0, len(s.chunks) - 3)][0] for s in mine if s.chunks),
                        default=t0)  # fmt: skip
        per_tok = (
            [p for s in mine if (p := s.per_token(last_first, first_end)) is not None]
            if first_end > last_first
            else []
        )
        res["servers"].append(
            {
                "url": u,
                "per_token_median_s": statistics.median(per_tok) if per_tok else None,
                "per_token_p10_s": _q(per_tok, 0.1),
                "per_token_p90_s": _q(per_tok, 0.9),
                "ttft_first_s": ttfts[0] if ttfts else None,
                "ttft_last_s": ttfts[-1] if ttfts else None,
                # all in decode from the last first token to the first finish
                "lockstep_s": first_end - last_first,
                "lockstep_tokens": statistics.mean(
                    s.tokens_at(first_end) - s.tokens_at(last_first) for s in mine
                )
                if first_end > last_first
                else 0,
                # mean KV context per request over the lockstep window
                "lockstep_context": length
                + statistics.mean(
                    (s.tokens_at(first_end) + s.tokens_at(last_first)) / 2 for s in mine
                ),
                "server_itl_mean_s": d["itl_sum"] / d["itl_count"] if d.get("itl_count") else None,
                "server_steps": d.get("steps"),
                "server_step_tokens": d.get("step_tokens"),
                "preemptions": d.get("preemptions"),
                "cached_tokens_mean": statistics.mean(s.cached_tokens for s in mine),
            }
        )
    return res


def _out(args: argparse.Namespace, batch: int, length: int) -> int:
    """Tokens out: enough for --out-tokens lockstep steps after the prefill ramp (B x L
    tokens, at most 2,048 a step, less the decodes running with them), within
    max_model_len 2,048."""
    ramp = -(-batch * length // 2048)
    return min(args.out_tokens + ramp * 5 // 4 + 8, 2047 - length)


def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_admission(
    session: aiohttp.ClientSession,
    urls: list[str],
    model: str,
    prompts: Prompts,
    batch: int,
    probes: int = 12,
) -> dict[str, Any]:
    """TTFT of a request arriving at a busy server, in steps: `batch` long decodes (512
    prompt tokens, 1,024 out) keep each server stepping; once their prefills are done,
    `probes` requests (a cached 768-token prefix + 128 new tokens, 2 tokens out) arrive
    one at a time at random moments; their TTFT is divided by the step time meanwhile
    (vllm:inter_token_latency_seconds over the probe window)."""
    rng = random.Random(batch)
    background = [
        asyncio.ensure_future(stream(session, u, model, prompts.prompt(512), 1024))
        for u in urls
        for _ in range(batch)
    ]
    prefix = {u: prompts.prompt(768) for u in urls}
    for u in urls:  # cache the probes' prefix
        await stream(session, u, model, prefix[u] + prompts.words(128), 1)
    await asyncio.sleep(batch * 512 / 2048 * 0.05 + 1.0)  # past the background's prefills
    before = await asyncio.gather(*(scrape(session, u) for u in urls))
    ttfts: list[list[float]] = [[] for _ in urls]
    for _ in range(probes):
        await asyncio.sleep(rng.uniform(0.05, 0.15))
        got = await asyncio.gather(
            *(stream(session, u, model, prefix[u] + prompts.words(128), 2) for u in urls)
        )
        for k, st in enumerate(got):
            if st.ttft is not None:
                ttfts[k].append(st.ttft)
    after = await asyncio.gather(*(scrape(session, u) for u in urls))
    for t in background:
        t.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    out = []
    for k, u in enumerate(urls):
        d = {key: after[k].get(key, 0.0) - before[k].get(key, 0.0) for key in after[k]}
        step = d["itl_sum"] / d["itl_count"] if d.get("itl_count") else None
        ttft = statistics.median(ttfts[k]) if ttfts[k] else None
        out.append({"url": u, "ttft_median_s": ttft, "step_s": step,
                    "ttft_in_steps": ttft / step if ttft and step else None,
                    "ttfts_s": ttfts[k]})  # fmt: skip
    await asyncio.sleep(1.0)  # let the aborted background requests leave the servers
    return {"kind": "admission", "batch": batch, "probes": probes, "servers": out}


async def run_prefill(
    session: aiohttp.ClientSession,
    urls: list[str],
    model: str,
    prompts: Prompts,
    length: int,
    repeat: int,
    cached: int = 0,
) -> dict[str, Any]:
    """TTFT of one request of `length` tokens at a time (each server in parallel);
    with `cached`, its first `cached` tokens were sent (and cached) just before."""
    ttfts: list[list[float]] = [[] for _ in urls]
    hits: list[list[int]] = [[] for _ in urls]
    for _ in range(repeat):
        jobs = []
        for u in urls:
            if cached:
                prefix = prompts.prompt(cached)
                await stream(session, u, model, prefix + prompts.words(1), 1)
                ids = prompts.prompt(length, prefix)
            else:
                ids = prompts.prompt(length)
            jobs.append(stream(session, u, model, ids, 2))
        got = await asyncio.gather(*jobs)
        for k, s in enumerate(got):
            if s.ttft is not None and s.error is None:
                ttfts[k].append(s.ttft)
                hits[k].append(s.cached_tokens)
        await asyncio.sleep(0.05)
    return {
        "kind": "cached" if cached else "prefill",
        "prompt_len": length,
        "cached_prefix": cached,
        "repeat": repeat,
        "servers": [
            {
                "url": u,
                "ttft_median_s": statistics.median(ttfts[k]) if ttfts[k] else None,
                "ttft_min_s": min(ttfts[k]) if ttfts[k] else None,
                "ttfts_s": ttfts[k],
                "cached_tokens": hits[k],
            }
            for k, u in enumerate(urls)
        ],
    }


async def run_api_cost(
    session: aiohttp.ClientSession,
    urls: list[str],
    model: str,
    prompts: Prompts,
    tokenizer: Tokenizer,
    length: int,
    count: int,
    as_text: bool,
    server_pids: list[int],
) -> dict[str, Any]:
    """CPU seconds the API server process spends per request (prompt of `length` tokens
    sent as text or as ids, 1 token out, mostly cached so the engine does little):
    the growth of its process_cpu_seconds_total over `count` requests, 8 at a time."""
    prefix = prompts.prompt(length - 16)
    out = []
    for u, pid in zip(urls, server_pids, strict=False):
        await stream(session, u, model, prefix + prompts.words(16), 1)

        async def cpu(u: str = u) -> float:
            async with session.get(f"{u}/metrics") as r:
                text = await r.text()
            line = next(ln for ln in text.splitlines() if ln.startswith("process_cpu_seconds"))
            return float(line.split()[-1])

        m0 = await scrape(session, u)
        c0 = await cpu()
        tree0 = cpuwatch.session_cpu(pid)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(8)

        async def one(u: str = u, sem: asyncio.Semaphore = sem) -> None:
            ids = prefix + prompts.words(16)
            async with sem:
                if as_text:
                    text = tokenizer.tokenizer.decode(ids[1:], skip_special_tokens=False)
                    await stream_text(session, u, model, text, 1)
                else:
                    await stream(session, u, model, ids, 1)

        await asyncio.gather(*(one() for _ in range(count)))
        wall = time.perf_counter() - t0
        c1 = await cpu()
        tree = cpuwatch.session_cpu(pid) - tree0
        m1 = await scrape(session, u)
        d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
        out.append(
            {
                "url": u,
                "api_cpu_per_request_s": (c1 - c0) / count,  # the API server process alone
                "server_cpu_per_request_s": tree / count,  # API + engine core + worker
                "wall_s": wall,
                # what the engine did for them (the fit subtracts its modelled step time)
                "steps": d.get("steps"),
                "step_tokens": d.get("step_tokens"),
                "prompt_tokens": d.get("prompt_tokens"),
                "prefix_hits": d.get("prefix_hits"),
            }
        )
    return {"kind": "api", "prompt_len": length, "as_text": as_text, "count": count,
            "servers": out}  # fmt: skip


async def stream_text(
    session: aiohttp.ClientSession, url: str, model: str, text: str, max_tokens: int
) -> None:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    async with session.post(f"{url}/v1/completions", data=orjson.dumps(body), headers=JSON) as r:
        await r.read()


DECODE_GRID = [(1, 128), (1, 1024), (16, 128), (16, 1024), (64, 128), (64, 512), (64, 1024),
               (128, 128), (128, 512), (128, 1024), (256, 128), (256, 512)]  # fmt: skip
# (B, L, shared prefix, prefixes): each request's own 128 tokens after one of 8 shared
# prefixes of 384-1,024 tokens (the workload's shape); with the B x 128 points above
# (no prefix), the cost of a context token read again in a step.
SHARED_GRID = [(128, 512, 384, 8), (128, 896, 768, 8), (128, 1152, 1024, 8),
               (256, 512, 384, 8), (256, 896, 768, 8), (256, 1152, 1024, 8)]  # fmt: skip
PREFILL_LENS = [16, 128, 256, 512, 1024, 1536, 2000]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    urls = [u.rstrip("/") for u in args.urls.split(",")]
    prompts = Prompts(Tokenizer.from_file(args.tokenizer), args.seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    conn = aiohttp.TCPConnector(limit=0)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        model = args.model
        info = ""
        for u in urls:
            async with session.get(f"{u}/metrics") as r:
                text = await r.text()
            cfg = next(ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info"))
            print(f"{u}: {cfg[:200]}", flush=True)
            info = info or cfg
        await run_prefill(session, urls, model, prompts, 64, 3)  # warm-up, not kept
        only = set(args.only.split(",")) if args.only else None
        pids = cpuwatch.server_pids(Path(args.run_dir).expanduser()) if args.run_dir else []
        if args.rt:
            cpuwatch.realtime(pids)
        elif args.nice:
            cpuwatch.prioritize(pids, args.nice)

        def want(kind: str) -> bool:
            return only is None or kind in only

        async def measure(make: Any) -> None:
            """Run an experiment on a quiet machine; redo it (twice at most) when other
            processes took more than --max-foreign cores meanwhile."""
            for attempt in range(3):
                quiet = await asyncio.to_thread(cpuwatch.wait_quiet, pids, args.max_foreign, 600.0)
                watch = cpuwatch.CpuWatch(pids)
                r = await make()
                r["foreign_cores"] = round(watch.foreign_cores(), 3)
                r["foreign_cores_before"] = round(quiet, 3)
                print(_line(r) + f" [foreign {r['foreign_cores']:.2f} cores]", flush=True)
                if r["foreign_cores"] <= args.max_foreign or attempt == 2:
                    results.append(r)
                    return

        if want("api"):
            tok = Tokenizer.from_file(args.tokenizer)
            for length, as_text in ((128, False), (896, False), (896, True)):
                await measure(
                    lambda n=length, t=as_text: run_api_cost(
                        session, urls, model, prompts, tok, n, 300, t, pids
                    )
                )
        if want("prefill"):
            for length in PREFILL_LENS:
                await measure(
                    lambda n=length: run_prefill(session, urls, model, prompts, n, args.repeat)
                )
        if want("cached"):
            for cached, length in [(512, 640), (768, 896), (1024, 1152), (1536, 1664)]:
                await measure(
                    lambda c=cached, n=length: run_prefill(
                        session, urls, model, prompts, n, args.repeat, c
                    )
                )
        if want("admission"):
            for batch in (16, 64, 128):
                await measure(lambda b=batch: run_admission(session, urls, model, prompts, b))
        for rep in range(args.passes):
            # Passes in alternating order, so that a drift of the machine does not line up
            # with batch size or context.
            if want("decode"):
                grid = DECODE_GRID if not args.quick else [(1, 128), (64, 512), (256, 512)]
                for batch, length in grid if rep % 2 == 0 else grid[::-1]:
                    await measure(
                        lambda b=batch, n=length: run_decode(
                            session, urls, model, prompts, b, n, _out(args, b, n)
                        )
                    )
            if want("shared"):
                grid2 = SHARED_GRID if rep % 2 == 0 else SHARED_GRID[::-1]
                for batch, length, shared, groups in grid2:
                    await measure(
                        lambda b=batch, n=length, sh=shared, g=groups: run_decode(
                            session, urls, model, prompts, b, n, _out(args, b, n), sh, g
                        )
                    )
    return {"urls": urls, "model": args.model, "out_tokens": args.out_tokens,
            "cache_config_info": info, "experiments": results}  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.2f}"

    if r["kind"] == "api":
        head = f"api L={r['prompt_len']} text={r['as_text']}"
        parts = [
            f"API {s['api_cpu_per_request_s'] * 1e3:.2f} ms, server "
            f"{s['server_cpu_per_request_s'] * 1e3:.2f} ms CPU/request"
            for s in r["servers"]
        ]
        return f"{head}: " + " | ".join(parts)
    if r["kind"] == "admission":
        parts = [
            f"ttft {ms(s['ttft_median_s'])} ms at step {ms(s['step_s'])} ms "
            f"({s['ttft_in_steps'] or 0:.1f} steps)"
            for s in r["servers"]
        ]
        return f"admission B={r['batch']}: " + " | ".join(parts)
    if r["kind"] == "decode":
        head = f"decode B={r['batch']} L={r['prompt_len']} shared={r['shared_prefix']}"
        if r.get("groups"):
            head += f"x{r['groups']}"
        parts = [
            f"{ms(s['per_token_median_s'])} ms/tok (server itl {ms(s['server_itl_mean_s'])})"
            for s in r["servers"]
        ]
    else:
        head = f"{r['kind']} L={r['prompt_len']} cached={r['cached_prefix']}"
        parts = [
            f"ttft {ms(s['ttft_median_s'])} ms (min {ms(s['ttft_min_s'])})" for s in r["servers"]
        ]
    return f"{head}: " + " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", required=True)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--tokenizer", required=True, help="the servers' tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--out-tokens", type=int, default=128, help="decode: lockstep tokens")
    ap.add_argument("--repeat", type=int, default=7, help="prefill: requests per length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--only", default="", help="comma list of api,prefill,cached,admission,decode,shared"
    )
    ap.add_argument(
        "--run-dir",
        default="~/.cache/lbproxy-real-vllm/run-overload",
        help="start_servers.sh's run directory (server pids, for the foreign-load check)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="renice the servers and this process to this (0: leave them)",
    )
    ap.add_argument(
        "--rt",
        action="store_true",
        help="run the servers and this process under SCHED_RR (needs root), and keep idle "
        "cores busy at a lower RR priority (cpuwatch.Keeper), so that background jobs "
        "can neither delay them nor evict their caches; back to normal at the end",
    )
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="redo an experiment when other processes used more cores than this",
    )
    ap.add_argument("--quick", action="store_true", help="3 decode points only")
    ap.add_argument("--passes", type=int, default=2, help="decode grids, each point once a pass")
    args = ap.parse_args()
    # SIGTERM ends the run through the finally blocks (servers back to normal scheduling)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    keeper = cpuwatch.Keeper() if args.rt else contextlib.nullcontext()
    try:
        with keeper:
            data = asyncio.run(main_async(args))
    finally:
        if args.rt:
            cpuwatch.normal(cpuwatch.server_pids(Path(args.run_dir).expanduser()))
    data["scheduling"] = (
        "SCHED_RR 10, idle cores kept busy at RR 1" if args.rt else f"nice {args.nice}"
    )
    data["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    data["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out} in {data['wall_s']} s")


if __name__ == "__main__":
    main()
