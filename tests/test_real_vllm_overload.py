"""The engine model against two real vLLM 0.32 servers, into overload (opt-in, heavy).

Deselected by default (pyproject's `addopts`: `-m 'not real_vllm'`); run with

    scripts/real_vllm/setup.sh                                 # once
    pytest -m real_vllm tests/test_real_vllm_overload.py -s    # ~10 minutes

A reduced scripts/real_vllm/overload_check.py: the same two CPU servers
(scripts/real_vllm/overload_servers.sh, started here and stopped afterwards unless they
were already up), the same workload, lbproxy config and fitted hardware profile
(configs/hardware/vllm-cpu-tiny.yaml), but two rate steps of 30 s + 30 s drain, at about
the fleet's capacity and at 3x it: live through lbproxy with flow control off and on, the
same ladder in `lbproxy simulate`. Asserts that output tok/s, completed tok/s and TTFT
p50 agree within 15% at every step. Skipped, with the reason, when the setup is absent.

The live runs are wall-clock measurements on the 2-core machine: the check waits (up to
10 minutes) until other processes use less than a quarter of a core and creates
/tmp/real-vllm-measuring while it measures; each run's foreign load is in its load.json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "real_vllm" / "overload_check.py"
RATES = "21,63"  # ~1x and ~3x the capacity of the two servers on the check's workload
TOLERANCE = 0.15


def _check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("overload_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["overload_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_engine_model_matches_real_vllm_into_overload(tmp_path: Path) -> None:
    check = _check_module()
    if not sys.platform.startswith("linux"):
        pytest.skip("the check reads /proc to watch the machine's load")
    why = check.setup_present()
    if why:
        pytest.skip(why)
    started_here = not check.servers_up()
    argv = [
        "--rates", RATES, "--duration", "30", "--drain", "30", "--out", str(tmp_path),
        "--tolerance", str(TOLERANCE),
    ]  # fmt: skip
    if started_here:
        argv.append("--stop-servers")
    status = check.main(argv)
    result = json.loads((tmp_path / "compare.json").read_text())
    table = (tmp_path / "compare.md").read_text()
    print(table)
    assert len(result["rows"]) == 4, table  # 2 steps x flow off and on
    for row in result["rows"]:
        for key, _ in check.COMPARED:
            diff = row[key]["diff"]
            assert diff is not None and abs(diff) <= TOLERANCE, (
                f"flow {row['flow']}, {row['rate']:g} req/s, {key}: live {row[key]['live']}, "
                f"sim {row[key]['sim']} ({diff:+.1%})\n{table}"
            )
    assert status == 0, table
