"""The body reaches the backend byte-for-byte; headers cross as a proxy should."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")

BODIES = [
    # unknown nested fields and non-ASCII text, in an unusual key order and spacing
    b'{"model":"fake-model","messages":[{"role":"user","content":"h\xc3\xa9llo \xe4\xb8\x96\xe7'
    b'\x95\x8c \xf0\x9f\x9a\x80"}],"kv_transfer_params":{"do_remote_decode":true,'
    b'"remote_block_ids":null,"x":[1,2.50,{"y":"z"}]},"chat_template_kwargs":'
    b'{"enable_thinking":false},"ignore_eos":true,"max_tokens":2}',
    json.dumps(
        {
            "max_tokens": 3,
            "model": "fake-model",
            "prompt": "caf\u00e9 " * 500,
            "extra": {"deep": {"deeper": [None, True, 1e-7]}},
        },
        ensure_ascii=True,
        indent=2,
    ).encode(),
    b'  {"model": "fake-model", "prompt": "\\u00e9\\ud83d\\ude80", "max_tokens": 1}  \n',
]


@pytest.mark.parametrize("body", BODIES)
def test_body_is_forwarded_byte_for_byte(fake_backends, run_proxy, body: bytes) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    route = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    r = httpx.post(
        proxy.url + route, content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert backend.received[-1].digest == hashlib.sha256(body).hexdigest()
    assert backend.received[-1].path == route


def test_request_id_kept_or_minted_and_hop_by_hop_dropped(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    body = b'{"model": "fake-model", "prompt": "x", "max_tokens": 1}'
    r = httpx.post(
        proxy.url + "/v1/completions?foo=bar",
        content=body,
        headers={
            "x-request-id": "abc-123",
            "x-custom": "kept",
            "keep-alive": "timeout=5",
            "connection": "keep-alive, x-conn-only",
            "x-conn-only": "dropped",
            "content-type": "application/json",
        },
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    assert r.headers["x-served-by"] == "b0"  # backend response headers are relayed
    got = {k.lower(): v for k, v in backend.received[-1].headers.items()}
    assert got["x-request-id"] == "abc-123"
    assert got["x-custom"] == "kept"
    assert got["content-type"] == "application/json"
    assert "keep-alive" not in got and "x-conn-only" not in got

    r2 = httpx.post(proxy.url + "/v1/completions", content=body)
    minted = r2.headers["x-request-id"]
    assert uuid.UUID(minted)
    got2 = {k.lower(): v for k, v in backend.received[-1].headers.items()}
    assert got2["x-request-id"] == minted
    assert "content-type" not in got2  # nothing the client did not send is invented


def test_other_v1_posts_pass_through(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    for route in ("/v1/responses", "/v1/audio/anything"):
        r = httpx.post(proxy.url + route, json={"model": "fake-model", "input": "x"})
        assert r.status_code == 200
        assert backend.received[-1].path == route
