"""What went wrong with an upstream request, for retries, metrics and the log."""

from __future__ import annotations

import aiohttp

from lbproxy.proxy.upstream import UpstreamConnectError

__all__ = ["failure_cause"]


def failure_cause(e: BaseException) -> tuple[str, bool]:
    """(cause label, sent) for an exception from sending a request: `sent` when the backend
    may have received the request (and run it)."""
    if isinstance(
        e, UpstreamConnectError | aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
    ):
        return "connect_error", False  # refused, unresolvable, no TCP connection in time
    if isinstance(e, TimeoutError):
        return "timeout", True  # sent; no response head within first_byte
    if isinstance(e, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return "bad_response", True  # it answered something that is not HTTP
    return "reset_after_send", True  # closed or reset once the request was on its way
