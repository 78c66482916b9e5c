"""`lbproxy bench` against a simulated fleet through a real lbproxy, for a few seconds."""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from lbproxy.bench import report
from lbproxy.bench.cli import main as bench_main
from lbproxy.bench.loadgen import LoadOptions, bench_run, live_fleet, new_session, run_step
from lbproxy.bench.mix import FLOW_HEADER, PRIORITY_HEADER, class_sequence, parse_mix
from lbproxy.bench.workloads import make_workload
from lbproxy.sim.fleet import parse_fleet
from lbproxy.sim.server import start_sim_server
from lbproxy.tokenization.tokenizer import default_tokenizer
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
        "least-request [live]",
        "again [live, least-request]",
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


# ------------------------------------------------------------------------------ token counting
def generation_tokens(metrics_text: str) -> float:
    m = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", metrics_text, re.M)
    assert m is not None, "no vllm:generation_tokens_total in /metrics"
    return float(m.group(1))


@pytest.mark.timeout(60)
async def test_cut_request_tokens_are_counted_exactly() -> None:
    """A request cut at the deadline counts the tokens it received, from the usage in every
    chunk (continuous_usage_stats), not its number of chunks: here 4 tokens per chunk."""
    interval = 4
    wl = make_workload(
        "shared-prefix",
        default_tokenizer(),
        {
            "num_groups": 1,
            "num_prompts_per_group": 2,
            "system_prompt_len": 40,
            "question_len": 10,
            "output_len": 400,
        },
    )
    # vendor-a at half speed: a token every ~54 ms of wall time, a chunk every ~216 ms, so
    # the server sends each chunk before the next token exists (exactly 4 per chunk).
    h = await start_sim_server(
        port=0, profile="vendor-a", model="m", speed=0.5, stream_interval=interval
    )
    try:
        async with new_session() as session:
            recs, generated = {}, {}
            for k, continuous in enumerate((True, False)):
                opts = LoadOptions(
                    target=h.url,
                    model="m",
                    duration=0.01,
                    drain=1.5,
                    continuous_usage=continuous,
                )
                (recs[continuous],) = await run_step(session, wl, [0.0], opts, first_index=k)
                async with session.get(h.url + "/metrics") as r:
                    generated[continuous] = generation_tokens(await r.text())
    finally:
        await h.close()
    exact, fallback = recs[True], recs[False]
    for rec in (exact, fallback):
        assert rec.status == "incomplete" and rec.end is not None and rec.end >= 1.5
        assert rec.first_token is not None and 3 <= len(rec.itl) + 1 < 100
    chunks = len(exact.itl) + 1
    # The first token alone, then `interval` per chunk.
    assert exact.output_tokens == 1 + interval * (chunks - 1)
    # The engine generated what was sent, plus at most a chunk not yet sent at the cut.
    assert exact.output_tokens <= generated[True] <= exact.output_tokens + 2 * interval
    # Without usage in the chunks only the chunks can be counted: a quarter of the tokens.
    assert fallback.output_tokens == len(fallback.itl) + 1


# ------------------------------------------------------------------------------ rejections
@contextlib.asynccontextmanager
async def shedding_server(seen: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A small OpenAI-style server on 127.0.0.1 that answers like lbproxy with flow control:
    tenant `shed` gets 429 after waiting 1.5 s (x-lbproxy-queue-wait), `busy` 503 at once,
    anyone else a 3-token stream with continuous usage after waiting 0.25 s."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        tenant = request.headers.get(FLOW_HEADER)
        seen.append(
            {
                "tenant": tenant,
                "priority": request.headers.get(PRIORITY_HEADER),
                "stream_options": body.get("stream_options"),
            }
        )
        if tenant in ("shed", "busy"):
            status = 429 if tenant == "shed" else 503
            headers = {"x-lbproxy-queue-wait": "1.5"} if tenant == "shed" else {}
            error = {"error": {"message": "queue full", "type": "rate_limit_error"}}
            return web.json_response(error, status=status, headers=headers)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-lbproxy-queue-wait": "0.250"}
        )
        await resp.prepare(request)
        for n in (1, 2, 3):
            chunk = {
                "choices": [{"index": 0, "text": f" t{n}", "finish_reason": None}],
                "usage": {"prompt_tokens": 5, "total_tokens": 5 + n, "completion_tokens": n},
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        final = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.timeout(60)
async def test_rejections_queue_waits_and_traffic_classes() -> None:
    seen: list[dict[str, Any]] = []
    mix = parse_mix("keep:2:7,shed:1,busy:1")
    wl = make_workload(
        "shared-prefix",
        default_tokenizer(),
        {"num_groups": 2, "system_prompt_len": 20, "question_len": 5, "output_len": 3},
    )
    async with shedding_server(seen) as url:
        opts = LoadOptions(target=url, model="m", duration=2.0, time_scale=2.0, seed=3, mix=mix)
        run = await bench_run(wl, [15.0], opts, profile="p")
    (step,) = run["steps"]
    n = step["requests"]
    assert n == len(seen) > 10
    # Classes drawn per request index, as simulate draws them, and sent as headers.
    want = [c.name for c in class_sequence(mix, 0, n, 3)]
    assert sorted(s["tenant"] for s in seen) == sorted(want)
    assert {s["tenant"]: s["priority"] for s in seen} == {
        c.name: str(c.priority) for c in mix if c.name in want
    }
    assert all(s["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
               for s in seen)  # fmt: skip
    classes = step["classes"]
    assert set(classes) == set(want) == {"keep", "shed", "busy"}
    count = {name: want.count(name) for name in classes}
    assert classes["keep"]["completed"] == count["keep"] and classes["keep"]["rejected"] == 0
    assert classes["shed"]["rejected"] == count["shed"] and classes["shed"]["completed"] == 0
    assert classes["busy"]["rejected"] == count["busy"] and classes["busy"]["errors"] == 0
    assert step["rejected"] == count["shed"] + count["busy"] and step["errors"] == 0
    assert step["output_tokens"] == 3 * count["keep"]
    # Queue waits in target time (x2): 0.5 s served, 3.0 s shed, unknown for the 503s.
    assert classes["keep"]["queue_wait_p50_s"] == pytest.approx(0.5)
    assert classes["shed"]["queue_wait_p99_s"] == pytest.approx(3.0)
    assert classes["busy"]["queue_wait_p50_s"] is None
    assert step["slo_attainment"] == pytest.approx(count["keep"] / n)
    assert classes["keep"]["slo_attainment"] == 1.0 and classes["busy"]["slo_attainment"] == 0.0


@pytest.mark.timeout(60)
def test_bench_fleet_flow_control_settings_and_mix(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("model: m\nbackends:\n  - {name: b, profile: vendor-b, port: 0}\n")
    out = tmp_path / "off"
    args = [
        "bench",
        "--fleet",
        str(fleet_file),
        "--speed",
        "5",
        *WORKLOAD_ARGS,
        "--rates",
        "6",
        "--duration",
        "2",
        "--slo-ttft",
        "2",
        "--slo-itl",
        "0.05",
        "--mix",
        "gold:1:5,bronze:3",
        "--quiet",
        "--no-plots",
    ]
    assert bench_main([*args, "--flow-control", "off", "--max-wait", "12", "--out", str(out)]) == 0
    res = report.load_results(out)
    (run,) = res["runs"]
    assert run["label"] == "round-robin (flow off)"  # so a compare of on and off reads clearly
    settings = res["settings"]
    assert settings["flow_control"] == {
        "enabled": False,
        "max_wait": 12.0,
        "flow_header": "x-tenant",
    }
    assert (settings["slo_ttft_s"], settings["slo_itl_s"]) == (2.0, 0.05)
    assert settings["mix"] == [
        {"name": "gold", "share": 1.0, "priority": 5},
        {"name": "bronze", "share": 3.0, "priority": 0},
    ]
    (step,) = run["steps"]
    assert (step["slo_ttft_s"], step["slo_itl_s"]) == (2.0, 0.05)
    assert step["completed"] == step["requests"] and step["rejected"] == 0
    assert set(step["classes"]) == {"gold", "bronze"}
    assert sum(c["requests"] for c in step["classes"].values()) == step["requests"]
    # Flow control on (the default): the label is the profile's.
    on = tmp_path / "on"
    assert bench_main([*args, "--out", str(on)]) == 0
    res_on = report.load_results(on)
    assert res_on["runs"][0]["label"] == "round-robin"
    assert res_on["settings"]["flow_control"]["enabled"] is True
    (step_on,) = res_on["runs"][0]["steps"]
    assert step_on["completed"] + step_on["rejected"] == step_on["requests"] > 0
