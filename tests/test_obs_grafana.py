"""The Grafana dashboard in configs/ queries only metrics and labels lbproxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.sim.server import start_sim_server
from tests.obs_support import failing_backend_factory

DASHBOARD = Path(__file__).resolve().parents[1] / "configs/grafana/lbproxy-dashboard.json"
_METRIC = re.compile(r"\blbproxy_[a-zA-Z0-9_]+")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\b(lbproxy_[a-zA-Z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus adds to every scraped series.
_TARGET_LABELS = {"instance", "job"}


@pytest.fixture
def failing_backends(loop_thread):
    yield from failing_backend_factory(loop_thread)


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def test_dashboard_json_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lbproxy" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "pool", "backend"} <= variables
    for p in panels(dash):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs))
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            for var in re.findall(r"\$([a-z_]+)", t["expr"]):
                assert var in variables or var == "__rate_interval", (var, t["expr"])
    # every area the issue names has a panel
    text = " ".join(exprs(dash))
    for needed in (
        "lbproxy_requests_total",
        "lbproxy_time_to_first_token_seconds_bucket",
        "lbproxy_inter_token_latency_seconds_bucket",
        "lbproxy_e2e_request_latency_seconds_bucket",
        "lbproxy_in_flight_requests",
        "lbproxy_retries_total",
        "lbproxy_routing_decisions_total",
        "lbproxy_backend_healthy",
        "lbproxy_backend_scrape_age_seconds",
        "lbproxy_backend_scrape_errors_total",
        "lbproxy_prefix_index_hit_blocks_total",
        "lbproxy_prefix_index_memory_bytes",
    ):
        assert needed in text, needed
    for e in exprs(dash):
        if "histogram_quantile" in e:
            assert "_bucket" in e and "le" in _BY.search(e).group(1)  # type: ignore[union-attr]


def test_every_metric_and_label_in_the_dashboard_is_exported(
    loop_thread, run_proxy, fake_backends, failing_backends
) -> None:
    sims = [
        loop_thread.run(start_sim_server(profile="vendor-a", model=model, speed=50, seed=i))
        for i, model in enumerate(("m", "m", "p"))
    ]
    try:
        good = fake_backends(1)[0]
        broken = failing_backends(fail_status=503)
        cfg = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pools": [
                {
                    "name": "sim",
                    "models": ["m"],
                    "routing": "cache-aware",
                    "backends": [
                        {"url": s.url, "name": f"s{i}", "vendor": "vendor-a"}
                        for i, s in enumerate(sims[:2])
                    ],
                },
                {
                    "name": "precise",
                    "models": ["p"],
                    "routing": "precise-cache-aware",
                    "tokenizer": "default",
                    "backends": [{"url": sims[2].url, "name": "p0", "vendor": "vendor-a"}],
                },
                {
                    "name": "fake",
                    "models": ["fake-model"],
                    "routing": "round-robin",
                    "backends": [{"url": broken.url}, {"url": good.url}],
                },
            ],
        }
        proxy = run_proxy(cfg)
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            for i in range(6):
                body = {
                    "model": "m",
                    "prompt": "shared prefix " * 30 + str(i),
                    "max_tokens": 4,
                }
                if i % 2:
                    body.update(stream=True, stream_options={"include_usage": True})
                assert c.post("/v1/completions", json=body).status_code == 200
            body = {"model": "p", "prompt": "precise " * 40, "max_tokens": 2}
            assert c.post("/v1/completions", json=body).status_code == 200
            for _ in range(4):
                body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
                assert c.post("/v1/completions", json=body).status_code == 200
        text = httpx.get(proxy.url + "/metrics").text
    finally:
        for s in sims:
            loop_thread.run(s.close())

    samples: dict[str, set[str]] = {}  # sample name -> label names seen with a sample
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    dash = json.loads(DASHBOARD.read_text())
    for e in exprs(dash):
        names = _METRIC.findall(e)
        assert names, e
        missing = [n for n in names if n not in samples]
        assert not missing, f"{missing} not in /metrics (from: {e})"
        labels = set().union(*(samples[n] for n in names)) | _TARGET_LABELS
        for by in _BY.findall(e):
            used = {x.strip() for x in by.split(",") if x.strip()}
            assert used <= labels, (used - labels, e)
        for name, matchers in _SELECTOR.findall(e):
            used = set(_MATCHER.findall(matchers))
            assert used <= samples[name] | _TARGET_LABELS, (used - samples[name], e)
