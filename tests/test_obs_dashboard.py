"""The live dashboard: its JSON endpoint, and the page itself in headless Chromium."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lbproxy.proxy.observability import OBS
from lbproxy.sim.server import SimServerHandle, start_sim_server
from tests.conftest import LoopThread, proxy_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FLEET = [("a0", "vendor-a"), ("b0", "vendor-b"), ("c0", "vendor-c")]


@pytest.fixture
def sim_fleet(loop_thread: LoopThread) -> Iterator[list[SimServerHandle]]:
    sims = [
        loop_thread.run(start_sim_server(profile=vendor, model="m", speed=50, seed=i))
        for i, (_name, vendor) in enumerate(FLEET)
    ]
    yield sims
    for s in sims:
        loop_thread.run(s.close())


def fleet_config(sims: list[SimServerHandle]) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [
            {
                "name": "sim",
                "models": ["m"],
                "routing": "cache-aware",
                "backends": [
                    {"url": s.url, "name": name, "vendor": vendor}
                    for s, (name, vendor) in zip(sims, FLEET, strict=True)
                ],
            }
        ],
    }


def send(url: str, n: int, stream: bool = True) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            body = {
                "model": "m",
                "prompt": f"group {i % 3} shares this prompt " * 20,
                "max_tokens": 8,
                "stream": stream,
            }
            assert c.post("/v1/completions", json=body).status_code == 200


def test_state_json_reports_backends_and_recent_rates(sim_fleet, run_proxy) -> None:
    proxy = run_proxy(fleet_config(sim_fleet))
    first = httpx.get(proxy.url + "/dashboard/state.json").json()
    assert [b["id"] for b in first["backends"]] == [f"sim/{n}" for n, _v in FLEET]
    assert [b["vendor"] for b in first["backends"]] == [v for _n, v in FLEET]
    assert first["totals"]["requests"] == 0
    assert first["pools"][0]["profile"] == "cache-aware"

    send(proxy.url, 9)
    sampler = proxy.runner.app[OBS].sampler
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = httpx.get(proxy.url + "/dashboard/state.json").json()
        if sum(p or 0 for p in state["series"]["rps"]) > 0 and state["totals"]["ttft_s"]:
            break
        time.sleep(0.2)
    assert sampler.interval == 1.0
    assert state["totals"]["requests"] == 9
    assert sum(b["requests"] for b in state["backends"]) == 9
    assert state["totals"]["rps"] > 0 and state["totals"]["ttft_s"] > 0
    assert len(state["series"]["t"]) == len(state["series"]["rps"]) >= 1
    for b in state["backends"]:
        assert set(state["series"]["backends"][b["id"]]) == {"rps", "ttft_s"}
        assert len(state["series"]["backends"][b["id"]]["rps"]) == len(state["series"]["t"])
        assert b["healthy"] is True and b["in_flight"] == 0
        assert b["scrape_age_s"] is not None and b["kv_cache_usage"] is not None
    served = [b for b in state["backends"] if b["requests"]]
    assert served and all(b["prefix_hit_est"] is not None for b in served)
    assert "prefix-hash" in state["pools"][0]["prefix_index"]


def test_dashboard_page_is_self_contained(fake_backends, run_proxy) -> None:
    proxy = run_proxy(proxy_config(fake_backends(1)))
    r = httpx.get(proxy.url + "/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in html.replace('"http://www.w3.org/2000/svg"', "")


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (apt-get install -y chromium)",
)
def test_dashboard_renders_the_fleet_and_updates_in_chromium(sim_fleet, run_proxy) -> None:
    from playwright.sync_api import expect, sync_playwright

    proxy = run_proxy(fleet_config(sim_fleet))
    requested: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda req: requested.append(req.url))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(proxy.url + "/dashboard")
            # locator waits, not wait_for_function: the page's CSP forbids eval, and stays on
            expect(page.locator("body")).to_have_attribute(
                "data-ticks", re.compile(r"^[1-9][0-9]*$"), timeout=15000
            )

            rows = page.locator("#backends tbody tr")
            assert rows.count() == len(FLEET)
            for name, vendor in FLEET:
                row = page.locator(f'#backends tr[data-backend="sim/{name}"]')
                assert row.locator('td[data-field="name"]').inner_text() == name
                assert row.locator('td[data-field="vendor"]').inner_text() == vendor
                assert row.locator('td[data-field="health"]').inner_text() == "healthy"
                # flow control's concurrency limit (a new backend's: 16)
                assert row.locator('td[data-field="limit"]').inner_text() == "16"
            assert page.locator("#t-requests").inner_text() == "0"
            assert page.locator("#pools tbody td", has_text="(shed 0)").count() == 1

            sender = threading.Thread(target=send, args=(proxy.url, 12))
            sender.start()
            sender.join(60)
            assert not sender.is_alive()
            # the page polls every second: the totals and the rows catch up
            expect(page.locator("#t-requests")).to_have_text("12", timeout=15000)
            cells = page.locator('#backends td[data-field="requests"]').all_inner_texts()
            assert sum(int(c) for c in cells) == 12
            page.locator('#chart-rps path[data-series="total"]').wait_for(timeout=15000)
            ttft = page.locator('#backends td[data-field="ttft"]').all_inner_texts()
            assert any(t.endswith("ms") or t.endswith(" s") for t in ttft), ttft
            ages = page.locator('#backends td[data-field="scrape_age"]').all_inner_texts()
            assert all(a.endswith("s") and a != "never" for a in ages), ages
            assert page.locator("#status").inner_text() == "live"
        finally:
            browser.close()
    assert not errors, errors
    assert requested and all(u.startswith(proxy.url + "/dashboard") for u in requested), {
        u for u in requested if not u.startswith(proxy.url)
    }
