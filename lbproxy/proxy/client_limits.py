"""Limits on what clients may hold: connections, time, buffered body bytes.

Set from `limits:` in the config (see `Limits` in lbproxy/config.py); enforced by
`ProxyRunner` (lifecycle.py) for connections and headers, by `client_body` for bodies.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

from lbproxy.config import Limits

# File descriptors kept for what is not a client connection: listeners, backends'
# health/metrics/KV connections, log files.
_RESERVED_FDS = 64


def default_max_connections() -> int:
    """Client connections the process's RLIMIT_NOFILE allows while leaving one descriptor
    per client for its upstream connection, and some for everything else."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - _RESERVED_FDS) // 2)


class BodyBudget:
    """Bytes of request bodies held at once, across all requests."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def room_for(self, n: int) -> bool:
        return self.used + n <= self.limit

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


@dataclass(slots=True)
class ClientLimits:
    header_timeout: float = 15.0  # connection open (or first byte) -> complete headers
    body_timeout: float = 30.0  # longest gap between two pieces of a body
    body_min_rate: int = 16 * 1024  # bytes/s a body must average (0: no minimum)
    keepalive_timeout: float = 75.0  # idle connection between requests
    max_connections: int = field(default_factory=default_max_connections)
    budget: BodyBudget = field(default_factory=lambda: BodyBudget(256 * 1024 * 1024))

    @classmethod
    def from_config(cls, limits: Limits) -> ClientLimits:
        return cls(
            header_timeout=limits.client_header_timeout,
            body_timeout=limits.client_body_timeout,
            body_min_rate=limits.client_body_min_rate,
            keepalive_timeout=limits.client_keepalive_timeout,
            max_connections=limits.max_client_connections or default_max_connections(),
            budget=BodyBudget(limits.max_buffered_body_bytes),
        )
