"""What a client sends that lbproxy must survive: raw bytes in headers, compressed bodies,
Expect: 100-continue, credentials it must not pass on, junk after a valid request."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import orjson
import pytest

from tests import raw_http
from tests.conftest import proxy_config

KEY = "client-key-123"
BODY = b'{"model": "fake-model", "prompt": "x", "max_tokens": 1}'
_HEX_ID = re.compile(r"[0-9a-f]{32}")


def _post(body: bytes, headers: list[tuple[bytes, bytes]], path: str = "/v1/completions"):
    head = [(b"Content-Type", b"application/json"), (b"Connection", b"close"), *headers]
    return raw_http.http_request("POST", path, head, body)


def _error_code(resp: raw_http.RawResponse) -> str:
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    return orjson.loads(resp.body)["error"]["code"]


BAD_IDS = [bytes(range(0x80, 0x100)), b"\xff\xfe", b"a b", b"x" * 129, b"\xc3\xa9t\xc3\xa9"]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=["all-high", "ff-fe", "space", "129", "utf8"])
def test_an_unsafe_request_id_is_replaced_not_echoed(fake_backends, run_proxy, bad_id) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], auth={"api_keys": [KEY]}))
    auth = (b"Authorization", b"Bearer " + KEY.encode())
    rid = (b"x-request-id", bad_id)
    cases = [
        (BODY, [rid, (b"Authorization", b"Bearer wrong")], 401),
        (b'{"model": "nope"}', [rid, auth], 404),
        (BODY, [rid, auth], 200),
    ]
    for body, headers, status in cases:
        (resp,) = raw_http.request(proxy.port, _post(body, headers))
        assert resp.status == status, resp
        assert _HEX_ID.fullmatch(resp.headers["x-request-id"]), resp.headers
    assert len(backend.received) == 1
    seen = {k.lower(): v for k, v in backend.received[0].headers.items()}
    assert _HEX_ID.fullmatch(seen["x-request-id"]), seen


def test_a_safe_request_id_is_kept(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    rid = b"req-" + b"A" * 124  # 128 visible characters
    (resp,) = raw_http.request(proxy.port, _post(BODY, [(b"x-request-id", rid)]))
    assert resp.status == 200
    assert resp.headers["x-request-id"] == rid.decode()
    seen = {k.lower(): v for k, v in backend.received[0].headers.items()}
    assert seen["x-request-id"] == rid.decode()


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_compressed_bodies_are_refused_with_415_never_inflated(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    gz = (b"Content-Encoding", b"gzip")
    # a real gzip body, a plain body labelled gzip, and a 1 MiB gzip bomb (about 1 GiB)
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9) * 16  # 16 members
    assert len(bomb) < 2 * 1024 * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, so that it measures this test alone
        before = _vm_kib("VmHWM")
    except OSError:
        before = None
    for body in (gzip.compress(BODY), BODY, bomb):
        (resp,) = raw_http.request(proxy.port, _post(body, [gz]))
        assert resp.status == 415, resp
        assert _error_code(resp) == "unsupported_content_encoding"
    if before is not None:
        assert _vm_kib("VmHWM") - before < 64 * 1024, "the bomb was inflated in memory"
    for enc in (b"br", b"deflate", b"identity, gzip"):
        (resp,) = raw_http.request(proxy.port, _post(BODY, [(b"Content-Encoding", enc)]))
        assert resp.status == 415, resp
    assert backend.received == []
    # identity is no encoding: forwarded, header and bytes as received
    (resp,) = raw_http.request(proxy.port, _post(BODY, [(b"Content-Encoding", b"identity")]))
    assert resp.status == 200
    assert backend.received[0].body == BODY


def _read_head(sock, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while b"\r\n\r\n" not in out:
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return out


def test_expect_100_continue_is_answered_after_the_key_check(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend], auth={"api_keys": [KEY]}))

    def head(key: str) -> bytes:
        return (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n"
        )

    with raw_http.connect(proxy.port) as s:  # a wrong key: 401 at once, no 100 Continue
        s.sendall(head("wrong"))
        answer = raw_http.read_all(s, 10)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b"100 Continue" not in answer
    with raw_http.connect(proxy.port) as s:  # the right key: 100 Continue, then the answer
        s.sendall(head(KEY))
        assert _read_head(s).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(BODY)
        (resp,) = raw_http.parse_responses(raw_http.read_all(s, 10))
    assert resp.status == 200
    assert len(backend.received) == 1
    # a body that its headers already rule out is refused before 100 Continue too
    with raw_http.connect(proxy.port) as s:
        s.sendall(head(KEY).replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n"))
        answer = raw_http.read_all(s, 10)
    assert answer.startswith(b"HTTP/1.1 415") and b"100 Continue" not in answer


@pytest.mark.parametrize("with_keys", [False, True])
def test_client_credentials_reaching_a_backend(fake_backends, run_proxy, with_keys) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend], auth={"api_keys": [KEY]}) if with_keys else None
    proxy = run_proxy(cfg or proxy_config([backend]))
    headers = [
        (b"Authorization", b"Bearer " + KEY.encode()),
        (b"Cookie", b"session=secret-cookie"),
        (b"x-api-key", b"secret-x-api-key"),
        (b"x-custom", b"kept"),
    ]
    (resp,) = raw_http.request(proxy.port, _post(BODY, headers))
    assert resp.status == 200
    seen = {k.lower(): v for k, v in backend.received[0].headers.items()}
    assert "cookie" not in seen and "x-api-key" not in seen
    assert seen["x-custom"] == "kept"
    # with no client keys lbproxy checks nothing: the key is the backend's business
    assert ("authorization" in seen) is (not with_keys)


@pytest.mark.parametrize("n", [1, 2])
def test_valid_requests_followed_by_junk_get_their_answers(fake_backends, run_proxy, n) -> None:
    (backend,) = fake_backends(1)
    proxy = run_proxy(proxy_config([backend]))
    valid = raw_http.http_request("POST", "/v1/completions", [], BODY)
    responses = raw_http.request(proxy.port, valid * n + b"\x01\x02 junk \xff\r\n\r\n")
    assert [r.status for r in responses] == [200] * n + [400]
    assert _error_code(responses[-1]) == "invalid_request"
    assert len(backend.received) == n
    # junk inside the first request's headers: only the 400, nothing reaches the backend
    responses = raw_http.request(proxy.port, valid[:40] + b"\x01junk\r\n\r\n" + valid)
    assert [r.status for r in responses] == [400]
    assert len(backend.received) == n
