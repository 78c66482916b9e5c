"""OpenAI-shaped errors that lbproxy itself returns.

Upstream trouble is classified once, here, into the status a client should see:

    ProxyError                     (status, code)
    ├── BadRequest                 400  invalid_request
    ├── Unauthorized               401  invalid_api_key        (client key or admin token)
    ├── AdminDisabled              403  admin_disabled         (no admin.token configured)
    ├── ModelNotFound              404  model_not_found
    ├── BackendNotFound            404  backend_not_found      (admin: drain/undrain)
    ├── AmbiguousBackend           409  ambiguous_backend      (admin: name in several pools)
    ├── NoConfigFile               409  no_config_file         (admin: reload without a file)
    ├── RequestTimeout             408  request_timeout        (body bytes stopped coming)
    ├── BodyTooLarge               413  request_too_large
    ├── UnsupportedContentEncoding 415  unsupported_content_encoding
    ├── ExpectationFailed          417  expectation_failed     (an Expect other than 100-continue)
    ├── TooManyConcurrent          429  concurrency_limit_exceeded  (per client key)
    ├── NoBackend                  503  no_backend_available
    ├── BodyBufferFull             503  body_buffer_full       (limits.max_buffered_body_bytes)
    ├── UpstreamUnreachable        502  upstream_unreachable   (connect refused / reset)
    └── UpstreamTimeout            504  upstream_timeout       (connect or first byte)
"""

from __future__ import annotations

import orjson
from aiohttp import web


class ProxyError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"
    # True when the request's body may be left unread: the connection is then closed
    # after the answer rather than kept for a next request.
    close_connection = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        resp = web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=extra_headers,
        )
        if self.close_connection:
            resp.force_close()
        return resp


class BadRequest(ProxyError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class AdminDisabled(ProxyError):
    status, type, code = 403, "permission_error", "admin_disabled"


class BackendNotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "backend_not_found"


class AmbiguousBackend(ProxyError):
    status, type, code = 409, "invalid_request_error", "ambiguous_backend"


class NoConfigFile(ProxyError):
    status, type, code = 409, "invalid_request_error", "no_config_file"


class BodyTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"
    close_connection = True


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"
    close_connection = True


class UnsupportedContentEncoding(ProxyError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"
    close_connection = True


class ExpectationFailed(ProxyError):
    status, type, code = 417, "invalid_request_error", "expectation_failed"
    close_connection = True


class BodyBufferFull(ProxyError):
    status, type, code = 503, "service_unavailable", "body_buffer_full"
    close_connection = True

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        return super().response({**(extra_headers or {}), "Retry-After": "1"})


class Unauthorized(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        return super().response({**(extra_headers or {}), "WWW-Authenticate": "Bearer"})


class TooManyConcurrent(ProxyError):
    status, type, code = 429, "rate_limit_error", "concurrency_limit_exceeded"

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        return super().response({**(extra_headers or {}), "Retry-After": "1"})


class NoBackend(ProxyError):
    status, type, code = 503, "service_unavailable", "no_backend_available"


class UpstreamUnreachable(ProxyError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


def error_body(message: str, type_: str, code: str | int, param: str | None = None) -> bytes:
    try:
        return orjson.dumps(
            {"error": {"message": message, "type": type_, "param": param, "code": code}}
        )
    except TypeError:  # a message quoting client bytes that are not UTF-8 (surrogates)
        message = message.encode("utf-8", "backslashreplace").decode()
        return orjson.dumps(
            {"error": {"message": message, "type": type_, "param": param, "code": code}}
        )


def sse_error_event(message: str, code: str) -> bytes:
    """The event that ends a stream the proxy could not finish, then the terminator."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\ndata: [DONE]\n\n"
