"""Credentials out of what lbproxy shows: backend URLs and names in labels, logs, admin
output and config-derived names, and the Redis URL in log lines."""

from __future__ import annotations


def without_credentials(url: str) -> str:
    """`url` (or a `host[:port][/path]` made from one) without its `user:password@`; a
    `scheme://` prefix is kept.

    Everything up to the last "@" goes, not just a parsed netloc's userinfo: a password may
    hold "/", "?" or "#" unencoded, and a URL parser would then leave it in place. A rare
    "@" in a path loses the text before it, which beats showing a password.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" not in rest:
        return url
    return head + sep + rest.rpartition("@")[2]
