"""`lbproxy simulate --capacity`: each card type saturated alone, shared and cold, summed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lbproxy.bench.capacity import (
    CapacityOptions,
    capacity,
    card_types,
    decode_roofline,
    shared_workload,
)
from lbproxy.bench.cli import main as bench_main
from lbproxy.bench.workloads import Workload, make_workload
from lbproxy.sim.fleet import FleetSpec, parse_fleet
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

FLEET = {
    "model": "m",
    "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "count": 2},
        {"name": "c", "profile": "vendor-c", "port": 0},
    ],
}
# 100 system prompts of 2,000 tokens: 200K tokens, more than a vendor-a cache (160K) holds;
# a third of them (34 groups, what one of 3 backends gets from a cache-affine router) fits.
PARAMS = {
    "num_groups": 100,
    "num_prompts_per_group": 2,
    "system_prompt_len": 2000,
    "question_len": 50,
    "output_len": 100,
}
WORKLOAD_ARGS = [
    "--num-groups",
    "100",
    "--num-prompts-per-group",
    "2",
    "--system-prompt-len",
    "2000",
    "--question-len",
    "50",
    "--output-len",
    "100",
]
OPTS = CapacityOptions(duration=40, warmup=15)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def fleet() -> FleetSpec:
    return parse_fleet(FLEET, "test-fleet")


@pytest.fixture(scope="module")
def workload(tok: Tokenizer) -> Workload:
    return make_workload("shared-prefix", tok, PARAMS)


@pytest.fixture(scope="module")
def result(fleet: FleetSpec, workload: Workload, tok: Tokenizer) -> dict[str, Any]:
    return capacity(fleet, workload, tok, OPTS)


def test_card_types_and_shared_workload(
    fleet: FleetSpec, workload: Workload, tok: Tokenizer
) -> None:
    types = card_types(fleet)
    assert [(name, count) for name, count, _ in types] == [("vendor-a", 2), ("vendor-c", 1)]
    assert all(len(single.backends) == 1 for _, _, single in types)
    shared = shared_workload(workload, tok, len(fleet.backends))
    assert shared.params["num_groups"] == math.ceil(100 / 3) == 34
    assert {k: v for k, v in shared.params.items() if k != "num_groups"} == {
        k: v for k, v in workload.params.items() if k != "num_groups"
    }


def test_bound_is_the_sum_of_the_cards(result: dict[str, Any]) -> None:
    cards = result["cards"]
    assert list(cards) == ["vendor-a", "vendor-c"]
    a, c = cards["vendor-a"], cards["vendor-c"]
    assert (a["count"], c["count"]) == (2, 1)
    assert result["bound_output_tokens_per_s"] == pytest.approx(
        2 * a["shared_output_tokens_per_s"] + c["shared_output_tokens_per_s"]
    )
    assert result["bound_cold_output_tokens_per_s"] == pytest.approx(
        2 * a["cold_output_tokens_per_s"] + c["cold_output_tokens_per_s"]
    )
    assert result["shared_workload"]["params"]["num_groups"] == 34
    assert result["workload"]["params"]["num_groups"] == 100


@pytest.mark.parametrize("card", ["vendor-a", "vendor-c"])
def test_each_card_is_measured_saturated_and_steady(result: dict[str, Any], card: str) -> None:
    c = result["cards"][card]
    for mode in ("shared", "cold"):
        f = c[mode]
        # Saturated: requests waited in the engine throughout the window, which opened
        # after the warm-up and ran to the end of the arrivals.
        assert f["saturated"]
        assert OPTS.warmup <= f["window_s"][0] < f["window_s"][1] == OPTS.duration
        assert f["requests_completed"] < f["requests_offered"]
        # Steady: the two halves of the window agree (loosely in a 25 s window: the
        # full-size runs agree within a few percent).
        first, second = f["first_half_output_tokens_per_s"], f["second_half_output_tokens_per_s"]
        assert first == pytest.approx(second, rel=0.15)
        # Never above the step-time model's decode roofline at the prompt's context.
        assert 0 < f["output_tokens_per_s"] <= f["roofline_output_tokens_per_s"]
        assert f["rate_offered"] * f["output_tokens_mean"] == pytest.approx(
            OPTS.overload * f["roofline_output_tokens_per_s"]
        )
    assert c["cold_output_tokens_per_s"] <= c["shared_output_tokens_per_s"] * 1.01


def test_sharing_matters_where_the_cache_is_small(result: dict[str, Any]) -> None:
    a, c = result["cards"]["vendor-a"], result["cards"]["vendor-c"]
    # vendor-a cannot hold all 200K tokens of system prompts: the cold run recomputes them.
    assert a["shared_output_tokens_per_s"] > 2 * a["cold_output_tokens_per_s"]
    assert a["shared_prefix_hit_rate"] > a["cold_prefix_hit_rate"] + 0.3
    assert c["shared_output_tokens_per_s"] > a["shared_output_tokens_per_s"]


def test_saturated_figure_does_not_depend_on_the_rate(
    fleet: FleetSpec, workload: Workload, tok: Tokenizer, result: dict[str, Any]
) -> None:
    """Twice the overload, the same figures: what is measured is the card, not the load."""
    harder = capacity(fleet, workload, tok, CapacityOptions(duration=40, warmup=15, overload=4))
    for name, c in harder["cards"].items():
        base = result["cards"][name]
        assert c["rate_offered"] == pytest.approx(2 * base["rate_offered"])
        for key in ("shared_output_tokens_per_s", "cold_output_tokens_per_s"):
            assert c[key] == pytest.approx(base[key], rel=0.02)


def test_decode_roofline_falls_with_context(fleet: FleetSpec) -> None:
    profile = fleet.backends[0].profile
    assert decode_roofline(profile, 1000) > 2 * decode_roofline(profile, 8000)
    per_seq = profile.per_request_overhead_s + profile.kv_bytes_per_token * 8000 / (
        profile.kv_read_efficiency * profile.mem_bandwidth_bytes_per_s
    )
    assert decode_roofline(profile, 8000) == pytest.approx(1 / per_seq)


def test_capacity_cli(tmp_path: Path, result: dict[str, Any]) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(json.dumps(FLEET))
    out = tmp_path / "cap"
    args = ["simulate", "--capacity", "--fleet", str(fleet_file), *WORKLOAD_ARGS]
    code = bench_main([*args, "--duration", "40", "--warmup", "15", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "capacity.json").read_text())
    # The same computation as the library call (deterministic).
    assert data["bound_output_tokens_per_s"] == pytest.approx(result["bound_output_tokens_per_s"])
    assert data["cards"]["vendor-a"]["cold_output_tokens_per_s"] == pytest.approx(
        result["cards"]["vendor-a"]["cold_output_tokens_per_s"]
    )
    assert data["settings"]["fleet"] == str(fleet_file)
    assert (data["settings"]["duration_s"], data["settings"]["warmup_s"]) == (40, 15)
    md = (out / "capacity.md").read_text()
    assert f"**Bound: {data['bound_output_tokens_per_s']:,.0f} output tok/s**" in md
    assert "| vendor-a | 2 |" in md and "| vendor-c | 1 |" in md
    # Too short to see a request finish after the warm-up: an error, not a figure.
    bad = bench_main([*args, "--duration", "12", "--warmup", "10", "--out", str(out), "--quiet"])
    assert bad == 2
