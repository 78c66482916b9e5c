"""Fresh request ids: uuid4().hex's form, distinct, and distinct in a forked child."""

from __future__ import annotations

import os
import re
import uuid

from lbproxy.proxy.request_id import client_request_id, new_request_id

_UUID4_HEX = re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")


def test_fresh_ids_have_uuid4_hex_form_and_are_distinct() -> None:
    ids = [client_request_id(None) for _ in range(1000)]
    assert len(set(ids)) == 1000
    for i in ids[:50]:
        assert _UUID4_HEX.fullmatch(i), i
        u = uuid.UUID(i)
        assert u.version == 4 and u.variant == uuid.RFC_4122


def test_unsafe_client_ids_are_replaced_safe_ones_kept() -> None:
    assert client_request_id("abc-123") == "abc-123"
    for bad in ("", "a b", "x" * 129, "caf\u00e9", "a\r\nb"):
        assert _UUID4_HEX.fullmatch(client_request_id(bad))


def test_a_forked_child_mints_other_ids() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids and leave at once
        os.write(w, ",".join(new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 4096).decode().split(",")
    os.close(r)
    os.waitpid(pid, 0)
    mine = [new_request_id() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(mine)
    assert child[0][:16] != mine[0][:16]  # a new random half, not the parent's counter
