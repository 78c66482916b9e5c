"""The structured access log: one JSON line per client request (opt-in).

Lines are serialised with orjson when a request ends and kept in memory; a background
task writes them every `flush_interval` seconds (and at once when `max_buffer` lines are
waiting), so the data path never waits on a file. A crash loses at most that interval.

A line holds what happened, never what was sent: no headers (so no Authorization or API
key), no prompt, no completion. Fields (null when not known):

    ts                 RFC 3339 UTC time the request ended
    request_id         the x-request-id kept from the client or minted
    route              the request path
    model, pool        from the body; the pool serving the model
    backend, vendor    the backend whose response was relayed (null: lbproxy answered)
    status             HTTP status sent to the client (499: the client left before the
                       backend answered)
    outcome            ok | client_disconnect | stream_disconnect | stream_timeout, or
                       lbproxy's error code (model_not_found, upstream_unreachable, ...)
    stream             the response was SSE
    ttft_s             arrival to the stream's first bytes (streams only)
    duration_s         arrival to the end of the response
    prompt_tokens, completion_tokens   from the response's usage, when it had one
    attempts, retries  backends tried; retries = attempts - 1
    failures           the cause of each failed attempt, in order: connect_error (not
                       sent) | timeout | reset_after_send | bad_response (sent: it may
                       have run) | status_5xx | status_429
    client             the peer address
    scores, totals     the routing decision: each scorer's score and the weighted total
                       per backend; reason: what the filters did (P/D pools: the
                       decode side's)
    pd                 P/D pools only (absent otherwise): mode (disaggregated | aggregated),
                       reason, prompt_tokens_est, uncached_tokens_est, prefill and decode
                       ({backend, scores, totals}: each side's ranking), and when split:
                       prefill_backend, decode_backend, prefill_s; fallback: true when
                       every split route failed and the request was served aggregated
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import orjson

from lbproxy.aio import PeriodicTask
from lbproxy.credentials import without_credentials

if TYPE_CHECKING:
    from lbproxy.proxy.request_metrics import Exchange
    from lbproxy.routing.state import Endpoint

log = logging.getLogger("lbproxy.access_log")

__all__ = ["AccessLog"]


def _per_backend(d: dict[str, float]) -> dict[str, float]:
    return {without_credentials(k): round(v, 6) for k, v in d.items()}


class AccessLog:
    """Buffered JSON-lines writer; `path` None writes to stderr."""

    def __init__(
        self, path: str | None = None, *, flush_interval: float = 1.0, max_buffer: int = 10_000
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._buf: list[bytes] = []
        self._out: IO[bytes] | None = None
        self._flusher = PeriodicTask("access-log-flush", self.flush, lambda: self.flush_interval)
        self.written = 0  # lines written, for tests and the curious

    # ---- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        if self._out is None:
            self._out = sys.stderr.buffer if self.path is None else open(self.path, "ab")  # noqa: SIM115

    async def start(self) -> None:
        self.open()
        self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()
        self.flush()
        out, self._out = self._out, None
        if out is not None and self.path is not None:
            out.close()

    def flush(self) -> None:
        if not self._buf:
            return
        lines, self._buf = self._buf, []
        if self._out is None:
            self.open()
        assert self._out is not None
        try:
            self._out.write(b"".join(lines))
            self._out.flush()
            self.written += len(lines)
        except OSError as e:  # a full disk must not take the proxy down
            log.warning("access log: cannot write %d lines: %s", len(lines), e)

    # ---- records -------------------------------------------------------------------------

    def record(self, ex: Exchange, ep: Endpoint | None, client: Any) -> None:
        d = ex.decision
        attempts = (len(ex.causes) if ex.causes else 0) + (ep is not None)
        rec = {
            "ts": datetime.now(UTC),
            "request_id": ex.request_id,
            "route": ex.path,
            "model": ex.model or None,
            "pool": ex.pool or None,
            "backend": without_credentials(ep.name) if ep is not None else None,
            "vendor": ep.vendor if ep is not None else None,
            "status": ex.status,
            "outcome": ex.ended,
            "stream": ex.stream,
            "ttft_s": round(ex.t_first - ex.t0, 6) if ex.stream and ex.t_first else None,
            "duration_s": round(ex.t_end - ex.t0, 6) if ex.t_end else None,
            "queue_wait_s": round(ex.queue_wait, 6) if ex.queue_wait is not None else None,
            "prompt_tokens": ex.prompt_tokens,
            "completion_tokens": ex.completion_tokens,
            "attempts": attempts,
            "retries": attempts - 1 if attempts else 0,
            "failures": ex.causes or [],
            "client": client,
            "scores": {k: _per_backend(v) for k, v in d.scores.items()} if d else None,
            "totals": _per_backend(d.totals) if d else None,
            "reason": d.reason if d else None,
        }
        if ex.pd is not None:  # a P/D pool's decision; other pools' lines stay as they were
            rec["pd"] = ex.pd
        self._buf.append(orjson.dumps(rec, option=orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE))
        if len(self._buf) >= self.max_buffer:
            self.flush()
