"""The waiting room of one pool: priority bands, fairness between flows, FCFS in a flow.

Higher priority is served first. Within a band, flows (tenants: an API key or a header's
value) take turns, one request each, in the order they first queued; within a flow,
first come first served. Every operation is O(1) but `remove` of a request from the middle
of its flow (O(length of that flow)) and the band bookkeeping (O(number of bands)).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

QUEUED, DISPATCHED, SHED, CANCELLED = range(4)


@dataclass(slots=True, eq=False)
class Waiter:
    """A request held by flow control. `payload` is the driver's (the proxy's future and
    request context, the simulator's request)."""

    priority: int
    flow: str
    arrival: float
    deadline: float
    payload: Any = None
    tokens: int = 0  # estimated prompt tokens (the KV blocks it will take at once)
    max_tokens: int = 0  # output tokens it asks for at most (0: not said)
    state: int = QUEUED
    shed_reason: str = ""
    dispatched_at: float | None = None
    # When it was first held for its cached backend while another had room: the affinity
    # wait counts from here, not from arrival (under a steady backlog everyone reaching the
    # front has already waited, which must not cancel affinity for all).
    held_since: float | None = None
    # A P/D split request: the decision it is dispatched by is its prefill side's.
    pair: bool = False


@dataclass(slots=True)
class _Band:
    flows: dict[str, deque[Waiter]] = field(default_factory=dict)  # in turn order
    size: int = 0


class FlowQueue:
    __slots__ = ("_bands", "_order", "size")

    def __init__(self) -> None:
        self._bands: dict[int, _Band] = {}
        self._order: list[int] = []  # priorities present, ascending
        self.size = 0

    def push(self, w: Waiter) -> None:
        band = self._bands.get(w.priority)
        if band is None:
            band = self._bands[w.priority] = _Band()
            bisect.insort(self._order, w.priority)
        flow = band.flows.get(w.flow)
        if flow is None:
            flow = band.flows[w.flow] = deque()
        flow.append(w)
        band.size += 1
        self.size += 1

    def pop(self) -> Waiter | None:
        """The next request to serve: highest band, the flow whose turn it is, its oldest."""
        if not self.size:
            return None
        prio = self._order[-1]
        band = self._bands[prio]
        name, flow = next(iter(band.flows.items()))
        w = flow.popleft()
        del band.flows[name]
        if flow:
            band.flows[name] = flow  # to the end of the turn order
        self._shrink(prio, band)
        return w

    def remove(self, w: Waiter, *, rotate: bool = False) -> bool:
        """Take a queued request out (dispatched out of turn, expired, evicted, or its
        client left); `rotate`: its flow has had its turn (dispatched)."""
        band = self._bands.get(w.priority)
        flow = band.flows.get(w.flow) if band is not None else None
        if flow is None or band is None:
            return False
        if flow and flow[0] is w:
            flow.popleft()
        else:
            try:
                flow.remove(w)
            except ValueError:
                return False
        if not flow:
            del band.flows[w.flow]
        elif rotate:
            del band.flows[w.flow]
            band.flows[w.flow] = flow
        self._shrink(w.priority, band)
        return True

    def scan(self, limit: int) -> Iterator[Waiter]:
        """Up to `limit` queued requests in the order they would be served: the highest
        band first; in a band, each flow's first request in turn order, then each flow's
        second, and so on. (Stop iterating before changing the queue.)"""
        n = 0
        for prio in reversed(self._order):
            flows = list(self._bands[prio].flows.values())
            depth = 0
            while flows and n < limit:
                for q in flows:
                    if depth < len(q):
                        yield q[depth]
                        n += 1
                        if n >= limit:
                            return
                depth += 1
                flows = [q for q in flows if depth < len(q)]
            if n >= limit:
                return

    def _shrink(self, prio: int, band: _Band) -> None:
        band.size -= 1
        self.size -= 1
        if not band.size:
            del self._bands[prio]
            self._order.remove(prio)

    def ahead_of(self, priority: int, flow: str) -> int:
        """How many queued requests a new request of (priority, flow) would wait behind:
        every one of a higher band, and in its own band its own flow's plus, from each other
        flow, as many as get a turn before it (turns alternate, one request per flow)."""
        ahead = 0
        for p in reversed(self._order):
            if p > priority:
                ahead += self._bands[p].size
                continue
            if p == priority:
                flows = self._bands[p].flows
                mine = len(flows.get(flow, ()))
                ahead += mine + sum(
                    min(len(q), mine + 1) for name, q in flows.items() if name != flow
                )
            break
        return ahead

    def victim_for(self, priority: int, flow: str) -> Waiter | None:
        """When the queue is full: the request to shed so that a new one of (priority, flow)
        can wait, or None if the new one is the one to refuse. The victim is the newest
        request of the longest flow in the lowest band, if that band is below the new
        request's, or is its own and that flow is longer than the new request's would be."""
        if not self.size:
            return None
        low = self._order[0]
        if low > priority:
            return None
        flows = self._bands[low].flows
        name, longest = max(flows.items(), key=lambda kv: len(kv[1]))
        if low == priority and (name == flow or len(longest) <= len(flows.get(flow, ())) + 1):
            return None
        return longest[-1]

    def outranks(self, w: Waiter) -> bool:
        """Whether queued `w` is of a higher band than the lowest one waiting, or of a flow
        with fewer waiting than the longest flow of its band."""
        if w.priority > self._order[0]:
            return True
        flows = self._bands[w.priority].flows
        if len(flows) < 2:
            return False
        mine = len(flows.get(w.flow, ()))
        return any(len(q) > mine for q in flows.values())

    def lengths(self) -> dict[int, int]:
        """Queued requests by priority."""
        return {p: b.size for p, b in self._bands.items()}
