"""The fast /metrics parser against prometheus-client's parser, on captures and edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.routing.state import MetricsSnapshot
from lbproxy.signals.metrics_parser import (
    FIELD_SOURCES,
    MetricsParseError,
    parse_labels,
    parse_metrics,
)

FIXTURES = Path(__file__).parent / "fixtures"
FIELDS = [*FIELD_SOURCES, "block_size", "num_gpu_blocks"]


def reference_snapshot(text: str, now: float) -> MetricsSnapshot:
    """The same reduction computed from prometheus-client's full parse (slow, trusted)."""
    values: dict[str, list[float]] = {}
    infos: list[dict[str, str]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                infos.append(sample.labels)
            else:
                values.setdefault(sample.name, []).append(float(sample.value))

    def as_int(s: str | None) -> int | None:
        return int(s) if s is not None and s.isdigit() else None

    sizes = [as_int(i.get("block_size")) for i in infos]
    blocks = [b for b in (as_int(i.get("num_gpu_blocks")) for i in infos) if b is not None]
    snap = MetricsSnapshot(
        time=now,
        block_size=next((s for s in sizes if s is not None), None),
        num_gpu_blocks=sum(blocks) if blocks else None,
    )
    for field, (names, how) in FIELD_SOURCES.items():
        # prometheus-client renames a counter's samples to <name>_total: accept either.
        found = [values.get(n) or values.get(n + "_total") for n in names]
        chosen = next((v for v in found if v), None)
        if chosen is not None:
            agg = math.fsum(chosen) / len(chosen) if how == "mean" else math.fsum(chosen)
            setattr(snap, field, None if math.isnan(agg) else agg)
    return snap


def assert_same(got: MetricsSnapshot, want: MetricsSnapshot) -> None:
    for f in ["time", *FIELDS]:
        g, w = getattr(got, f), getattr(want, f)
        if isinstance(w, float) and isinstance(g, float):
            assert g == pytest.approx(w, rel=1e-12), f
        else:
            assert g == w, f


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---- real captures and synthetic pages -------------------------------------------------

MULTI_ENGINE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
vllm:num_requests_running{engine="0",model_name="other"} 5.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 10.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 99.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 28.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 64.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 16.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="2000"} 1.0
"""

# Escaped quotes, commas and braces inside label values; a label set that mimics ours
# inside a quoted value must not be read as one.
ESCAPED_LABELS = r"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="we\"ird, {name}",engine="0"} 2.0
vllm:num_requests_running{model_name="back\\slash",engine="1"} 3.0
vllm:num_requests_running{model_name="new\nline}",engine="2",} 4.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{n="block_size=\"9\",",block_size="32",num_gpu_blocks="640"} 1.0
"""

NUMBER_FORMS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0"} 1.5e+01
vllm:num_requests_running{engine="1"} 2E-1
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0"} 7 1700000000000
vllm:num_requests_waiting{engine="1"}\t3\t1700000000000
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0"} NaN
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0"} +Inf
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0"} -0.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total 42
"""

UNTYPED_AND_CRLF = (
    "vllm:num_requests_running 2\r\n"
    'vllm:num_requests_waiting{model_name="m"} 5\r\n'
    "\r\n"
    'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\r\n'
)

# Older counters declared without the _total suffix (prometheus-client renames these).
OLD_COUNTER_NAMES = """\
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries{model_name="m"} 120.0
# TYPE vllm:gpu_prefix_cache_hits gauge
vllm:gpu_prefix_cache_hits{model_name="m"} 30.0
"""

# A new and an old name side by side: the new one wins, nothing is counted twice.
NEW_AND_OLD = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.3
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
"""

TEXTS = {
    "vllm-0.32": fixture("vllm-0.32-metrics.txt"),
    "vllm-0.32-small-kv": fixture("vllm-0.32-metrics-small-kv.txt"),
    "vllm-old": fixture("vllm-old-metrics.txt"),
    "sglang": fixture("sglang-metrics.txt"),
    "multi-engine": MULTI_ENGINE,
    "escaped-labels": ESCAPED_LABELS,
    "number-forms": NUMBER_FORMS,
    "untyped-crlf": UNTYPED_AND_CRLF,
    "old-counter-names": OLD_COUNTER_NAMES,
    "new-and-old": NEW_AND_OLD,
    "empty": "",
    "only-other-metrics": "# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 1.5\n",
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_equals_prometheus_client(name: str) -> None:
    text = TEXTS[name]
    assert_same(parse_metrics(text, 12.5), reference_snapshot(text, 12.5))


# What the pages hold, written out, so that a shared mistake in both parsers still fails.
EXPECTED = {
    "vllm-0.32": dict(
        num_running=0.0,
        num_waiting=0.0,
        kv_cache_usage=0.0,
        prefix_cache_queries=7569.0,
        prefix_cache_hits=768.0,
        prompt_tokens=7569.0,
        generation_tokens=765.0,
        num_preemptions=0.0,
        block_size=128,
        num_gpu_blocks=8192,
    ),
    "vllm-0.32-small-kv": dict(
        prefix_cache_queries=25699.0,
        prefix_cache_hits=8096.0,
        prompt_tokens=25699.0,
        generation_tokens=1716.0,
        block_size=32,
        num_gpu_blocks=128,
    ),
    "vllm-old": dict(
        num_running=33.0,
        num_waiting=7.0,
        kv_cache_usage=0.4375,
        prefix_cache_queries=9146200.0 + 120344.0,
        prefix_cache_hits=6220100.0 + 80112.0,
        num_preemptions=12.0,
        block_size=16,
        num_gpu_blocks=27235 + 27236,
    ),
    "sglang": dict(
        num_running=14.0,
        num_waiting=5.0,
        kv_cache_usage=0.62,
        prompt_tokens=2468100.0,
        generation_tokens=312904.0,
        num_preemptions=None,
        prefix_cache_queries=None,
        block_size=None,
    ),
    "multi-engine": dict(
        num_running=12.0,
        num_waiting=11.0,
        kv_cache_usage=0.5,
        prefix_cache_queries=128.0,
        prefix_cache_hits=80.0,
        prompt_tokens=None,
        block_size=16,
        num_gpu_blocks=3000,
    ),
    "escaped-labels": dict(num_running=9.0, block_size=32, num_gpu_blocks=640),
    "number-forms": dict(
        num_running=15.2,
        num_waiting=10.0,
        kv_cache_usage=None,  # NaN is reported as unknown
        prompt_tokens=math.inf,
        generation_tokens=0.0,
        num_preemptions=42.0,
    ),
    "untyped-crlf": dict(num_running=2.0, num_waiting=5.0, kv_cache_usage=0.5),
    "old-counter-names": dict(prefix_cache_queries=120.0, prefix_cache_hits=30.0),
    "new-and-old": dict(kv_cache_usage=0.3),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_known_values(name: str) -> None:
    snap = parse_metrics(TEXTS[name], 3.0)
    assert snap.time == 3.0
    for field, want in EXPECTED[name].items():
        assert getattr(snap, field) == pytest.approx(want), field


@pytest.mark.parametrize("name", ["empty", "only-other-metrics"])
def test_no_known_names_gives_unknowns(name: str) -> None:
    snap = parse_metrics(TEXTS[name], 1.0)
    assert all(getattr(snap, f) is None for f in FIELDS)


# ---- garbage ---------------------------------------------------------------------------

NOT_METRICS = {
    "html": "<!DOCTYPE html>\n<html><body><h1>502 Bad Gateway</h1></body></html>\n",
    "json": '{"error": {"message": "not found", "code": 404}}',
    "binary": bytes(range(256)).decode("latin-1") * 50,
    "comment-mentions": "# HELP vllm:num_requests_running x\n# TYPE vllm:kv_cache_usage_perc\n",
}


@pytest.mark.parametrize("name", list(NOT_METRICS))
def test_text_without_our_metrics_yields_unknowns(name: str) -> None:
    snap = parse_metrics(NOT_METRICS[name], 1.0)
    assert all(getattr(snap, f) is None for f in FIELDS)


MALFORMED = {
    "bad-value": 'vllm:num_requests_running{engine="0"} abc\n',
    "underscore-value": 'vllm:num_requests_running{engine="0"} 1_000\n',
    "missing-value": 'vllm:num_requests_waiting{engine="0"}\n',
    "no-value-no-labels": "vllm:num_requests_waiting \n",
    "unterminated-labels": 'vllm:kv_cache_usage_perc{engine="0" 0.5\n',
    "bad-info-labels": "vllm:cache_config_info{block_size=16} 1.0\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_known_line_raises(name: str) -> None:
    text = "# TYPE x gauge\nx 1\n" + MALFORMED[name]
    with pytest.raises(MetricsParseError):
        parse_metrics(text, 1.0)
    with pytest.raises(ValueError):  # prometheus-client rejects them too
        list(text_string_to_metric_families(text))


def test_malformed_unknown_lines_are_not_inspected() -> None:
    text = "python_info{{{ garbage\n" + 'vllm:num_requests_running{engine="0"} 4\n'
    assert parse_metrics(text, 1.0).num_running == 4.0


def test_pathological_line_fails_fast() -> None:
    # A huge unterminated label value: linear-time rejection, no catastrophic backtracking.
    text = 'vllm:cache_config_info{block_size="' + "\\" * 200_001 + "x} 1\n"
    with pytest.raises(MetricsParseError):
        parse_metrics(text, 1.0)


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(MetricsParseError, ValueError)


@pytest.mark.parametrize(
    ("labels", "want"),
    [
        ('a="1",b="2"', {"a": "1", "b": "2"}),
        (' a = "1" , b="x,y" , ', {"a": "1", "b": "x,y"}),
        (r'a="q\"uote",b="back\\slash",c="n\nl"', {"a": 'q"uote', "b": "back\\slash", "c": "n\nl"}),
        ("", {}),
    ],
)
def test_parse_labels(labels: str, want: dict[str, str]) -> None:
    assert parse_labels(labels) == want
