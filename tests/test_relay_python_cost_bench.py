"""benchmarks/relay_python_cost.py drives the real streaming relay: every event read from the
"backend" reaches the client as one HTTP/1.1 chunk, byte for byte, as from its bare
baseline (the run checks the two wrote the same bytes)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_relay_benchmark_writes_each_event_as_one_client_chunk() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("relay_python_cost")
    finally:
        sys.path.remove(str(BENCH))
    result = mod.run(chunks=500, repeat=2)
    framed = len(b"%x\r\n" % len(mod.EVENT)) + len(mod.EVENT) + 2
    assert result["bytes_written"] == 500 * framed
    assert result["event_bytes"] == len(mod.EVENT)
    assert len(result["us_per_chunk"]) == 2 and len(result["bare_us_per_chunk"]) == 2
    assert result["ratio_median"] > 0
