"""session-affinity scorer: 1 for the endpoint the request's session was last routed to
(while it is a candidate), 0 for the others.

The proxy sets `ctx.session_key` from a configurable header (default `x-session-id`).
Sessions are learnt in `on_routed` and kept in an LRU of `max_sessions` entries. A session
follows the endpoint it was last sent to: with a weight that dominates, that is the first
one as long as it stays a candidate; after a failover the new endpoint holds the newest,
longest context, so staying there is what prefix caching wants.
"""

from __future__ import annotations

from collections import OrderedDict

from pydantic import BaseModel, ConfigDict, Field

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.state import Endpoint, RequestContext

TYPE = "session-affinity"
KIND = "scorer"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_sessions: int = Field(100_000, ge=1)


class SessionAffinityScorer:
    name = TYPE

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx: RequestContext, endpoints: list[Endpoint], now: float) -> list[float]:
        key = ctx.session_key
        target = None if key is None else self._sessions.get(key)
        if target is None:
            return [0.0] * len(endpoints)
        return [1.0 if ep.name == target else 0.0 for ep in endpoints]

    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        key = ctx.session_key
        if key is None:
            return
        sessions = self._sessions
        sessions[key] = endpoint.name
        sessions.move_to_end(key)
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)

    def endpoint_of(self, session_key: str) -> str | None:
        return self._sessions.get(session_key)

    def __len__(self) -> int:
        return len(self._sessions)


def build(params: Params, bctx: BuildContext) -> SessionAffinityScorer:
    return SessionAffinityScorer(params.max_sessions)
