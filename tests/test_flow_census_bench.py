"""benchmarks/flow_placement.py and flow_ramp_trace.py: the census adds up, the trace
samples what it says, and neither leaves the flow controller patched behind it."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import ModuleType

import pytest

from lbproxy.flow.controller import FlowController
from lbproxy.routing.state import Decision

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("flow_placement"), importlib.import_module("flow_ramp_trace")
    finally:
        sys.path.remove(str(BENCH))


def test_the_dispatch_census_adds_up_and_restores_the_controller(bench, tmp_path: Path) -> None:
    placement, _ = bench
    choose, decision_choose = FlowController._choose, Decision.choose
    args = argparse.Namespace(
        profile="cache-aware-plus", rates=[3.0, 30.0], duration=30.0, warmup=5.0
    )
    steps = placement.run(args)
    assert FlowController._choose is choose and Decision.choose is decision_choose
    assert [s["rate"] for s in steps] == [3.0, 30.0]
    for s in steps:
        assert s["dispatched"] == sum(s["paths"].values()) > 0
        assert s["false_hits"] <= s["cold"] <= s["dispatched"]
        assert all(k.split(", ")[0] in ("first", "margin", "spill") for k in s["paths"])
        assert s["backends_per_group"] >= 1.0
        assert sum(s["groups_per_backend"].values()) >= 1
    # 30 req/s overloads the 20 cards from the start: flow control holds and spills
    assert any(k.startswith(("margin", "spill")) for k in steps[1]["paths"])
    out = tmp_path / "census.json"
    out.write_text(json.dumps({"steps": steps}))
    table = placement.table([str(out)])
    assert table.count("\n| census | ") == 2


def test_the_ramp_trace_samples_each_steps_start(bench) -> None:
    _, trace = bench
    on_metrics = FlowController.on_metrics
    args = argparse.Namespace(
        profile="cache-aware-plus", rates=[3.0, 30.0], duration=20.0, window=10.0
    )
    steps = trace.run(args)
    assert FlowController.on_metrics is on_metrics
    for s in steps:
        times = [x["t"] for x in s["samples"]]
        assert times and times[0] < 2.5 and times[-1] <= 10.0
        assert all(b - a >= 2.4 for a, b in pairwise(times))  # 2.5 s apart, rounded to 0.1
        assert all(x["ramp_s"] is None or 5.0 <= x["ramp_s"] <= 120.0 for x in s["samples"])
