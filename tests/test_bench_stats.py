"""Percentiles, throughput and latency arithmetic on hand-made traces; SSE parsing; the
results.json schema and its markdown."""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any

import pytest

from lbproxy.bench import report
from lbproxy.bench.loadgen import StreamParser
from lbproxy.bench.stats import (
    CLASS_KEYS,
    RequestRecord,
    meets_slo,
    percentile,
    poisson_arrivals,
    summarize_step,
)


@pytest.mark.parametrize(
    ("values", "p", "want"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 0, 1.0),
        ([1, 2, 3, 4], 100, 4.0),
        ([1, 2, 3, 4], 90, 3.7),  # linear between the 3rd and 4th order statistics
        ([4, 1, 3, 2], 25, 1.75),  # order does not matter
        ([7.5], 99, 7.5),
        ([], 50, None),
    ],
)
def test_percentile(values: list[float], p: float, want: float | None) -> None:
    got = percentile(values, p)
    assert got == pytest.approx(want) if want is not None else got is None


def test_percentile_rejects_bad_p() -> None:
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def trace() -> list[RequestRecord]:
    return [
        # Completed: TTFT 0.5, 4 tokens over 3 gaps, e2e 2.0.
        RequestRecord(
            start=0.0,
            first_token=0.5,
            end=2.0,
            output_tokens=4,
            prompt_tokens=100,
            cached_tokens=50,
            itl=[0.5, 0.5, 0.5],
        ),
        # Completed: TTFT 0.2, 10 tokens, e2e 2.0.
        RequestRecord(
            start=1.0,
            first_token=1.2,
            end=3.0,
            output_tokens=10,
            prompt_tokens=100,
            cached_tokens=0,
            itl=[0.1, 0.3],
        ),
        # Cut at the deadline (t=5) before its first token: TTFT >= 3.0 counts as 3.0.
        RequestRecord(start=2.0, status="incomplete", end=5.0, prompt_tokens=100),
        # Cut after 3 tokens: they count as output; TTFT 1.0.
        RequestRecord(
            start=2.5, status="incomplete", first_token=3.5, end=5.0, output_tokens=3, itl=[0.2]
        ),
        # Failed: in the error count, nowhere else.
        RequestRecord(start=3.0, status="error", end=3.1, output_tokens=99, error="HTTP 500"),
    ]


def test_summarize_step_on_a_hand_made_trace() -> None:
    s = summarize_step(trace(), rate=2.0, duration=4.0)
    assert (s["requests"], s["completed"], s["incomplete"], s["errors"]) == (5, 2, 2, 1)
    assert s["rejected"] == 0
    assert s["elapsed_s"] == pytest.approx(5.0)  # first send 0.0 .. last end 5.0
    assert s["output_tokens"] == 17  # 4 + 10 + 0 + 3; the failed request's 99 excluded
    # Rates per second of the arrival window (4 s); the old figure over elapsed_s remains.
    assert s["output_tokens_per_s"] == pytest.approx(17 / 4)
    assert s["delivered_output_tokens_per_s"] == pytest.approx(17 / 5)
    assert s["completed_output_tokens_per_s"] == pytest.approx(14 / 4)  # 4 + 10
    assert s["requests_per_s"] == pytest.approx(2 / 4)
    assert s["prompt_tokens_per_s"] == pytest.approx(200 / 4)
    assert s["prefix_cache_hit_rate"] == pytest.approx(50 / 200)
    # TTFTs 0.5, 0.2, 3.0 (censored), 1.0 -> sorted 0.2 0.5 1.0 3.0
    assert s["ttft_p50_s"] == pytest.approx(0.75)
    assert s["ttft_mean_s"] == pytest.approx((0.5 + 0.2 + 3.0 + 1.0) / 4)
    assert s["ttft_p99_s"] == pytest.approx(1.0 + 0.97 * 2.0)
    # ITL pools every gap: 0.1 0.2 0.3 0.5 0.5 0.5
    assert s["itl_p50_s"] == pytest.approx(0.4)
    assert s["itl_mean_s"] == pytest.approx(2.1 / 6)
    assert s["e2e_p50_s"] == pytest.approx(2.0)
    # Mean ITLs 1.5 / 3 = 0.5 and 1.8 / 9 = 0.2: both miss the default 100 ms SLO ...
    assert s["goodput_output_tokens_per_s"] == 0.0 and s["slo_attainment"] == 0.0
    # ... and meet a 500 ms one: 2 of the 5 requests.
    loose = summarize_step(trace(), rate=2.0, duration=4.0, slo_itl=0.5)
    assert loose["goodput_output_tokens_per_s"] == pytest.approx(14 / 4)
    assert loose["slo_attainment"] == pytest.approx(2 / 5)
    assert (loose["slo_ttft_s"], loose["slo_itl_s"]) == (5.0, 0.5)
    assert s["queue_wait_p50_s"] is None and "classes" not in s
    assert set(s) >= set(report.StepResult.__annotations__) - {"backends", "classes"}


def test_summarize_step_with_nothing_served() -> None:
    s = summarize_step([RequestRecord(start=0.0, status="error", end=0.1)], rate=1, duration=1)
    assert s["errors"] == 1 and s["output_tokens_per_s"] == 0.0 and s["ttft_p50_s"] is None
    assert s["slo_attainment"] == 0.0
    empty = summarize_step([], rate=1, duration=1)
    assert empty["requests"] == 0 and empty["itl_p50_s"] is None
    assert empty["slo_attainment"] is None and empty["goodput_output_tokens_per_s"] == 0.0


def ok(start: float, ttft: float, tokens: int, itl: float, **kw: Any) -> RequestRecord:
    """A completed request: first token `ttft` after its send, then a token every `itl`."""
    first = start + ttft
    end = first + itl * max(tokens - 1, 0)
    return RequestRecord(start=start, first_token=first, end=end, output_tokens=tokens, **kw)


@pytest.mark.parametrize(
    ("record", "met"),
    [
        pytest.param(ok(0.0, 1.0, 101, 0.1), True, id="ITL exactly at the SLO"),
        pytest.param(ok(0.0, 1.0, 101, 0.105), False, id="ITL just over"),
        pytest.param(ok(2.0, 5.0, 50, 0.01), True, id="TTFT exactly at the SLO"),
        pytest.param(ok(2.0, 5.01, 50, 0.01), False, id="TTFT just over"),
        pytest.param(ok(0.0, 4.0, 1, 0.0), True, id="one token: no ITL to miss"),
        pytest.param(
            RequestRecord(start=0.0, first_token=0.5, end=30.0, output_tokens=1),
            True,
            id="one token, late end: ITL part met",
        ),
        pytest.param(
            RequestRecord(start=0.0, end=0.5, output_tokens=0), True, id="no token: TTFT = end"
        ),
        pytest.param(
            # Held 4.5 s in lbproxy, then served at once: the wait counts in TTFT.
            ok(0.0, 5.5, 10, 0.01, queue_wait=4.5),
            False,
            id="queue wait counts in TTFT",
        ),
        pytest.param(
            RequestRecord(
                start=0.0, status="incomplete", first_token=0.1, end=3.0, output_tokens=40
            ),
            False,
            id="cut: never meets it",
        ),
        pytest.param(RequestRecord(start=0.0, status="rejected", end=0.0), False, id="rejected"),
        pytest.param(
            RequestRecord(start=0.0, status="error", end=0.1, error="HTTP 500"), False, id="failed"
        ),
    ],
)
def test_slo_of_one_request(record: RequestRecord, met: bool) -> None:
    assert meets_slo(record, 5.0, 0.1) is met
    s = summarize_step([record], rate=1.0, duration=10.0)
    assert s["slo_attainment"] == (1.0 if met else 0.0)
    want = record.output_tokens / 10.0 if met else 0.0
    assert s["goodput_output_tokens_per_s"] == pytest.approx(want)


def mixed_trace() -> list[RequestRecord]:
    return [
        ok(0.0, 0.5, 11, 0.05, queue_wait=0.0, klass="a"),  # meets: 11 tokens
        ok(1.0, 2.0, 21, 0.2, queue_wait=1.5, klass="a"),  # completes, misses ITL: 21
        ok(2.0, 6.0, 5, 0.01, queue_wait=5.5, klass="b"),  # completes, misses TTFT: 5
        RequestRecord(start=3.0, status="rejected", end=3.0, queue_wait=2.0, klass="b"),
        RequestRecord(start=3.5, status="rejected", end=3.6, klass="b"),  # wait unknown
        RequestRecord(start=4.0, status="error", end=4.2, error="HTTP 500", klass="a"),
        RequestRecord(
            start=5.0, status="incomplete", first_token=6.0, end=9.0, output_tokens=7, klass="b"
        ),
    ]


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("requests", 7),
        ("completed", 3),
        ("incomplete", 1),
        ("rejected", 2),
        ("errors", 1),  # rejected requests are not errors
        ("output_tokens", 11 + 21 + 5 + 7),
        ("output_tokens_per_s", (11 + 21 + 5 + 7) / 5),
        ("completed_output_tokens_per_s", (11 + 21 + 5) / 5),
        ("goodput_output_tokens_per_s", 11 / 5),
        ("requests_per_s", 3 / 5),
        ("slo_attainment", 1 / 7),
        # Known waits 0.0, 1.5, 5.5, 2.0 (rejected after waiting): sorted 0 1.5 2 5.5.
        ("queue_wait_p50_s", 1.75),
        ("queue_wait_p99_s", 2.0 + 0.97 * 3.5),
        # TTFTs of the served: 0.5, 2.0, 6.0, 1.0 (rejected and failed left out).
        ("ttft_p50_s", 1.5),
        ("ttft_mean_s", (0.5 + 2.0 + 6.0 + 1.0) / 4),
    ],
)
def test_step_figures_with_rejections_and_queue_waits(key: str, want: float) -> None:
    s = summarize_step(mixed_trace(), rate=1.4, duration=5.0)
    assert s[key] == pytest.approx(want)


def test_classes_are_the_same_figures_on_each_class() -> None:
    records = mixed_trace()
    s = summarize_step(records, rate=1.4, duration=5.0)
    assert list(s["classes"]) == ["a", "b"]
    for name, figures in s["classes"].items():
        sub = [r for r in records if r.klass == name]
        alone = summarize_step(sub, rate=1.0, duration=5.0)
        assert set(figures) == set(CLASS_KEYS)
        assert figures == {k: alone[k] for k in CLASS_KEYS}
    a, b = s["classes"]["a"], s["classes"]["b"]
    assert (a["requests"], a["completed"], a["errors"], a["rejected"]) == (3, 2, 1, 0)
    assert (b["requests"], b["completed"], b["rejected"], b["incomplete"]) == (4, 1, 2, 1)
    assert a["goodput_output_tokens_per_s"] == pytest.approx(11 / 5) and a["slo_attainment"] == (
        pytest.approx(1 / 3)
    )
    assert b["goodput_output_tokens_per_s"] == 0.0 and b["slo_attainment"] == 0.0
    total = sum(c["completed_output_tokens_per_s"] for c in s["classes"].values())
    assert total == pytest.approx(s["completed_output_tokens_per_s"])


@pytest.mark.parametrize(("rate", "output_len"), [(2.0, 100), (0.5, 1000), (85.0, 1000)])
def test_perfect_router_at_capacity_scores_the_bound(rate: float, output_len: int) -> None:
    """A fleet whose bound is exactly the offered load (rate x output_len tokens/s), every
    request served within the SLO: goodput = completed = output = the bound, although the
    last requests end long after the arrival window (a tail that the old figure, over
    elapsed time, counted as a loss)."""
    duration = 60.0
    n = int(rate * duration)
    # Steady arrivals, each served at TTFT 0.3 s and 50 ms per token.
    records = [ok(k / rate, 0.3, output_len, 0.05) for k in range(n)]
    bound = rate * output_len
    s = summarize_step(records, rate=rate, duration=duration)
    assert s["goodput_output_tokens_per_s"] == pytest.approx(bound)
    assert s["completed_output_tokens_per_s"] == pytest.approx(bound)
    assert s["output_tokens_per_s"] == pytest.approx(bound)
    assert s["slo_attainment"] == 1.0 and s["requests_per_s"] == pytest.approx(rate)
    assert s["delivered_output_tokens_per_s"] < bound  # the tail: elapsed > duration


def test_poisson_arrivals() -> None:
    a = poisson_arrivals(50.0, 200.0, seed=1)
    assert a == poisson_arrivals(50.0, 200.0, seed=1)
    assert a != poisson_arrivals(50.0, 200.0, seed=2)
    assert all(0 <= x < 200 for x in a) and a == sorted(a)
    assert abs(len(a) - 10_000) < 400  # Poisson: sd = 100
    assert len(poisson_arrivals(50.0, 200.0, seed=1, max_requests=7)) == 7
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 10.0, seed=1)


# ------------------------------------------------------------------------------ SSE
COMPLETION_STREAM = (
    b'data: {"id":"c","choices":[{"index":0,"text":" a","finish_reason":null}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"text":" usage","finish_reason":null}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,'
    b'"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}\n\n'
    b"data: [DONE]\n\n"
)


def test_stream_parser_times_chunks_and_reads_usage() -> None:
    p = StreamParser()
    # Split mid-event: an event counts when its last byte arrives.
    cut1 = COMPLETION_STREAM.index(b" usage")  # inside the 2nd event
    cut2 = COMPLETION_STREAM.index(b'"length"')  # inside the 3rd
    p.feed(COMPLETION_STREAM[:cut1], 1.0)
    p.feed(COMPLETION_STREAM[cut1:cut2], 1.25)
    p.feed(COMPLETION_STREAM[cut2:], 1.75)
    assert p.first == 1.0
    assert p.gaps == [0.25, 0.5]
    assert p.chunks == 3
    assert p.usage is not None and p.usage["completion_tokens"] == 3
    assert p.done and p.error is None


def test_stream_parser_chat_role_chunk_is_not_a_token() -> None:
    p = StreamParser()
    p.feed(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n', 0.1)
    assert p.first is None
    p.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', 0.3)
    assert (p.first, p.chunks) == (0.3, 1)


def completion_chunk(text: str, n: int, finish: str | None = None) -> bytes:
    """A vLLM completion chunk with continuous usage stats: n completion tokens so far."""
    reason = f'"{finish}"' if finish else "null"
    return (
        b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":'
        + f'"{text}","logprobs":null,"finish_reason":{reason}'.encode()
        + b',"stop_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":'
        + f'{12 + n},"completion_tokens":{n}}}}}\n\n'.encode()
    )


def test_stream_parser_counts_tokens_from_continuous_usage() -> None:
    p = StreamParser()
    # 1 token, then chunks of 4 (a server's stream interval): chunks undercount tokens.
    p.feed(completion_chunk(" a", 1), 0.5)
    p.feed(completion_chunk(" b c d e", 5) + completion_chunk(" f g h i", 9), 0.9)
    assert (p.chunks, p.completion_tokens, p.first, p.gaps) == (3, 9, 0.5, [0.4, 0.0])
    assert p.usage == {"prompt_tokens": 12, "total_tokens": 21, "completion_tokens": 9}
    assert not p.done  # cut here: 9 tokens received, exactly
    p.feed(completion_chunk(" j", 10, "length"), 1.0)
    p.feed(
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"total_tokens":22,'
        b'"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":8}}}\n\n'
        b"data: [DONE]\n\n",
        1.1,
    )
    assert (p.chunks, p.completion_tokens, p.done) == (4, 10, True)
    assert p.usage is not None and p.usage["prompt_tokens_details"] == {"cached_tokens": 8}


def test_stream_parser_chat_role_chunk_with_usage_is_not_a_token() -> None:
    p = StreamParser()
    p.feed(
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],'
        b'"usage":{"prompt_tokens":9,"total_tokens":9,"completion_tokens":0}}\n\n',
        0.1,
    )
    assert (p.first, p.chunks, p.completion_tokens) == (None, 0, 0)
    p.feed(
        b'data: {"choices":[{"index":0,"delta":{"content":"hi there"}}],'
        b'"usage":{"prompt_tokens":9,"total_tokens":11,"completion_tokens":2}}\n\n',
        0.3,
    )
    assert (p.first, p.chunks, p.completion_tokens) == (0.3, 1, 2)


def test_stream_parser_without_usage_counts_chunks() -> None:
    p = StreamParser()
    p.feed(COMPLETION_STREAM.split(b'data: {"id":"c","choices":[],')[0], 0.2)
    assert p.usage is None and p.completion_tokens is None and p.chunks == 3


def test_stream_parser_error_event() -> None:
    p = StreamParser()
    p.feed(b'data: {"error":{"message":"backend b0 failed","code":502}}\n\n', 0.2)
    assert p.error == "backend b0 failed" and p.chunks == 0


# ------------------------------------------------------------------------------ report
def results() -> report.Results:
    step = summarize_step(trace(), rate=2.0, duration=4.0, slo_itl=0.5)
    faster = {
        **step,
        "output_tokens_per_s": step["output_tokens_per_s"] * 1.5,
        "goodput_output_tokens_per_s": step["goodput_output_tokens_per_s"] * 2,
        "ttft_p50_s": step["ttft_p50_s"] / 3,
    }
    runs = [
        report.RunResult(profile="round-robin", label="rr", target="t", steps=[step]),
        report.RunResult(profile="cache-aware", label="ca", target="t", steps=[faster]),
    ]
    return report.new_results(
        "lbproxy simulate",
        {"name": "shared-prefix", "api": "completions", "params": {"seed": 0}},
        {},
        runs,
    )


def old_results() -> report.Results:
    """A results.json written before the goodput keys existed (same schema version)."""
    res = results()
    for run in res["runs"]:
        for step in run["steps"]:
            for key in list(step):
                if key not in report.StepResult.__annotations__ or key in (
                    "rejected",
                    "delivered_output_tokens_per_s",
                    "goodput_output_tokens_per_s",
                    "slo_attainment",
                    "slo_ttft_s",
                    "slo_itl_s",
                    "queue_wait_p50_s",
                    "queue_wait_p99_s",
                ):
                    del step[key]  # type: ignore[misc]
    return res


def test_results_schema_validation() -> None:
    good = results()
    assert report.validate_results(copy.deepcopy(good))["schema_version"] == 1
    bad = copy.deepcopy(good)
    del bad["runs"][1]["steps"][0]["ttft_p50_s"]
    with pytest.raises(ValueError, match=r"runs\[1\]\.steps\[0\]\.ttft_p50_s: missing"):
        report.validate_results(bad)
    bad = copy.deepcopy(good)
    bad["runs"][0]["steps"][0]["errors"] = "none"
    with pytest.raises(ValueError, match="errors: expected a number"):
        report.validate_results(bad)
    # Keys added in version 1 are optional (older files lack them) but typed when present.
    assert report.validate_results(old_results())["runs"][0]["steps"][0]["completed"] == 2
    bad = copy.deepcopy(good)
    bad["runs"][0]["steps"][0]["slo_attainment"] = "most"
    with pytest.raises(ValueError, match="slo_attainment: expected a number"):
        report.validate_results(bad)
    bad = copy.deepcopy(good)
    bad["runs"][0]["steps"][0]["classes"] = {"a": {"requests": [1]}}
    with pytest.raises(ValueError, match=r"classes\.a\.requests: expected a number"):
        report.validate_results(bad)


def test_markdown_tables_and_comparison() -> None:
    md = report.markdown(results())
    assert "## rr" in md and "## ca" in md
    assert "| 2 | 0.50 | 4 | 750 ms |" in md  # rate, req/s, out tok/s, TTFT p50
    # ... cut, rejected, errors, done tok/s, goodput tok/s, SLO met, queue wait p50
    assert "| 2 | 0 | 1 | 4 | 4 | 40% | - |" in md
    assert "SLO: TTFT <= 5 s, mean ITL <= 500 ms." in md
    assert "+50%" in md and "3.0x lower" in md  # ca against rr
    assert "| 7 | +100% |" in md  # goodput 3.5 -> 7 tok/s against rr
    old = report.markdown(old_results())  # older files render, new columns blank
    assert "| 2 | 0.50 | 4 | 750 ms |" in old and "| - | - | - |" in old


def test_markdown_by_traffic_class() -> None:
    step = summarize_step(mixed_trace(), rate=1.4, duration=5.0)
    res = report.new_results(
        "lbproxy bench",
        {"name": "shared-prefix", "api": "completions", "params": {}},
        {},
        [report.RunResult(profile="p", label="two tenants", target="t", steps=[step])],
    )
    md = report.markdown(report.validate_results(res))
    assert "### two tenants: by traffic class" in md
    assert "| 1.4 | a | 3 | 2 | 0 | 1 |" in md and "| 1.4 | b | 4 | 1 | 2 | 0 |" in md


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete file
    return struct.unpack(">II", data[16:24])


def test_plots_include_goodput_and_slo(tmp_path: Path) -> None:
    paths = report.write_results(tmp_path / "new", results())
    names = sorted(p.name for p in paths)
    assert names == [
        "goodput.png",
        "results.json",
        "results.md",
        "slo.png",
        "throughput.png",
        "ttft.png",
    ]
    for name in ("goodput.png", "slo.png"):
        w, h = png_size(tmp_path / "new" / name)
        assert w > 300 and h > 200
    # An older file without the keys still plots (the new plots are empty).
    report.write_results(tmp_path / "old", old_results())
    png_size(tmp_path / "old" / "slo.png")


def test_warmup_leaves_out_the_first_arrivals_and_their_seconds() -> None:
    from lbproxy.bench.stats import RequestRecord, summarize_step

    recs = [
        RequestRecord(start=t, first_token=t + 0.1, end=t + 1.0, output_tokens=10)
        for t in (1.0, 2.0, 11.0, 12.0, 13.0, 14.0)
    ]
    full = summarize_step(recs, rate=0.3, duration=20.0)
    steady = summarize_step(recs, rate=0.3, duration=20.0, warmup=10.0)
    assert full["requests"] == 6 and steady["requests"] == 4
    assert full["completed_output_tokens_per_s"] == 60 / 20
    assert steady["completed_output_tokens_per_s"] == 40 / 10
    assert steady["duration_s"] == 10.0 and steady["warmup_s"] == 10.0
    with pytest.raises(ValueError):
        summarize_step(recs, rate=0.3, duration=20.0, warmup=20.0)
