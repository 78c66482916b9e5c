"""`lbproxy plan` on a small two-vendor fleet, through the real command line: the baseline
is a candidate, every candidate has the issue's fields, they come best first by goodput,
cross-vendor splits are marked with the link assumed, and it runs in well under a minute."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lbproxy.bench.plan import count_splits, layouts_by_type, link_info
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
    # 3^2 - 3 type layouts, the baseline, and count splits of the 2 best (2 cards: k=1).
    assert 7 <= len(cands) == plan["settings"]["candidates_evaluated"] <= 11
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
