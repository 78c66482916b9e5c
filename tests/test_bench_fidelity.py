"""The offline simulator agrees with reality: one small case run both ways.

Live: simulated vLLM servers behind the real lbproxy, loaded by `lbproxy bench`'s
generator. Offline: `lbproxy simulate` of the same fleet, workload, arrivals and routing.
Output tokens/s and TTFT p50 must agree within 10% at every rate step (in engine time).

Sizes are chosen so that the live side's own overheads (HTTP, the proxy, the event loop,
CPU contention: ~10 ms of wall time per request) stay small next to the engine's times on
a busy 2-core machine: older cards (vendor-a) with 1,500-token questions make TTFT
~0.25-0.35 s, prompts go out as token ids (so the servers do not spend the loop on
tokenising them) and 4 tokens per SSE chunk. Speed 1: a sped-up server multiplies that
wall-time overhead by its speed, and at speed 2 a loaded machine pushed TTFT past 10%.
"""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.bench.loadgen import LoadOptions, bench_run, live_fleet
from lbproxy.bench.simulate import simulate_run
from lbproxy.bench.workloads import make_workload
from lbproxy.sim.fleet import parse_fleet
from lbproxy.tokenization.tokenizer import default_tokenizer

SPEED = 1.0
RATES = [2.0, 5.0]  # requests per engine second: light, then busier (queueing)
DURATION = 10.0  # engine seconds of arrivals per step (TTFT p50: 0.27 s, then 0.38 s)
TOLERANCE = 0.10

FLEET = {
    "model": "fidelity-model",
    "stream_interval": 4,
    "backends": [{"name": "a", "profile": "vendor-a", "port": 0, "count": 2}],
}
WORKLOAD = {
    "num_groups": 4,
    "num_prompts_per_group": 50,  # more prompts than requests: questions are never cached
    "system_prompt_len": 1000,
    "question_len": 1500,
    "output_len": 32,
}


def _close(live: float | None, sim: float | None) -> bool:
    assert live is not None and sim is not None
    return abs(live - sim) <= TOLERANCE * sim


@pytest.mark.timeout(90)
async def test_live_bench_and_simulate_agree() -> None:
    tok = default_tokenizer()
    fleet = parse_fleet(FLEET, "fidelity")
    workload = make_workload("shared-prefix", tok, WORKLOAD, prompt_format="ids")

    # The engine model's fidelity, without flow control on either side (its holding
    # depends on scrape timing, which a sped-up live fleet cannot reproduce exactly).
    sim = simulate_run(fleet, workload, "round-robin", RATES, duration=DURATION, tokenizer=tok)
    async with live_fleet(
        fleet, "round-robin", speed=SPEED, flow_control={"enabled": False}
    ) as url:
        opts = LoadOptions(target=url, model=fleet.model, duration=DURATION, time_scale=SPEED)
        live = await bench_run(workload, RATES, opts, profile="round-robin")

    rows: list[dict[str, Any]] = []
    for s, lv in zip(sim["steps"], live["steps"], strict=True):
        rows.append(
            {
                "rate": s["rate"],
                "tok/s sim": round(s["output_tokens_per_s"], 1),
                "tok/s live": round(lv["output_tokens_per_s"], 1),
                "ttft50 sim": round(s["ttft_p50_s"] or 0, 4),
                "ttft50 live": round(lv["ttft_p50_s"] or 0, 4),
            }
        )
    print("fidelity:", rows)
    for s, lv in zip(sim["steps"], live["steps"], strict=True):
        # Both sides served the same requests in full, to the same backends.
        assert lv["errors"] == 0 and lv["incomplete"] == 0, lv
        assert lv["completed"] == s["completed"] == s["requests"] > 0
        assert lv["backends"] == s["backends"]
        assert _close(lv["output_tokens_per_s"], s["output_tokens_per_s"]), rows
        assert _close(lv["ttft_p50_s"], s["ttft_p50_s"]), rows
