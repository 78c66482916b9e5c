"""lbproxy's own /metrics: names, labels and exact counts after known traffic."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.histogram import Histogram
from lbproxy.proxy.request_metrics import route_label
from lbproxy.proxy.usage import parse_usage
from lbproxy.sim.server import start_sim_server
from tests.conftest import proxy_config
from tests.obs_support import failing_backend_factory

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 4}


class Scrape:
    """Parsed /metrics: `value(name, **labels)` sums the samples matching the labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, f"no sample {name}{labels}"
        return sum(found)

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def scrape(url: str) -> Scrape:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    parsed = Scrape(r.text)
    assert all(s.name.startswith("lbproxy_") for s in parsed.samples)  # never vllm:
    return parsed


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("last", "prev", "want"),
    [
        (b'{"usage":{"prompt_tokens":7,"total_tokens":12,"completion_tokens":5}}', b"", (7, 5)),
        (b'{"usage": {"prompt_tokens": 7, "completion_tokens": 5}}', b"", (7, 5)),
        (b"data: [DONE]\n\n", b'data: {"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n',
         (3, 9)),
        (b'data: {"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\ndata: [DONE]\n\n', b"",
         (3, 9)),
        (b'{"text":"say \\"completion_tokens\\": 99","usage":null}', b"", (None, None)),
        (b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":3,"total_tokens":3}}', b"",
         (3, None)),
        (b"data: [DONE]\n\n", b"data: {}\n\n", (None, None)),
        (b'"usage":{"prompt_tokens":152,"total_tokens":160,"completion_tokens":8,'
         b'"prompt_tokens_details":{"cached_tokens":144}}}', b"", (152, 8)),
        (b'"usage":{"prompt_tokens": 12 ,"completion_tokens": 3 }}', b"", (12, 3)),
        (b'"usage":{"prompt_tokens":null,"completion_tokens":"x"}}', b"", (None, None)),
        (b'"completion_tokens":' + b"9" * 40, b"", (None, None)),
    ],
)  # fmt: skip
def test_parse_usage(last: bytes, prev: bytes, want: tuple[int | None, int | None]) -> None:
    assert parse_usage(last, prev) == want


@pytest.fixture
def failing_backends(loop_thread):
    yield from failing_backend_factory(loop_thread)


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    h.observe(0.2, n=3)  # three gaps at the same mean
    assert h.buckets() == [("0.1", 2), ("1.0", 7), ("+Inf", 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 3.0 + 0.6)


@pytest.mark.parametrize(
    ("path", "label"),
    [("/v1/chat/completions", "/v1/chat/completions"), ("/v1/embeddings", "/v1/embeddings"),
     ("/v1/anything/else", "other"), ("/v1/completions/", "other")],
)  # fmt: skip
def test_route_label_is_a_closed_set(path: str, label: str) -> None:
    assert route_label(path) == label


# ----------------------------------------------------------------------------- traffic


def test_requests_latency_and_tokens_counted_exactly(fake_backends, run_proxy) -> None:
    backends = fake_backends(2)
    cfg = proxy_config(backends)
    cfg["pools"][0]["backends"][0]["vendor"] = "vendor-a"
    cfg["pools"][0]["backends"][1]["vendor"] = "vendor-b"
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(6):  # round-robin: 3 each
            assert c.post("/v1/completions", json=BODY).status_code == 200
        for _ in range(4):  # 2 streams each, 4 token events + [DONE] per stream
            r = c.post("/v1/completions", json={**BODY, "stream": True})
            assert r.status_code == 200
        assert c.post("/v1/chat/completions", json={**BODY, "messages": []}).status_code == 200
        assert c.post("/v1/completions", json={"model": "nope"}).status_code == 404
        assert c.post("/v1/completions", content=b"{not json").status_code == 400

    m = scrape(proxy.url)
    for be, vendor, chat in (("be0", "vendor-a", 1), ("be1", "vendor-b", 0)):
        lv = {"pool": "main", "backend": be, "vendor": vendor}
        assert m.value("lbproxy_requests_total", **lv, route="/v1/completions", status="200") == 5
        assert m.value("lbproxy_requests_total", **lv) == 5 + chat
        assert m.value("lbproxy_routing_decisions_total", **lv, profile="round-robin") == 5 + chat
        assert m.value("lbproxy_e2e_request_latency_seconds_count", **lv) == 5 + chat
        assert m.value("lbproxy_e2e_request_latency_seconds_bucket", **lv, le="+Inf") == 5 + chat
        assert m.value("lbproxy_time_to_first_token_seconds_count", **lv) == 2
        # fake streams carry no usage: gaps = body reads - 1 per stream (reads vary with timing)
        chunks = m.value("lbproxy_stream_chunks_total", **lv)
        assert 2 <= chunks <= 2 * 5  # 4 token events + [DONE] each, perhaps read together
        assert m.value("lbproxy_inter_token_latency_seconds_count", **lv) == chunks - 2
        # non-streaming responses carry usage: 7 prompt tokens, max_tokens completion tokens
        assert m.value("lbproxy_prompt_tokens_total", **lv) == 7 * (3 + chat)
        assert m.value("lbproxy_completion_tokens_total", **lv) == 4 * (3 + chat)
        assert m.value("lbproxy_in_flight_requests", **lv) == 0
        assert m.value("lbproxy_backend_healthy", **lv) == 1
        assert m.value("lbproxy_backend_scrape_errors_total", **lv) >= 1  # fakes have no /metrics
        assert m.value("lbproxy_backend_scrape_age_seconds", **lv) == float("inf")
        assert m.value("lbproxy_time_to_first_token_seconds_sum", **lv) > 0
    unrouted = {"pool": "", "backend": "", "route": "/v1/completions"}
    assert m.value("lbproxy_requests_total", **unrouted, status="404") == 1
    assert m.value("lbproxy_requests_total", **unrouted, status="400") == 1
    assert m.value("lbproxy_requests_total") == 13
    assert not m.labelsets("lbproxy_retries_total")  # nothing failed
    assert m.value("lbproxy_info", version="0.1.0") == 1
    assert m.value("lbproxy_process_cpu_seconds_total") > 0


def test_retries_are_counted_with_their_causes(fake_backends, failing_backends, run_proxy) -> None:
    good = fake_backends(2)
    dropping = failing_backends(drop=True)
    busy = failing_backends(fail_status=429)
    broken = failing_backends(fail_status=503)
    cfg = proxy_config([good[0], dropping, busy, broken, good[1]])
    cfg["limits"] = {"max_attempts": 4}  # the 3 bad ones are always followed by a good one
    proxy = run_proxy(cfg)
    n = 20
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert [c.post("/v1/completions", json=BODY).status_code for _ in range(n)] == [200] * n

    m = scrape(proxy.url)
    tried = {"be1": len(dropping.received), "be2": len(busy.received), "be3": len(broken.received)}
    assert all(tried.values()), tried  # the breaker may stop some, but each was tried
    for be, cause in (("be1", "reset_after_send"), ("be2", "status_429"), ("be3", "status_5xx")):
        assert m.value("lbproxy_retries_total", backend=be, cause=cause) == tried[be]
        assert m.value("lbproxy_upstream_failures_total", backend=be, cause=cause) == tried[be]
        assert m.value("lbproxy_retries_total", backend=be) == tried[be]  # no other cause
    assert m.value("lbproxy_retries_total") == sum(tried.values())
    forwarder = proxy.state.forwarder
    assert forwarder is not None and forwarder.retries == sum(tried.values())
    # every request is counted once, on the backend that answered it
    for i, fb in ((0, good[0]), (4, good[1])):
        assert m.value("lbproxy_requests_total", backend=f"be{i}", status="200") == len(fb.received)
    assert m.value("lbproxy_requests_total") == n


def test_all_attempts_failing_is_counted_once_without_a_backend(
    failing_backends, run_proxy
) -> None:
    dropping = [failing_backends(drop=True) for _ in range(2)]
    cfg = proxy_config(dropping)
    cfg["limits"] = {"max_attempts": 2}
    proxy = run_proxy(cfg)
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, timeout=10)
    assert r.status_code == 502

    m = scrape(proxy.url)
    assert m.value("lbproxy_requests_total") == 1
    assert m.value("lbproxy_requests_total", pool="main", backend="", status="502") == 1
    # they read the request, then closed: it was sent (and may have run)
    assert m.value("lbproxy_upstream_failures_total", cause="reset_after_send") == 2
    assert m.value("lbproxy_retries_total", cause="reset_after_send") == 1  # not the last
    assert m.value("lbproxy_e2e_request_latency_seconds_count") == 0


def test_stream_usage_tokens_match_what_the_client_received(loop_thread, run_proxy) -> None:
    sims = [
        loop_thread.run(start_sim_server(profile="vendor-b", model="m", speed=50, seed=i))
        for i in range(2)
    ]
    try:
        cfg = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pools": [
                {
                    "name": "sim",
                    "models": ["m"],
                    "routing": "cache-aware",
                    "backends": [
                        {"url": s.url, "name": f"s{i}", "vendor": "vendor-b"}
                        for i, s in enumerate(sims)
                    ],
                }
            ],
        }
        proxy = run_proxy(cfg)
        prompt = "the same long system prompt " * 40
        completion = prompt_total = 0
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            for i in range(6):
                body = {
                    "model": "m",
                    "prompt": prompt + str(i),
                    "max_tokens": 5 + i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200
                usage_events = [e for e in r.text.split("\n\n") if '"usage":{' in e]
                usage = httpx.Response(200, content=usage_events[-1][6:]).json()["usage"]
                completion += usage["completion_tokens"]
                prompt_total += usage["prompt_tokens"]
        m = scrape(proxy.url)
        assert m.value("lbproxy_completion_tokens_total") == completion == sum(range(5, 11))
        assert m.value("lbproxy_prompt_tokens_total") == prompt_total
        assert m.value("lbproxy_time_to_first_token_seconds_count") == 6
        # ITL gaps come from usage: completion_tokens - 1 per stream
        assert m.value("lbproxy_inter_token_latency_seconds_count") == completion - 6
        # the prefix-hash scorer saw the shared prompt: every request after the first hits
        hits = m.value("lbproxy_prefix_index_hit_blocks_total", pool="sim", index="prefix-hash")
        queried = m.value("lbproxy_prefix_index_query_blocks_total", pool="sim")
        assert 0 < hits < queried
        assert m.value("lbproxy_prefix_index_entries", pool="sim", index="prefix-hash") > 0
        assert m.value("lbproxy_prefix_index_memory_bytes", pool="sim") > 0
        assert m.value("lbproxy_routing_decisions_total", profile="cache-aware") == 6
        # the scraper reads the simulated vLLM's /metrics
        assert m.value("lbproxy_backend_scrapes_total", backend="s0") > 0
        assert 0 <= m.value("lbproxy_backend_scrape_age_seconds", backend="s0") < 5
        assert m.labelsets("lbproxy_backend_kv_cache_usage_ratio")
    finally:
        for s in sims:
            loop_thread.run(s.close())


def test_client_disconnect_is_counted(fake_backends, run_proxy) -> None:
    (slow,) = fake_backends(1, chunk_delay=0.05)
    proxy = run_proxy(proxy_config([slow]))
    body = {**BODY, "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(timeout=10) as c,
        c.stream("POST", proxy.url + "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = scrape(proxy.url)
        if m.value("lbproxy_client_disconnects_total", backend="be0") == 1:
            break
        time.sleep(0.05)
    assert m.value("lbproxy_client_disconnects_total", backend="be0") == 1
    assert m.value("lbproxy_requests_total", backend="be0", status="200") == 1
    assert m.value("lbproxy_e2e_request_latency_seconds_count") == 0  # not a completed request
    assert m.value("lbproxy_in_flight_requests", backend="be0") == 0
