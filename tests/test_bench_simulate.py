"""The offline fleet simulator: routing fed as in the proxy, deadlines, results, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lbproxy.bench import report
from lbproxy.bench.cli import main as bench_main
from lbproxy.bench.simulate import FleetSimulator, SimOptions, simulate_run
from lbproxy.bench.stats import poisson_arrivals
from lbproxy.bench.workloads import Workload, make_workload
from lbproxy.routing.state import Decision, Endpoint, RequestContext
from lbproxy.sim.fleet import FleetSpec, load_fleet, parse_fleet
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def fleet(n: int = 2, profile: str = "vendor-a", **extra: Any) -> FleetSpec:
    entry = {"name": "a", "profile": profile, "port": 0, "count": n, **extra}
    return parse_fleet({"model": "m", "backends": [entry]}, "test-fleet")


def thrashing_workload(tok: Tokenizer) -> Workload:
    # 32 system prompts of 6,000 tokens: 192K tokens, more than one vendor-a card's KV cache
    # (160K) but half of it per card fits: round-robin thrashes, cache-aware does not.
    params = {
        "num_groups": 32,
        "num_prompts_per_group": 4,
        "system_prompt_len": 6000,
        "question_len": 100,
        "output_len": 20,
    }
    return make_workload("shared-prefix", tok, params)


def test_cache_aware_beats_round_robin(tok: Tokenizer) -> None:
    wl = thrashing_workload(tok)
    rr = simulate_run(fleet(), wl, "round-robin", [4, 10], duration=30, tokenizer=tok)
    ca = simulate_run(fleet(), wl, "cache-aware", [4, 10], duration=30, tokenizer=tok)
    busy_rr, busy_ca = rr["steps"][-1], ca["steps"][-1]
    assert busy_ca["delivered_output_tokens_per_s"] > 1.3 * busy_rr["delivered_output_tokens_per_s"]
    assert busy_ca["ttft_p50_s"] * 10 < busy_rr["ttft_p50_s"]
    assert busy_ca["prefix_cache_hit_rate"] > busy_rr["prefix_cache_hit_rate"] + 0.2
    # Round-robin spreads requests evenly; cache-aware follows the prefixes.
    counts = busy_rr["backends"]
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(busy_ca["backends"].values()) == busy_ca["requests"]


def test_routing_sees_exact_in_flight_and_scrape_aged_metrics(tok: Tokenizer) -> None:
    opts = SimOptions(scrape_interval=0.5, seed=1)
    sim = FleetSimulator(fleet(3), "cache-aware", tokenizer=tok, options=opts)
    route = sim.router.route
    ages: list[float] = []

    def checked(ctx: RequestContext, endpoints: list[Endpoint], now: float) -> Decision | None:
        for ep, engine in zip(endpoints, sim.engines, strict=True):
            # The proxy counts a request from routing to its last byte; engines hold exactly
            # the requests routed to them and not yet finished.
            assert ep.in_flight == engine.num_running + engine.num_waiting
            assert ep.metrics is not None and ep.block_size == 16
            ages.append(now - ep.metrics.time)
        assert ctx.token_ids() is not None and ctx.prompt_bytes()
        return route(ctx, endpoints, now)

    sim.router.route = checked  # type: ignore[method-assign]
    wl = thrashing_workload(tok)
    records = sim.run_step(wl, poisson_arrivals(6, 20, 0), first_index=0, deadline=60)
    assert len(records) > 50 and all(r.status == "ok" for r in records)
    assert min(ages) >= 0 and max(ages) <= 0.5 + 1e-9  # never older than one interval
    assert max(ages) > 0.3  # and they do age between scrapes
    assert all(ep.in_flight == 0 for ep in sim.endpoints)


def test_deadline_cuts_requests_and_the_fleet_carries_on(tok: Tokenizer) -> None:
    sim = FleetSimulator(fleet(1), "round-robin", tokenizer=tok)
    wl = thrashing_workload(tok)
    arrivals = poisson_arrivals(8, 10, 0)
    cut = sim.run_step(wl, arrivals, first_index=0, deadline=10)  # no drain: overloaded
    assert {r.status for r in cut} == {"ok", "incomplete"}
    assert all(r.end is not None and r.end <= 10 + 1e-9 for r in cut)
    assert sim.engines[0].num_running + sim.engines[0].num_waiting == 0
    assert sim.endpoints[0].in_flight == 0
    start = sim.now
    calm = sim.run_step(wl, [0.5, 5.0], first_index=len(arrivals), deadline=60)
    assert [r.status for r in calm] == ["ok", "ok"] and sim.now > start
    assert calm[0].start == pytest.approx(0.5)  # times are relative to the step's start


def test_precise_index_is_fed_by_kv_events(tok: Tokenizer) -> None:
    wl = thrashing_workload(tok)
    hits = {}
    for profile in ("round-robin", "precise-cache-aware"):
        sim = FleetSimulator(fleet(), profile, tokenizer=tok)
        records = sim.run_step(wl, poisson_arrivals(6, 20, 0), first_index=0, deadline=60)
        hits[profile] = sum(r.cached_tokens for r in records) / sum(
            r.prompt_tokens for r in records
        )
    assert sim.precise is not None
    stats = sim.precise.stats()
    assert stats["stored_blocks"] > 1000 and stats["orphan_blocks"] == 0
    assert hits["precise-cache-aware"] > hits["round-robin"] + 0.15, hits


def test_chunks_follow_the_backends_stream_interval(tok: Tokenizer) -> None:
    params = {
        "num_groups": 1,
        "num_prompts_per_group": 1,
        "system_prompt_len": 64,
        "question_len": 8,
        "output_len": 32,
    }
    wl = make_workload("shared-prefix", tok, params)
    sim = FleetSimulator(fleet(1, stream_interval=4), "round-robin", tokenizer=tok)
    (rec,) = sim.run_step(wl, [0.0], first_index=0, deadline=30)
    assert rec.output_tokens == 32
    # First token alone, then 7 chunks of 4 and a last one of 3 tokens: 8 gaps.
    assert len(rec.itl) == 8
    assert sum(rec.itl) == pytest.approx(rec.end - rec.first_token)


def test_simulate_is_deterministic(tok: Tokenizer) -> None:
    wl = thrashing_workload(tok)
    a = simulate_run(fleet(), wl, "cache-aware", [5], duration=10, tokenizer=tok)
    b = simulate_run(fleet(), wl, "cache-aware", [5], duration=10, tokenizer=tok)
    assert a == b


def test_simulate_cli_writes_results(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "model: m\nbackends:\n  - {name: a, profile: vendor-a, port: 0}\n"
        "  - {name: b, profile: vendor-b, port: 0}\n"
    )
    out = tmp_path / "out"
    code = bench_main(
        [
            "simulate",
            "--fleet",
            str(fleet_file),
            "--profiles",
            "round-robin,least-request",
            "--num-groups",
            "4",
            "--system-prompt-len",
            "500",
            "--question-len",
            "50",
            "--output-len",
            "10",
            "--rates",
            "2,4",
            "--duration",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    res = report.load_results(out)
    assert res["tool"] == "lbproxy simulate"
    assert res["workload"]["params"]["num_groups"] == 4
    assert [r["profile"] for r in res["runs"]] == ["round-robin", "least-request"]
    for run in res["runs"]:
        assert [s["rate"] for s in run["steps"]] == [2.0, 4.0]
        assert all(s["completed"] > 0 and s["errors"] == 0 for s in run["steps"])
    assert json.loads((out / "results.json").read_text())["settings"]["scrape_interval_s"] > 0
    for png in ("throughput.png", "ttft.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "least-request" in (out / "results.md").read_text()
    assert (
        bench_main(
            [
                "simulate",
                "--fleet",
                str(fleet_file),
                "--profiles",
                "nope",
                "--rates",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    ("name", "mix"),
    [
        ("a-4", {"vendor-a": 4}),
        ("b-8", {"vendor-b": 8}),
        ("c-8", {"vendor-c": 8}),
        ("ab-12", {"vendor-a": 4, "vendor-b": 8}),
        ("abc-20", {"vendor-a": 4, "vendor-b": 8, "vendor-c": 8}),
    ],
)
def test_shipped_fleets(name: str, mix: dict[str, int]) -> None:
    spec = load_fleet(ROOT / "configs" / "fleets" / f"{name}.yaml")
    assert spec.model == "granite-4.1-8b"
    got: dict[str, int] = {}
    for b in spec.backends:
        got[b.profile.name] = got.get(b.profile.name, 0) + 1
    assert got == mix
    n = len(spec.backends)
    assert [b.port for b in spec.backends] == list(range(8001, 8001 + n))
    assert len({b.name for b in spec.backends}) == n


def test_simulate_cli_flow_control_slo_and_mix(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "model: m\nbackends:\n  - {name: a, profile: vendor-a, port: 0, count: 2}\n"
    )
    common = [
        "simulate",
        "--fleet",
        str(fleet_file),
        "--profiles",
        "round-robin",
        "--num-groups",
        "4",
        "--system-prompt-len",
        "500",
        "--question-len",
        "50",
        "--output-len",
        "20",
        "--rates",
        "2,6",
        "--duration",
        "10",
        "--slo-ttft",
        "1.5",
        "--slo-itl",
        "0.05",
        "--mix",
        "gold:1:3,bronze:2",
        "--quiet",
        "--no-plots",
    ]
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        extra = ["--max-wait", "20", "--max-queue", "50"] if mode == "on" else []
        assert bench_main([*common, "--flow-control", mode, *extra, "--out", str(out)]) == 0
        res = report.load_results(out)
        runs[mode] = res
        flow = res["settings"]["flow_control"]
        assert flow["enabled"] is (mode == "on")
        assert (res["settings"]["slo_ttft_s"], res["settings"]["slo_itl_s"]) == (1.5, 0.05)
        assert [c["name"] for c in res["settings"]["mix"]] == ["gold", "bronze"]
        for step in res["runs"][0]["steps"]:
            assert step["slo_ttft_s"] == 1.5 and step["slo_itl_s"] == 0.05
            assert set(step["classes"]) == {"gold", "bronze"}
            assert sum(c["requests"] for c in step["classes"].values()) == step["requests"]
            assert 0 <= step["goodput_output_tokens_per_s"] <= step["completed_output_tokens_per_s"]
    assert runs["on"]["settings"]["flow_control"] == {
        "enabled": True,
        "max_wait": 20.0,
        "max_queue": 50,
        "flow_header": "x-tenant",  # --mix: the classes are flows
    }
    assert runs["on"]["runs"][0]["label"] == "round-robin"
    assert runs["off"]["runs"][0]["label"] == "round-robin (flow off)"
    # Below capacity flow control holds nothing: the same requests complete either way.
    low_on, low_off = runs["on"]["runs"][0]["steps"][0], runs["off"]["runs"][0]["steps"][0]
    assert low_on["completed"] == low_off["completed"] == low_on["requests"]
    assert low_off["rejected"] == 0 and low_off["queue_wait_p50_s"] is None
    # A compare of the two reads as two labelled lines.
    cmp_dir = tmp_path / "cmp"
    assert bench_main(["bench", "--compare", str(tmp_path / "on"), str(tmp_path / "off"),
                       "--out", str(cmp_dir), "--quiet"]) == 0  # fmt: skip
    md = (cmp_dir / "results.md").read_text()
    assert "## round-robin (flow off)" in md and "goodput tok/s" in md
    for png in ("goodput.png", "slo.png"):
        assert (cmp_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_flow_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "flow.yaml"
    cfg.write_text("flow_control: {max_wait: 7, limit: {target_itl: 0.05}}\n")
    out = tmp_path / "o"
    args = [
        "simulate", "--fleet", str(ROOT / "configs/fleets/a-4.yaml"), "--workload",
        "shared-prefix", "--num-groups", "2", "--num-prompts-per-group", "2",
        "--system-prompt-len", "100", "--question-len", "20", "--output-len", "5",
        "--profiles", "round-robin", "--rates", "1", "--duration", "3", "--quiet",
        "--no-plots", "--flow-config", str(cfg), "--max-queue", "9", "--out", str(out),
    ]  # fmt: skip
    assert bench_main(args) == 0
    flow = json.loads((out / "results.json").read_text())["settings"]["flow_control"]
    assert flow == {
        "enabled": True,
        "max_wait": 7,
        "limit": {"target_itl": 0.05},
        "max_queue": 9,
    }
    cfg.write_text("flow_control: {limit: {target_itl: -1}}\n")
    assert bench_main([*args[:-2], "--out", str(tmp_path / "bad")]) == 2
    assert f"{cfg}: limit.target_itl: must be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["simulate", "bench"])
def test_a_warmup_longer_than_the_step_is_refused_before_anything_runs(
    tmp_path: Path, cmd: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    where = ["--fleet", "a-4", "--profiles", "round-robin"]
    if cmd == "bench":
        where = ["--target", "http://127.0.0.1:9"]
    args = [cmd, *where, "--workload", "shared-prefix"]
    args += ["--rates", "50", "--duration", "40", "--warmup", "60", "--out", str(out)]
    assert bench_main(args) == 2
    assert "--warmup must be within [0, --duration) = [0, 40), got 60" in capsys.readouterr().err
    assert not out.exists()  # refused up front: no step was simulated or sent
