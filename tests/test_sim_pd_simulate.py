"""`lbproxy simulate` with P/D roles: the proxy's P/D decision in virtual time, the split
request as prefill (KV held) -> transfer over the fleet's link -> decode, the `pd` figures
of results.json, and flow control holding a split request as one pair."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lbproxy.bench.simulate import FleetSimulator, simulate_run
from lbproxy.bench.stats import poisson_arrivals
from lbproxy.bench.workloads import make_workload
from lbproxy.config import FlowControl
from lbproxy.sim.fleet import parse_fleet
from lbproxy.sim.hardware import load_profile
from lbproxy.sim.kv_transfer import transfer_bytes, transfer_seconds
from lbproxy.tokenization.tokenizer import default_tokenizer

TOK = default_tokenizer()


def _workload(output_len: int = 32) -> Any:
    params = {"seed": 0, "output_len": output_len, "system_prompt_len": 1500, "question_len": 300}
    return make_workload("shared-prefix", TOK, params)


def _fleet(min_prompt_tokens: int = 512, **extra: Any) -> Any:
    return parse_fleet(
        {
            "model": "m",
            "backends": [
                {"name": "p", "profile": "vendor-b", "port": 0, "role": "prefill"},
                {"name": "d", "profile": "vendor-a", "port": 0, "role": "decode", "count": 2},
            ],
            "disaggregation": {"min_prompt_tokens": min_prompt_tokens},
            **extra,
        }
    )


def _step(fleet: Any, rate: float = 2.0, flow: FlowControl | None = None, **kw: Any) -> Any:
    run = simulate_run(fleet, _workload(), "cache-aware", [rate], duration=20, tokenizer=TOK,
                       flow=flow, **kw)  # fmt: skip
    return run["steps"][0]


def test_split_requests_prefill_transfer_and_decode() -> None:
    step = _step(_fleet(min_prompt_tokens=0))  # split every request
    pd = step["pd"]
    assert step["completed"] == step["requests"] > 10
    assert pd["disaggregated"] == step["requests"] and pd["aggregated"] == 0
    assert step["backends"]["p"] == step["requests"]  # every prefill on the prefill side
    assert step["backends"]["d-0"] + step["backends"]["d-1"] == step["requests"]
    assert sum(pd["pairs"].values()) == step["requests"]
    assert set(pd["pairs"]) == {"p->d-0", "p->d-1"}
    assert 0 < pd["kv_transfer_p50_s"] < pd["decode_ttft_p50_s"]  # the pull, then a step
    assert pd["prefill_p50_s"] > 0
    assert step["ttft_p50_s"] > pd["decode_ttft_p50_s"]  # the client's TTFT spans both legs
    assert step["prefix_cache_hit_rate"] > 0  # the prefill side's prefix cache


def test_transfer_time_is_bytes_over_the_pair_link() -> None:
    """One request: its pull takes the KV bytes of its prompt's blocks / the vendor pair's
    link, both for the fleet's `links` entry and the default link."""
    wl = _workload()
    n = len(wl.token_ids(0))
    blocks = math.ceil(n / 16)
    consumer = load_profile("vendor-a")
    nbytes = transfer_bytes(blocks, consumer.block_size, consumer.kv_bytes_per_token)
    for extra, gbps in (({"links": {"vendor-a": {"vendor-b": 400}}}, 400.0), ({}, 100.0)):
        run = simulate_run(_fleet(**extra), wl, "cache-aware", [1.0], duration=5, tokenizer=TOK,
                           max_requests=1)  # fmt: skip
        pd = run["steps"][0]["pd"]
        assert pd["disaggregated"] == 1
        assert pd["kv_transfer_p50_s"] == pytest.approx(transfer_seconds(nbytes, gbps))


def test_short_prompts_stay_aggregated_off_the_prefill_backend() -> None:
    step = _step(_fleet(min_prompt_tokens=10**6))
    assert step["completed"] == step["requests"] > 10
    assert step["pd"]["disaggregated"] == 0
    assert step["pd"]["reasons"] == {"short_prompt": step["requests"]}
    assert step["backends"]["p"] == 0  # a prefill-only backend never serves aggregated


def test_producer_blocks_are_freed_once_pulled() -> None:
    sim = FleetSimulator(_fleet(), "cache-aware", tokenizer=TOK)
    records = sim.run_step(_workload(), poisson_arrivals(2.0, 10, 0), first_index=0,
                           deadline=60)  # fmt: skip
    assert all(r.status == "ok" for r in records)
    assert sim.engines[0].num_held == 0
    assert sim.engines[0].kv_cache_usage == 0.0
    assert [ep.in_flight for ep in sim.endpoints] == [0, 0, 0]


def test_a_fleet_without_a_decode_side_is_refused() -> None:
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "p", "profile": "vendor-b", "port": 0, "role": "prefill"}]})  # fmt: skip
    with pytest.raises(ValueError, match="no decode-capable backend"):
        FleetSimulator(fleet, "cache-aware", tokenizer=TOK)


def test_fleet_role_defaults_from_kv_role_and_is_checked() -> None:
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "p", "profile": "vendor-b", "port": 0, "kv_role": "producer"},
        {"name": "d", "profile": "vendor-b", "port": 0, "kv_role": "consumer"},
        {"name": "x", "profile": "vendor-b", "port": 0}]})  # fmt: skip
    assert [b.role for b in fleet.backends] == ["prefill", "decode", "both"]
    assert fleet.disaggregated and fleet.disaggregation is None
    with pytest.raises(ValueError, match=r"backends\[0\]\.role: must be one of"):
        parse_fleet({"model": "m", "backends": [
            {"name": "p", "profile": "vendor-b", "port": 0, "role": "producer"}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"disaggregation\.min_prompt_tokens"):
        parse_fleet({"model": "m", "disaggregation": {"min_prompt_tokens": -1}, "backends": [
            {"name": "p", "profile": "vendor-b", "port": 0}]})  # fmt: skip
