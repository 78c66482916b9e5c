"""The plugin contract: per-request state on the request, optional hooks through the
protocols of `routing.interfaces` (not plugin names), per-plugin timing on /metrics."""

from __future__ import annotations

import types
from collections.abc import Iterator

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

from lbproxy.routing import registry
from lbproxy.routing.interfaces import BuildContext, IndexStats
from lbproxy.routing.pipeline import TIME_EVERY
from lbproxy.routing.precise_index import PreciseIndex
from lbproxy.routing.state import Endpoint, RequestContext
from tests.conftest import proxy_config
from tests.test_obs_metrics import BODY, scrape

NOW = 100.0


def _ctx(text: str) -> RequestContext:
    return RequestContext(model="m", body={"prompt": text})


def _prompt(tag: str) -> str:
    return f"{tag}: " + " ".join(f"{tag}{i}" for i in range(400))  # ~3 KB, many blocks


def _prefix_hash():
    return registry.lookup("prefix-hash", "scorer").build({}, BuildContext(pool="p", model="m"))


def test_prefix_hash_keeps_each_requests_match_on_the_request() -> None:
    """score A, score B, then A's hooks: A's chain and match, not B's (the last scored)."""
    sc = _prefix_hash()
    e0, e1 = Endpoint("e0", "http://e0"), Endpoint("e1", "http://e1")
    eps = [e0, e1]
    warm = _ctx(_prompt("a"))
    sc.score(warm, eps, NOW)
    sc.on_routed(warm, e0, NOW)  # e0 now holds A's prompt

    a, b = _ctx(_prompt("a")), _ctx(_prompt("b"))
    assert sc.score(a, eps, NOW)[0] == 1.0
    sc.score(b, eps, NOW)  # a request ranked in between (flow control, P/D)
    full = sc.cached_tokens(a, e0)
    assert full >= 400  # A's hashed prompt (~3 KB in full blocks), in tokens; not 0
    assert sc.cached_tokens(b, e0) == 0
    hit_before = sc.hit_blocks.get("e0", 0)
    sc.on_routed(a, e0, NOW)
    sc.on_routed(b, e1, NOW)
    assert sc.hit_blocks["e0"] - hit_before == full // 16  # A's hit, in blocks
    assert sc.hit_blocks.get("e1", 0) == 0  # B matched nothing
    # Each learnt its own chain.
    assert sc.score(_ctx(_prompt("a")), eps, NOW)[:2] == [1.0, 0.0]
    assert sc.score(_ctx(_prompt("b")), eps, NOW)[:2] == [0.0, 1.0]
    assert not hasattr(sc, "_last_ctx") and not hasattr(sc, "_counts_ctx")


def test_precise_prefix_keeps_each_requests_match_on_the_request() -> None:
    bctx = BuildContext(pool="p", model="m", shared={"precise_index": PreciseIndex()})
    sc = registry.lookup("precise-prefix", "scorer").build({"block_size": 4}, bctx)
    e0, e1 = Endpoint("e0", "http://e0", block_size=4), Endpoint("e1", "http://e1", block_size=4)
    eps = [e0, e1]

    def ctx(ids: list[int]) -> RequestContext:
        c = RequestContext(model="m")
        c.set_token_ids(ids)
        return c

    a_ids, b_ids = list(range(1, 41)), list(range(100, 140))
    for ids, ep in ((a_ids, e0), (b_ids, e1)):  # speculated: each holds 10 blocks a while
        warm = ctx(ids)
        sc.score(warm, eps, NOW)
        sc.on_routed(warm, ep, NOW)

    a, b = ctx(a_ids), ctx(b_ids)
    assert sc.score(a, eps, NOW)[:2] == [1.0, 0.0]
    assert sc.score(b, eps, NOW)[:2] == [0.0, 1.0]  # ranked before A is committed
    assert sc.cached_tokens(a, e0) == 40 and sc.cached_tokens(a, e1) == 0
    assert sc.cached_tokens(b, e1) == 40 and sc.cached_tokens(b, e0) == 0
    sc.on_routed(a, e0, NOW)
    sc.on_routed(b, e1, NOW)
    assert sc.hit_blocks == {"e0": 10, "e1": 10}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _IndexedScorer:
    """A plugin with every optional hook, under a name /metrics has never heard of."""

    name = "my-index"

    def __init__(self) -> None:
        self.hit_blocks: dict[str, int] = {}
        self.query_blocks: dict[str, int] = {}
        self.forgotten: list[str] = []

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        return [0.5] * len(endpoints)

    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        self.query_blocks[endpoint.name] = self.query_blocks.get(endpoint.name, 0) + 3
        self.hit_blocks[endpoint.name] = self.hit_blocks.get(endpoint.name, 0) + 1

    def forget(self, endpoint_name: str) -> None:
        self.forgotten.append(endpoint_name)

    def index_stats(self) -> IndexStats:
        return {"entries": 7, "keys": 5, "approx_bytes": 1234}


@pytest.fixture
def my_index_plugin() -> Iterator[list[_IndexedScorer]]:
    built: list[_IndexedScorer] = []

    def build(params: _Params, bctx: BuildContext) -> _IndexedScorer:
        built.append(_IndexedScorer())
        return built[-1]

    module = types.SimpleNamespace(TYPE="my-index", KIND="scorer", Params=_Params, build=build)
    registry.register(module)
    try:
        yield built
    finally:
        del registry.PLUGINS["my-index"]


def test_metrics_and_forget_reach_any_plugin_through_the_protocols(
    fake_backends, run_proxy, my_index_plugin
) -> None:
    backends = fake_backends(2)
    cfg = proxy_config(backends)
    cfg["pools"][0]["routing"] = {
        "scorers": [{"type": "my-index", "weight": 1}],
        "picker": "max-score",
    }
    proxy = run_proxy(cfg)
    n = 2 * TIME_EVERY
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(n):
            assert c.post("/v1/completions", json=BODY).status_code == 200
    m = scrape(proxy.url)
    idx = {"pool": "main", "index": "my-index"}
    assert m.value("lbproxy_prefix_index_entries", **idx) == 7
    assert m.value("lbproxy_prefix_index_keys", **idx) == 5
    assert m.value("lbproxy_prefix_index_memory_bytes", **idx) == 1234
    assert m.value("lbproxy_prefix_index_query_blocks_total", **idx) == 3 * n
    assert m.value("lbproxy_prefix_index_hit_blocks_total", **idx) == n
    # One decision in TIME_EVERY timed, per plugin, in seconds.
    for plugin in ("my-index", "max-score"):
        labels = {"pool": "main", "plugin": plugin}
        assert m.value("lbproxy_routing_plugin_seconds_count", **labels) == 2
        assert 0 < m.value("lbproxy_routing_plugin_seconds_sum", **labels) < 1.0

    pool = proxy.state.pools.pools[0]
    (plugin,) = my_index_plugin[-1:]
    assert pool.router.forgetful == [plugin] and pool.router.index_stats == [plugin]
    pool.forget("be1")
    assert plugin.forgotten == ["be1"]


def test_plugins_do_not_import_each_other() -> None:
    """Shared helpers live in `routing/plugins/_*.py`; a plugin module imports no other."""
    import ast
    from pathlib import Path

    import lbproxy.routing.plugins as pkg

    offenders = []
    for path in Path(pkg.__file__).parent.glob("[!_]*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                head, _, last = name.rpartition(".")
                if head == "lbproxy.routing.plugins" and not last.startswith("_"):
                    offenders.append(f"{path.name} imports {name}")
    assert offenders == []
