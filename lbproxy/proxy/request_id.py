"""Request ids: a client's id is kept only when it is safe to log and echo.

An id is opaque to lbproxy, but it is echoed in a response header, sent upstream and
written to logs, so only 1-128 visible ASCII characters are kept; anything else (bytes
that are not UTF-8, spaces, control characters, a very long value) is replaced by a
fresh id, never echoed.
"""

from __future__ import annotations

import re
import uuid

MAX_REQUEST_ID_LENGTH = 128
_SAFE_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def client_request_id(value: str | None) -> str:
    """The client's id if it is 1-128 visible ASCII characters, else a new one."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex
