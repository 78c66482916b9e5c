"""Which request heads the native server (native_server.py) serves itself.

Only heads whose request's end is known exactly, and whose every byte means the same to
aiohttp's parser: `POST /v1/<plain path> HTTP/1.1`, CRLF-only lines, header names that
are tokens, values without control characters, no header twice, exactly one
digits-only Content-Length, none of Transfer-Encoding, Expect, Content-Encoding,
Upgrade, and Connection only as `keep-alive`. A path with `%` (aiohttp decodes it), a
`/.` (dot segments are refused with 400 by the data path, on aiohttp's side) or any
character outside the plain set is left to aiohttp too. `parse_head` returns None for
anything else, and the connection is handed to aiohttp from that request's first byte.
"""

from __future__ import annotations

import re

HEAD_END = b"\r\n\r\n"
_PREFIX = b"POST /v1/"
# aiohttp's default limit on header fields (start_proxy does not change it).
MAX_HEADERS = 128

_REQUEST_LINE = re.compile(rb"POST (/v1/[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*) HTTP/1\.1\r\n")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Values: no control character but tab (aiohttp's rule), so never CR or LF.
_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":" + _VALUE + rb"\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb"?)[ \t]*\r\n")
_NOT_NATIVE = frozenset({"transfer-encoding", "expect", "content-encoding", "upgrade"})


def plausible_head_start(buf: bytes) -> bool:
    """Whether an incomplete head may still become one `parse_head` accepts (else the
    connection goes to aiohttp at once, without waiting for more)."""
    n = min(len(buf), len(_PREFIX))
    if buf[:n] != _PREFIX[:n]:
        return False
    crlf = buf.count(b"\r\n")
    if buf.count(b"\n") != crlf:
        return False
    cr = buf.count(b"\r")
    return cr == crlf or (cr == crlf + 1 and buf.endswith(b"\r"))


def parse_head(buf: bytes, end: int) -> tuple[str, list[tuple[str, str]], int] | None:
    """(target, headers, content length) of the head `buf[:end]` (its last line's CRLF
    included, the blank line not), or None if it is not one the native server serves."""
    m = _REQUEST_LINE.match(buf, 0, end)
    if m is None:
        return None
    target = m.group(1)
    if b"/." in target:
        return None
    pos = m.end()
    if _FIELDS.fullmatch(buf, pos, end) is None:
        return None
    fields = _FIELD.findall(buf, pos, end)
    if len(fields) > MAX_HEADERS:
        return None
    length = -1
    seen: set[str] = set()
    headers: list[tuple[str, str]] = []
    for bname, bvalue in fields:
        name = bname.decode("ascii")
        low = name.lower()
        if low in seen or low in _NOT_NATIVE:
            return None
        seen.add(low)
        value = bvalue.decode("utf-8", "surrogateescape")
        if low == "content-length":
            if not bvalue.isdigit():
                return None
            length = int(bvalue)
        elif low == "connection" and value.lower() != "keep-alive":
            return None
        headers.append((name, value))
    if length < 0:
        return None
    return target.decode("ascii"), headers, length
