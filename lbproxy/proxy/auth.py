"""Client API keys and the admin token.

A client presents `Authorization: Bearer <key>`. The presented key is compared with every
configured key by `hmac.compare_digest`, always all of them, so neither the time taken
nor an early exit tells which key (or how much of one) matched. Keys and tokens are never
logged, echoed in an error, or used as a metrics label; a client is named in logs only
by the position of its key (`key #2`), which says nothing about the key itself.

With `max_concurrent_per_key`, each key may have that many requests in flight (streams
count until they end); one more is answered 429 with `Retry-After`. The counts are
shared with the Authenticator that replaces this one on a hot reload, so a reload
neither forgets requests in flight nor lets a key exceed its limit.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from multidict import CIMultiDictProxy

from lbproxy.config import Auth
from lbproxy.proxy.errors import TooManyConcurrent, Unauthorized


def bearer_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _match(presented: str, keys: list[bytes]) -> int:
    """Index of the key equal to `presented`, else -1; compares with every key."""
    p = presented.encode()
    found = -1
    for i, k in enumerate(keys):
        if hmac.compare_digest(p, k):
            found = i
    return found


def token_ok(request: web.Request, token: str) -> bool:
    presented = bearer_token(request.headers)
    return presented is not None and _match(presented, [token.encode()]) == 0


class Authenticator:
    """Checks client keys on /v1/* and counts each key's requests in flight."""

    __slots__ = ("_keys", "forward_client_key", "in_flight", "max_concurrent")

    def __init__(self, spec: Auth, previous: Authenticator | None = None) -> None:
        self._keys = [k.encode() for k in spec.all_keys()]
        self.forward_client_key = spec.forward_client_key
        self.max_concurrent = spec.max_concurrent_per_key
        # Requests in flight per key (the key's bytes); shared across reloads.
        self.in_flight: dict[bytes, int] = previous.in_flight if previous is not None else {}

    def check(self, request: web.Request) -> int:
        """The index of the request's key; raises Unauthorized (401) without a valid one."""
        presented = bearer_token(request.headers)
        if presented is None:
            raise Unauthorized(
                "You didn't provide an API key. Send it in an 'Authorization: Bearer <key>' header."
            )
        i = _match(presented, self._keys)
        if i < 0:
            raise Unauthorized("Incorrect API key provided.")
        return i

    def admit(self, request: web.Request) -> bytes | None:
        """Raise Unauthorized (401) or TooManyConcurrent (429), or admit the request.

        Returns the slot to pass to `release` once the request is over (None when
        concurrency is not limited).
        """
        i = self.check(request)
        if self.max_concurrent is None:
            return None
        key = self._keys[i]
        n = self.in_flight.get(key, 0)
        if n >= self.max_concurrent:
            raise TooManyConcurrent(
                "Too many concurrent requests for this API key: the limit is "
                f"{self.max_concurrent}. Retry when one of them has finished."
            )
        self.in_flight[key] = n + 1
        return key

    def release(self, slot: bytes | None) -> None:
        if slot is not None:
            n = self.in_flight[slot] - 1
            if n:
                self.in_flight[slot] = n
            else:
                del self.in_flight[slot]


def build_authenticator(spec: Auth, previous: Authenticator | None = None) -> Authenticator | None:
    """An Authenticator when keys are configured, else None (no check at all)."""
    return Authenticator(spec, previous) if spec.enabled() else None
