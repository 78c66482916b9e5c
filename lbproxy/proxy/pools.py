"""Runtime pools: the endpoints and router of each configured pool, and model lookup.

A hot reload builds a new PoolTable from the new config with `previous=` the running one.
A backend that stays (same pool, name and url) keeps its Endpoint object, so its in-flight
count, metrics, health and drain state carry over; a pool whose routing (profile,
tokenizer, model) is unchanged keeps its Router and BuildContext, so its prefix indexes
carry over. A rebuilt pool takes the routing that config validation built
(`Pool.take_build`, see lbproxy/pool_build.py) rather than building it a second time.

Building reads nothing of the running table that requests change, so it runs off the
event loop (lbproxy/proxy/runtime.py). What must see the live table at the moment of the
swap happens in `commit()`, which the caller runs on the loop just before it swaps the
table in, with no await between the two: the kept endpoints take their new settings
(weight, labels), the kept flow gates (with their waiting requests) follow the new pools,
discovered models are carried over, removed backends are forgotten by the kept indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lbproxy.config import Backend, Config, Pool
from lbproxy.flow.controller import thresholds_for
from lbproxy.pool_build import build_pool, routing_key
from lbproxy.proxy.errors import NoBackend
from lbproxy.proxy.flow_gate import FlowGate
from lbproxy.routing.disagg import DisaggRouter
from lbproxy.routing.pipeline import Router
from lbproxy.routing.state import Endpoint

if TYPE_CHECKING:
    from lbproxy.tokenization.token_cache import PromptTokenizer


class PoolRuntime:
    __slots__ = (
        "_flow_settings",
        "_pending",
        "_previous",
        "bctx",
        "configured_models",
        "disagg",
        "discovered_models",
        "endpoints",
        "gate",
        "name",
        "router",
        "router_kept",
        "routing_tokenizer",
        "serving",
        "spec",
        "tokenize",
        "upstream_auth",
    )

    def __init__(
        self,
        spec: Pool,
        *,
        metrics_max_age: float = 2.0,
        seed: int | None = None,
        previous: PoolRuntime | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.configured_models: list[str] | None = spec.models
        self.discovered_models: dict[str, set[str]] = {}  # backend name -> its models
        self._previous = previous
        old = {(ep.name, ep.url): ep for ep in previous.endpoints} if previous else {}
        self._pending: list[tuple[Endpoint, Backend]] = []  # kept endpoints, new settings
        self.endpoints = []
        for b in spec.backends:
            name = b.name or b.url
            ep = old.get((name, b.url))
            if ep is None:
                ep = Endpoint(
                    name=name,
                    url=b.url,
                    vendor=b.vendor,
                    labels=dict(b.labels),
                    weight=b.weight,
                    pool=spec.name,
                    role=b.role,
                )
            else:
                self._pending.append((ep, b))  # its discovered models: see commit
            self.endpoints.append(ep)
        # What aggregated requests are routed over: all but prefill-only backends.
        roles = [b.role for b in spec.backends]
        self.serving: list[Endpoint] = (
            [ep for ep, r in zip(self.endpoints, roles, strict=True) if r != "prefill"]
            if "prefill" in roles
            else self.endpoints
        )
        # `Authorization` values sent to the backends that have their own upstream key.
        self.upstream_auth: dict[Endpoint, str] = {
            ep: f"Bearer {b.api_key.get_secret_value()}"
            for ep, b in zip(self.endpoints, spec.backends, strict=True)
            if b.api_key is not None
        }
        self.router_kept = previous is not None and routing_key(
            previous.spec, previous.bctx.metrics_max_age
        ) == routing_key(spec, metrics_max_age)
        # Flow control: a kept pool keeps its gate (who waits, learnt limits); `commit`
        # points it at this runtime.
        self._flow_settings = spec.flow()
        self.gate: FlowGate | None = previous.gate if previous is not None else None
        if previous is not None and self.router_kept:
            self.bctx = previous.bctx
            self.tokenize: PromptTokenizer | None = previous.tokenize
            self.routing_tokenizer: PromptTokenizer | None = previous.routing_tokenizer
            self.router: Router = previous.router
            self.disagg: DisaggRouter | None = previous.disagg
            spec.take_build(metrics_max_age)  # validation's own build: not needed, let go
            return
        built = spec.take_build(metrics_max_age) or build_pool(spec, metrics_max_age)
        self.bctx = built.bctx
        self.tokenize = built.tokenize
        self.routing_tokenizer = built.routing_tokenizer  # cached across requests
        self.router = built.router
        self.disagg = built.disagg
        if seed is not None:  # tests: reproducible tie-breaks
            for router in self.routers():
                router.rng.seed(seed)
        if previous is None:
            self._commit_flow()

    def commit(self) -> dict[str, Any]:
        """Apply the new settings to kept endpoints and forget the backends that left;
        returns what changed."""
        prev = self._previous
        if prev is not None:  # a fresh pool's gate was made with it
            self._commit_flow()
        changed = []
        for ep, b in self._pending:
            before = (ep.weight, ep.vendor, ep.labels, ep.role)
            ep.weight, ep.vendor, ep.labels, ep.role = b.weight, b.vendor, dict(b.labels), b.role
            if (ep.weight, ep.vendor, ep.labels, ep.role) != before:
                changed.append(ep.name)
            if prev is not None and ep.name in prev.discovered_models:
                self.discovered_models[ep.name] = prev.discovered_models[ep.name]
        self._previous, self._pending = None, []
        kept = {id(ep) for ep in self.endpoints}
        gone = [] if prev is None else [ep for ep in prev.endpoints if id(ep) not in kept]
        if self.router_kept:
            for ep in gone:  # what the indexes learnt about them no longer holds
                self.forget(ep.name)
        new = [ep for ep in self.endpoints if prev is None or ep not in prev.endpoints]
        return {
            "added": [ep.name for ep in new],
            "removed": [ep.name for ep in gone],
            "changed": changed,
            "router": "kept" if self.router_kept else "rebuilt",
        }

    def _commit_flow(self) -> None:
        flow = self._flow_settings
        thresholds = thresholds_for(self.router, self.bctx.metrics_max_age)
        if not flow.enabled:
            if self.gate is not None:  # switched off: whoever waits goes now
                self.gate.pool = self
                self.gate.flush()
                self.gate = None
        elif self.gate is None:
            self.gate = FlowGate(self, flow, thresholds)
        else:
            self.gate.configure(self, flow, thresholds)

    def routers(self) -> list[Router]:
        """The pool's router, then its P/D prefill and decode routers if it splits."""
        if self.disagg is None:
            return [self.router]
        return [self.router, self.disagg.prefill, self.disagg.decode]

    def forget(self, backend_name: str) -> None:
        """Drop what this pool's learning plugins (prefix indexes) hold for a backend."""
        for router in self.routers():
            for plugin in router.forgetful:
                plugin.forget(backend_name)

    def models(self) -> set[str]:
        if self.configured_models is not None:
            return set(self.configured_models)
        out: set[str] = set()
        for ms in self.discovered_models.values():
            out |= ms
        return out


class PoolTable:
    """Maps a request's `model` to its pool; rebuilt when discovery learns new models."""

    def __init__(
        self, cfg: Config, *, seed: int | None = None, previous: PoolTable | None = None
    ) -> None:
        age = cfg.signals.metrics_max_age
        old = {p.name: p for p in previous.pools} if previous is not None else {}
        self.pools = [
            PoolRuntime(p, metrics_max_age=age, seed=seed, previous=old.get(p.name))
            for p in cfg.pools
        ]
        names = {p.name for p in self.pools}
        self.removed_pools = [p for name, p in old.items() if name not in names]
        self._by_model: dict[str, PoolRuntime] = {}
        self.rebuild()

    def commit(self) -> dict[str, Any]:
        """See the module docstring; returns what changed, per pool."""
        out: dict[str, Any] = {p.name: p.commit() for p in self.pools}
        for p in self.removed_pools:
            out[p.name] = {"removed_pool": True, "removed": [ep.name for ep in p.endpoints]}
            if p.gate is not None:  # nobody serves its model any more
                p.gate.flush(NoBackend(f"pool '{p.name}' was removed by a reload"))
        self.removed_pools = []
        self.rebuild()  # with the discovered models carried over
        return out

    def rebuild(self) -> None:
        by_model: dict[str, PoolRuntime] = {}
        for pool in self.pools:  # configured pools first win a model served twice
            for m in pool.models():
                by_model.setdefault(m, pool)
        self._by_model = by_model

    def gate_of(self, ep: Endpoint) -> FlowGate | None:
        """The flow gate of the pool `ep` belongs to (None: flow control off)."""
        for pool in self.pools:
            if pool.name == ep.pool:
                return pool.gate
        return None

    def for_model(self, model: str) -> PoolRuntime | None:
        return self._by_model.get(model)

    def served_models(self) -> list[str]:
        return sorted(self._by_model)

    def endpoints(self) -> Iterator[Endpoint]:
        for pool in self.pools:
            yield from pool.endpoints
