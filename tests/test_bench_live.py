"""`lbproxy bench` against a simulated fleet through a real lbproxy, for a few seconds."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest

from lbproxy.bench import report
from lbproxy.bench.cli import main as bench_main
from lbproxy.bench.loadgen import live_fleet
from lbproxy.sim.fleet import parse_fleet
from tests.conftest import LoopThread

SPEED = 5.0
FLEET = {
    "model": "live-model",
    "backends": [
        {"name": "a", "profile": "vendor-a", "port": 0},
        {"name": "b", "profile": "vendor-b", "port": 0, "count": 2},
    ],
}
WORKLOAD_ARGS = [
    "--num-groups",
    "3",
    "--num-prompts-per-group",
    "4",
    "--system-prompt-len",
    "400",
    "--question-len",
    "60",
    "--output-len",
    "24",
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete file
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def proxy_url(loop_thread: LoopThread):
    """lbproxy (least-request) in front of three simulated servers, in the test loop."""
    stack = contextlib.AsyncExitStack()
    fleet = parse_fleet(FLEET, "live-fleet")
    url = loop_thread.run(
        stack.enter_async_context(live_fleet(fleet, "least-request", speed=SPEED))
    )
    yield url
    loop_thread.run(stack.aclose())


@pytest.mark.timeout(60)
def test_bench_cli_through_lbproxy(proxy_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = bench_main(
        [
            "bench",
            "--target",
            proxy_url,
            "--profile",
            "least-request",
            "--rates",
            "3,8",
            "--duration",
            "6",
            "--time-scale",
            str(SPEED),
            "--out",
            str(out),
            "--quiet",
            *WORKLOAD_ARGS,
        ]
    )
    assert code == 0
    res = report.load_results(out)  # validates the schema
    assert res["tool"] == "lbproxy bench"
    assert res["settings"]["model"] == "live-model"  # discovered from /v1/models
    (run,) = res["runs"]
    assert run["profile"] == run["label"] == "least-request"
    assert [s["rate"] for s in run["steps"]] == [3.0, 8.0]
    for step in run["steps"]:
        assert step["errors"] == 0 and step["incomplete"] == 0
        assert step["completed"] == step["requests"] > 5
        # Exact lengths: every request produced output_len tokens (from the usage chunk).
        assert step["output_tokens"] == 24 * step["completed"]
        assert 0 < step["ttft_p50_s"] <= step["ttft_p90_s"] <= step["ttft_p99_s"]
        assert 0 < step["itl_p50_s"] < step["e2e_p50_s"]
        assert step["prefix_cache_hit_rate"] > 0.3  # shared system prompts were cached
        # The proxy exposed which backend served each request: all three took some.
        assert sum(step["backends"].values()) == step["completed"]
        assert len(step["backends"]) == 3
    # The busier step pushes more tokens per second.
    assert run["steps"][1]["output_tokens_per_s"] > run["steps"][0]["output_tokens_per_s"]
    w, h = png_size(out / "throughput.png")
    assert w > 300 and h > 200
    png_size(out / "ttft.png")
    assert "| 8 |" in (out / "results.md").read_text()

    # --compare draws this run and another on the same axes.
    other = tmp_path / "other"
    report.write_results(other, {**res, "runs": [{**run, "label": "again"}]}, plots=False)
    cmp_dir = tmp_path / "cmp"
    assert (
        bench_main(["bench", "--compare", str(out), str(other), "--out", str(cmp_dir), "--quiet"])
        == 0
    )
    assert [r["label"] for r in report.load_results(cmp_dir)["runs"]] == [
        "least-request",
        "again",
    ]
    png_size(cmp_dir / "throughput.png")


@pytest.mark.timeout(60)
def test_bench_reports_errors(proxy_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    code = bench_main(
        [
            "bench",
            "--target",
            proxy_url,
            "--model",
            "no-such-model",
            "--rates",
            "20",
            "--duration",
            "0.5",
            "--out",
            str(out),
            "--quiet",
            "--no-plots",
            *WORKLOAD_ARGS,
        ]
    )
    assert code == 0
    (step,) = report.load_results(out)["runs"][0]["steps"]
    assert step["requests"] > 0 and step["errors"] == step["requests"]
    assert step["completed"] == 0 and step["ttft_p50_s"] is None


@pytest.mark.timeout(60)
def test_bench_spawns_a_fleet(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("model: m\nbackends:\n  - {name: b, profile: vendor-b, port: 0}\n")
    out = tmp_path / "spawned"
    code = bench_main(
        [
            "bench",
            "--fleet",
            str(fleet_file),
            "--speed",
            "5",
            "--profile",
            "cache-aware",
            "--workload",
            "multi-turn",
            "--num-conversations",
            "3",
            "--turns",
            "2",
            "--system-prompt-len",
            "100",
            "--question-len",
            "20",
            "--output-len",
            "8",
            "--rates",
            "4",
            "--duration",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    res = report.load_results(out)
    (step,) = res["runs"][0]["steps"]
    assert res["runs"][0]["profile"] == "cache-aware" and res["settings"]["time_scale"] == 5
    assert res["workload"]["api"] == "chat"
    assert step["completed"] == step["requests"] > 3 and step["errors"] == 0


@pytest.mark.timeout(60)
def test_precise_routing_live_uses_kv_events(tmp_path: Path) -> None:
    """--fleet with a precise profile wires the servers' KV events into lbproxy."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "model: m\nbackends:\n  - {name: b, profile: vendor-b, port: 0, count: 3}\n"
    )
    hit = {}
    for profile in ("round-robin", "precise-cache-aware"):
        out = tmp_path / profile
        code = bench_main(
            [
                "bench",
                "--fleet",
                str(fleet_file),
                "--speed",
                "4",
                "--profile",
                profile,
                "--num-groups",
                "6",
                "--num-prompts-per-group",
                "20",
                "--system-prompt-len",
                "800",
                "--question-len",
                "40",
                "--output-len",
                "16",
                "--rates",
                "10",
                "--duration",
                "5",
                "--out",
                str(out),
                "--quiet",
                "--no-plots",
            ]
        )
        assert code == 0
        (step,) = report.load_results(out)["runs"][0]["steps"]
        assert step["errors"] == 0 and step["completed"] == step["requests"]
        hit[profile] = step["prefix_cache_hit_rate"]
    assert hit["precise-cache-aware"] > hit["round-robin"] + 0.1, hit
