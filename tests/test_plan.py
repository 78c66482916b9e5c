"""`lbproxy plan` on a small two-vendor fleet, through the real command line: the baseline
is a candidate, every candidate has the issue's fields, they come best first by goodput,
cross-vendor splits are marked with the link assumed, and it runs in well under a minute."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lbproxy.bench.plan import (
    combine,
    count_splits,
    layouts_by_type,
    link_info,
    search,
    type_moves,
)
from lbproxy.sim.fleet import parse_fleet

FLEET = """
model: granite-4.1-8b
links: {vendor-a: {vendor-b: 400}}
backends:
  - {name: a, profile: vendor-a, port: 0, count: 2}
  - {name: b, profile: vendor-b, port: 0, count: 2}
"""
FIELDS = (
    "roles",
    "goodput_output_tokens_per_s",
    "completed_output_tokens_per_s",
    "ttft_p50_s",
    "itl_p50_s",
    "cross_vendor_kv",
)


def test_plan_on_a_small_fleet(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    out = tmp_path / "plan"
    cmd = [sys.executable, "-m", "lbproxy", "plan", "--fleet", str(fleet), "--workload",
           "shared-prefix", "--output-len", "64", "--system-prompt-len", "2000",
           "--question-len", "600", "--rate", "4", "--duration", "15", "--warmup", "5",
           "--drain", "30", "--out", str(out), "--quiet"]  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert time.monotonic() - t0 < 60

    plan = json.loads((out / "plan.json").read_text())
    cands = plan["candidates"]
    # 3^2 - 3 type layouts, the baseline, count splits of the 2 best (2 cards: k=1), and
    # at most 2 ascent rounds of 3 moves per type and one combination.
    assert 7 <= len(cands) == plan["settings"]["candidates_evaluated"] <= 11 + 2 * (2 * 3 + 1)
    assert "3^T - 3" in plan["settings"]["search"]
    base = [c for c in cands if c["stage"] == "baseline"]
    assert len(base) == 1 and base[0] == plan["baseline"]
    assert base[0]["roles"] == {"vendor-a": "both", "vendor-b": "both"}
    assert base[0]["cross_vendor_kv"] is False and "pd" not in base[0]
    for c in cands:
        for key in FIELDS:
            assert key in c, (key, c["layout"])
        assert set(c["roles"].values()) <= {"prefill", "decode", "both"}
    goodputs = [c["goodput_output_tokens_per_s"] for c in cands]
    assert goodputs == sorted(goodputs, reverse=True)  # best first
    assert plan["best"] == cands[0]
    assert max(goodputs) > 0
    # a: prefill, b: decode splits every request across vendors, on the 400 Gb/s link.
    cross = next(c for c in cands if c["roles"] == {"vendor-a": "prefill", "vendor-b": "decode"})
    assert cross["cross_vendor_kv"] is True and cross["cross_vendor_share"] == 1.0
    assert cross["assumed_links"] == [{"prefill": "vendor-a", "decode": "vendor-b", "gbps": 400.0}]
    assert "vLLM does not have" in cross["note"]
    assert cross["pd"]["disaggregated"] > 0
    md = (out / "plan.md").read_text()
    assert "(baseline)" in md and "400 Gb/s assumed" in md
    assert (out / "goodput.png").stat().st_size > 1000


def test_search_space() -> None:
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "count": 4},
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 8},
        {"name": "c", "profile": "vendor-c", "port": 0, "count": 8}]})  # fmt: skip
    by_type = layouts_by_type(fleet)
    assert len(by_type) == 24 == len(set(by_type))
    assert ("both",) * 20 not in by_type
    splits = count_splits(fleet, ("both",) * 20)
    assert len(splits) == 9  # 3 per type: N/4, N/2, 3N/4
    within_b = [s for s in splits if s[4:12].count("prefill") == 4]
    assert within_b == [("both",) * 4 + ("prefill",) * 4 + ("decode",) * 4 + ("both",) * 8]
    one_type = parse_fleet({"model": "m", "backends": [
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 2}]})  # fmt: skip
    assert layouts_by_type(one_type) == []  # all-prefill and all-decode cannot serve
    assert count_splits(one_type, ("both", "both")) == [("prefill", "decode")]
    # A split within one vendor's cards needs no transfer between vendors.
    assert link_info(one_type, ("prefill", "decode")) == (False, [])
    cross, links = link_info(fleet, ("prefill",) * 4 + ("decode",) * 16)
    assert cross and {(lk["prefill"], lk["decode"]) for lk in links} == {
        ("vendor-a", "vendor-b"), ("vendor-a", "vendor-c")}  # fmt: skip


def _scored(target: tuple[str, ...]):
    """A `search` evaluate whose goodput is the cards a layout has as `target` has them
    (no simulation: the search's own logic, checked on a known optimum)."""
    done: dict = {}

    def evaluate(layouts: list[tuple[str, ...]], stage: str) -> None:
        for lay in layouts:
            if lay not in done:
                hits = sum(a == b for a, b in zip(lay, target, strict=True))
                cand = {"stage": stage, "goodput_output_tokens_per_s": float(hits),
                        "completed_output_tokens_per_s": 0.0, "ttft_p50_s": 0.0}  # fmt: skip
                done[lay] = (cand, None)

    return done, evaluate


def test_ascent_changes_several_types_together() -> None:
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "count": 2},
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 4},
        {"name": "c", "profile": "vendor-c", "port": 0, "count": 4}]})  # fmt: skip
    # a: 1 prefill + 1 decode, b: 1 prefill + 3 decode, c: 2 + 2, no earlier stage has
    # it: the count splits change one type of a by-type layout or of the baseline.
    target = ("prefill", "decode") + ("prefill",) + ("decode",) * 3 + ("prefill",) * 2 + (
        "decode",) * 2  # fmt: skip
    done, evaluate = _scored(target)
    assert search(fleet, done, evaluate, refine=2, rounds=0) == 0
    assert target not in done
    before = len(done)
    assert before <= 1 + 24 + 2 * 3 * 3

    done, evaluate = _scored(target)
    rounds = search(fleet, done, evaluate, refine=2, rounds=2)
    assert target in done
    assert 1 <= rounds <= 2
    assert len(done) - before <= rounds * (5 * 3 + 1)  # the bound in SEARCH
    combined = [lay for lay, (c, _) in done.items() if c["stage"] == "combined"]
    assert combined, "no candidate changed several types at once"
    for lay in combined:
        assert len(done[lay][0]["moved_types"]) >= 2, done[lay][0]
    assert done[target][0]["stage"] in ("ascent", "combined")


def test_type_moves_and_combine() -> None:
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "count": 2},
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 4}]})  # fmt: skip
    base = ("both",) * 6
    moves = type_moves(fleet, base)
    # a: prefill, decode, 1+1 split; b: prefill, decode, splits 1+3, 2+2, 3+1
    assert [len(m) for m in moves.values()] == [3, 5]
    a_split = ("prefill", "decode") + ("both",) * 4
    b_decode = ("both", "both") + ("decode",) * 4
    assert a_split in moves["vendor-a"] and b_decode in moves["vendor-b"]
    assert combine(base, [a_split, b_decode]) == ("prefill", "decode") + ("decode",) * 4


# 30 req/s overloads the 4 cards, so flow control has something to refuse: each
# candidate but the all-aggregated ones refuses dozens in 6 virtual seconds.
OVERLOAD = ("--rate", "30", "--duration", "6", "--warmup", "2", "--drain", "10")
# A run whose figures are not looked at (only its settings): as little work as it takes.
TOKEN = ("--rate", "1", "--duration", "1", "--warmup", "0", "--drain", "1")


def _plan_cli(tmp_path: Path, name: str, *extra: str, load: tuple[str, ...] = OVERLOAD) -> dict:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "lbproxy", "plan", "--fleet", str(fleet), "--workload",
           "shared-prefix", "--output-len", "64", "--system-prompt-len", "2000",
           "--question-len", "600", *load, "--refine", "0", "--rounds", "0", "--no-plots",
           "--quiet", "--out", str(out), *extra]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=120, cwd=Path(__file__).parent.parent)
    return json.loads((out / "plan.json").read_text())


def test_flow_control_on_by_default_and_off_on_request(tmp_path: Path) -> None:
    on = _plan_cli(tmp_path, "on")
    flow = on["settings"]["flow_control"]
    assert flow["enabled"] is True
    assert flow["max_wait"] == 4.0  # 0.8 x the 5 s SLO TTFT
    assert flow["max_queue"] == 1000  # lbproxy's default
    assert any(c["rejected"] > 0 for c in on["candidates"])  # the simulated proxy sheds
    assert "flow control on (max_wait 4 s" in (tmp_path / "on" / "plan.md").read_text()

    off = _plan_cli(tmp_path, "off", "--flow-control", "off")
    assert off["settings"]["flow_control"] == {"enabled": False}
    assert all(c["rejected"] == 0 for c in off["candidates"])  # routing alone: no shedding
    assert "flow control off" in (tmp_path / "off" / "plan.md").read_text()

    wait = _plan_cli(tmp_path, "wait", "--slo-ttft", "10", "--max-queue", "50", load=TOKEN)
    assert wait["settings"]["flow_control"]["max_wait"] == 8.0
    assert wait["settings"]["flow_control"]["max_queue"] == 50


def test_ascent_stops_on_ties() -> None:
    """Equal goodput everywhere, TTFT differing: no round after the first (a TTFT p50
    tie-break at equal goodput is not worth more candidates)."""
    fleet = parse_fleet({"model": "m", "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0, "count": 2},
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 4}]})  # fmt: skip
    done: dict = {}

    def evaluate(layouts: list[tuple[str, ...]], stage: str) -> None:
        for lay in layouts:
            if lay not in done:
                cand = {"stage": stage, "goodput_output_tokens_per_s": 100.0,
                        "completed_output_tokens_per_s": 100.0,
                        "ttft_p50_s": 1.0 / (1 + len(done))}  # later: "better"  # fmt: skip
                done[lay] = (cand, None)

    assert search(fleet, done, evaluate, refine=1, rounds=3) == 1
    assert not any(c["stage"] == "combined" for c, _ in done.values())
