"""Percentiles, throughput and latency arithmetic on hand-made traces; SSE parsing; the
results.json schema and its markdown."""

from __future__ import annotations

import copy

import pytest

from lbproxy.bench import report
from lbproxy.bench.loadgen import StreamParser
from lbproxy.bench.stats import RequestRecord, percentile, poisson_arrivals, summarize_step


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
    assert s["elapsed_s"] == pytest.approx(5.0)  # first send 0.0 .. last end 5.0
    assert s["output_tokens"] == 17  # 4 + 10 + 0 + 3; the failed request's 99 excluded
    assert s["output_tokens_per_s"] == pytest.approx(17 / 5)
    assert s["completed_output_tokens_per_s"] == pytest.approx(14 / 5)  # 4 + 10
    assert s["requests_per_s"] == pytest.approx(2 / 5)
    assert s["prompt_tokens_per_s"] == pytest.approx(200 / 5)
    assert s["prefix_cache_hit_rate"] == pytest.approx(50 / 200)
    # TTFTs 0.5, 0.2, 3.0 (censored), 1.0 -> sorted 0.2 0.5 1.0 3.0
    assert s["ttft_p50_s"] == pytest.approx(0.75)
    assert s["ttft_mean_s"] == pytest.approx((0.5 + 0.2 + 3.0 + 1.0) / 4)
    assert s["ttft_p99_s"] == pytest.approx(1.0 + 0.97 * 2.0)
    # ITL pools every gap: 0.1 0.2 0.3 0.5 0.5 0.5
    assert s["itl_p50_s"] == pytest.approx(0.4)
    assert s["itl_mean_s"] == pytest.approx(2.1 / 6)
    assert s["e2e_p50_s"] == pytest.approx(2.0)
    assert set(s) >= set(report.StepResult.__annotations__) - {"backends"}


def test_summarize_step_with_nothing_served() -> None:
    s = summarize_step([RequestRecord(start=0.0, status="error", end=0.1)], rate=1, duration=1)
    assert s["errors"] == 1 and s["output_tokens_per_s"] == 0.0 and s["ttft_p50_s"] is None
    empty = summarize_step([], rate=1, duration=1)
    assert empty["requests"] == 0 and empty["itl_p50_s"] is None


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


def test_stream_parser_error_event() -> None:
    p = StreamParser()
    p.feed(b'data: {"error":{"message":"backend b0 failed","code":502}}\n\n', 0.2)
    assert p.error == "backend b0 failed" and p.chunks == 0


# ------------------------------------------------------------------------------ report
def results() -> report.Results:
    step = summarize_step(trace(), rate=2.0, duration=4.0)
    faster = {
        **step,
        "output_tokens_per_s": step["output_tokens_per_s"] * 1.5,
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


def test_markdown_tables_and_comparison() -> None:
    md = report.markdown(results())
    assert "## rr" in md and "## ca" in md
    assert "| 2 | 0.40 | 3 | 750 ms |" in md  # rate, req/s, out tok/s, TTFT p50
    assert "+50%" in md and "3.0x lower" in md  # ca against rr
