"""One runtime snapshot: what the request path reads, swapped in one assignment.

A `Runtime` holds the config and everything built from it that requests read: the pool
table (endpoints, routers, tokenizers, prefix indexes, flow gates), the forwarding
settings and the client-key authenticator. `ProxyState.runtime` is its only reference;
handlers read it once at the start of a request and use that snapshot to the end, so a
request in flight across a reload finishes on the runtime it started with and the next
one sees the new runtime whole.

Startup and reload make it the same way: `build_runtime` (in a thread: tokenizers,
routers) then, on the loop, `swap_in` (carry over what is live, one assignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from lbproxy.config import Config
from lbproxy.proxy.auth import Authenticator, build_authenticator
from lbproxy.proxy.forward import ForwardSettings
from lbproxy.proxy.pools import PoolTable


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    pools: PoolTable
    settings: ForwardSettings
    auth: Authenticator | None  # client keys; None: /v1/* is open


class HasRuntime(Protocol):
    runtime: Runtime


def build_runtime(
    cfg: Config, *, seed: int | None = None, previous: Runtime | None = None
) -> Runtime:
    """The runtime for `cfg`, keeping what `previous` built that still applies (see
    `pools`). Touches nothing the running proxy uses: call it off the event loop."""
    table = PoolTable(cfg, seed=seed, previous=previous.pools if previous is not None else None)
    # The per-key in-flight counts are carried over by `swap_in`, on the loop.
    return Runtime(cfg, table, ForwardSettings.from_config(cfg), build_authenticator(cfg.auth))


def carry_over(old: Runtime | None, new: Runtime) -> dict[str, Any]:
    """What must see the live runtime at the moment of the swap: run it on the event loop
    right before the assignment, with no await in between. Returns what changed, per pool."""
    changes = new.pools.commit()  # kept endpoints' settings, flow gates with their waiters
    if old is not None and old.auth is not None and new.auth is not None:
        new.auth.in_flight = old.auth.in_flight  # per-key counts of requests in flight
    return changes


def swap_in(state: HasRuntime, new: Runtime) -> dict[str, Any]:
    """Make `new` the running runtime: carry over what is live, then one assignment."""
    changes = carry_over(state.runtime, new)
    state.runtime = new
    return changes
