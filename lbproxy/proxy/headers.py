"""Which headers cross the proxy.

Hop-by-hop headers (RFC 9110 section 7.6.1) and any header the Connection header names
belong to one connection and are dropped; Host and Content-Length are recomputed by the
client library for the upstream leg.

Client credentials never reach a backend, except one case: `Cookie` and `x-api-key`
are always dropped; `Authorization` is forwarded only when lbproxy checks no client keys
(no `auth.api_keys`) or `auth.forward_client_key` is true, and a backend with its own
`api_key` always gets that key instead (see Forwarder._handle).

Other header values go on as the client sent them, bytes that are not UTF-8 included.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "cookie", "x-api-key"}
_NOT_RELAYED_DOWN = HOP_BY_HOP | {"content-length", "date", "server"}


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def upstream_headers(
    incoming: CIMultiDictProxy[str], request_id_header: str, request_id: str
) -> CIMultiDict[str]:
    drop = (
        _NOT_FORWARDED_UP | _connection_named(incoming)
        if "connection" in incoming
        else (_NOT_FORWARDED_UP)
    )
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():
        if k.lower() not in drop:
            out.add(k, v)
    out[request_id_header] = request_id
    return out


def downstream_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The headers of a backend's response (as parsed, lbproxy/proxy/upstream.py) that go
    on to the client; values decoded as aiohttp decodes a request's (bytes that are not
    UTF-8 kept)."""
    drop = _NOT_RELAYED_DOWN
    for k, v in raw:
        if k.lower() == b"connection":
            named = {t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip()}
            drop = drop | named
    out = []
    for k, v in raw:
        name = k.decode("latin-1")
        if name.lower() not in drop:
            out.append((name, v.decode("utf-8", "surrogateescape")))
    return out
