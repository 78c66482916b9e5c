"""Request ids: a client's id is kept only when it is safe to log and echo.

An id is opaque to lbproxy, but it is echoed in a response header, sent upstream and
written to logs, so only 1-128 visible ASCII characters are kept; anything else (bytes
that are not UTF-8, spaces, control characters, a very long value) is replaced by a
fresh id, never echoed.

A fresh id has uuid4().hex's form (32 lowercase hex digits, version 4, RFC 4122
variant) but costs no system call: 60 random bits drawn once per process (again in a
forked child) and a 62-bit counter. uuid4() read 16 bytes from the OS for every request.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid

MAX_REQUEST_ID_LENGTH = 128
_SAFE_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")

_VARIANT = 0x8000_0000_0000_0000  # RFC 4122's variant bits (10) at the top of the second half
_COUNTER_MASK = 0x3FFF_FFFF_FFFF_FFFF
_prefix = ""
_next = itertools.count().__next__


def _new_process() -> None:
    """A random first half (uuid4's, version nibble included) and a counter from 0."""
    global _prefix, _next
    _prefix = uuid.uuid4().hex[:16]
    _next = itertools.count().__next__


_new_process()
os.register_at_fork(after_in_child=_new_process)


def new_request_id() -> str:
    """A fresh id in uuid4().hex's form, unique within the process and across processes
    with overwhelming probability."""
    return f"{_prefix}{_VARIANT | (_next() & _COUNTER_MASK):016x}"


def client_request_id(value: str | None) -> str:
    """The client's id if it is 1-128 visible ASCII characters, else a new one."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return new_request_id()
