"""The P/D side channel of a simulated producer, and the consumer's calls to it.

vLLM's NixlConnector handshakes over a side channel (VLLM_NIXL_SIDE_CHANNEL_HOST/PORT) and then
reads the blocks with NIXL. Here one small HTTP listener per producer stands for both:

- ``POST /pull`` ``{"engine_id", "request_id", "block_ids"}``: the producer checks the pull
  against its HoldLedger (unknown engine id, unknown / pulled / timed-out request id, other
  block ids -> 409 ``{"error": ...}``) and answers ``{"num_tokens", "num_blocks", "vendor"}``;
  the blocks are then "being read" until
- ``POST /release`` ``{"request_id", "done"}``: done -> the producer frees the blocks (vLLM
  frees them on the consumer's read notification); not done (the read failed) -> they stay
  held until pulled again or timed out.

The bytes themselves never move: the consumer's engine pays the transfer time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from lbproxy.sim.kv_transfer import HoldLedger, PullError

__all__ = ["PULL_TIMEOUT_S", "PullFailed", "SideChannelServer", "pull", "release"]

log = logging.getLogger(__name__)

# A dead producer makes real vLLM 0.32 fail the decode request after about 5 s
# (shared/tools/real-vllm-pd/README.md: "D answers HTTP 500 after about 5 s").
PULL_TIMEOUT_S = 5.0
_JSON = "application/json"


class PullFailed(Exception):
    """The consumer could not pull the blocks (refused, unreachable or timed out)."""


class SideChannelServer:
    """A producer's side-channel listener over its HoldLedger."""

    def __init__(
        self,
        ledger: HoldLedger,
        vendor: str,
        now: Callable[[], float],
        release: Callable[[str], None],
        abort_pull: Callable[[str], None],
    ) -> None:
        self.ledger = ledger
        self.vendor = vendor
        self._now = now
        self._release = release
        self._abort_pull = abort_pull
        self.port = 0
        app = web.Application()
        app.router.add_post("/pull", self._pull)
        app.router.add_post("/release", self._release_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the bound port."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _pull(self, request: web.Request) -> web.Response:
        body = await _json(request)
        try:
            entry = self.ledger.begin_pull(
                body.get("engine_id"), body.get("request_id"), body.get("block_ids"), self._now()
            )
        except PullError as exc:
            return _answer({"error": str(exc)}, 409)
        return _answer(
            {
                "num_tokens": entry.num_tokens,
                "num_blocks": len(entry.block_ids),
                "vendor": self.vendor,
            }
        )

    async def _release_handler(self, request: web.Request) -> web.Response:
        body = await _json(request)
        rid = body.get("request_id")
        if isinstance(rid, str):
            (self._release if body.get("done") else self._abort_pull)(rid)
        return _answer({})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _answer(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}{path}"


async def pull(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    engine_id: Any,
    request_id: Any,
    block_ids: Any,
    timeout: float = PULL_TIMEOUT_S,
) -> dict[str, Any]:
    """Ask the producer for the blocks; PullFailed says why not."""
    payload = {"engine_id": engine_id, "request_id": request_id, "block_ids": block_ids}
    try:
        async with session.post(
            _url(host, port, "/pull"),
            data=orjson.dumps(payload),
            headers={"Content-Type": _JSON},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                answer = None
            if resp.status != 200 or not isinstance(answer, dict):
                reason = answer.get("error") if isinstance(answer, dict) else None
                raise PullFailed(reason or f"side channel answered HTTP {resp.status}")
            return answer
    except (aiohttp.ClientError, OSError) as exc:
        raise PullFailed(f"side channel {host}:{port} unreachable ({exc})") from None
    except TimeoutError:
        raise PullFailed(f"side channel {host}:{port} did not answer in {timeout:g} s") from None


async def release(
    session: aiohttp.ClientSession, host: str, port: int, request_id: str, done: bool
) -> None:
    """Tell the producer the read completed (free the blocks) or failed (keep holding)."""
    try:
        async with session.post(
            _url(host, port, "/release"),
            data=orjson.dumps({"request_id": request_id, "done": done}),
            headers={"Content-Type": _JSON},
            timeout=aiohttp.ClientTimeout(total=PULL_TIMEOUT_S),
        ) as resp:
            await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The producer's hold timeout frees the blocks anyway.
        log.warning("KV release to %s:%d for %s failed: %s", host, port, request_id, exc)
