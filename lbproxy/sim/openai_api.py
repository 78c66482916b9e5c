"""The simulator's OpenAI / vLLM request parsing and its error and model-card shapes.

Each parser takes a request body (a dict) and what it needs to know (tokenizer, limits),
returns plain values, and raises `ApiError` with vLLM's message for what vLLM refuses.
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from lbproxy.tokenization.chat_template import ChatTemplateError
from lbproxy.tokenization.tokenizer import Tokenizer

VLLM_VERSION = "0.32.0"
SYSTEM_FINGERPRINT = f"vllm-{VLLM_VERSION}-lbproxysim"  # vLLM: vllm-<version>-<8 hex>
EMBEDDING_DIM = 384
EOS_MIN, EOS_MAX = 16, 256  # simulated EOS length range when max_tokens is absent

JSON = "application/json"


class ApiError(Exception):
    """Answered as vLLM's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.err_type, "param": self.param,
                          "code": self.status}}  # fmt: skip
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=JSON)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
):
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # FastAPI's shape for unknown routes
            body = orjson.dumps({"detail": exc.reason})
            return web.Response(status=exc.status, body=body, content_type=JSON)
        raise


def request_id() -> str:
    return os.urandom(8).hex()


def int_param(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{key} must be an integer, got {value!r}", param=key)
    if value < minimum:
        raise ApiError(f"{key} must be at least {minimum}, got {value}.", param=key)
    return value


async def read_body(request: web.Request, served_model: str) -> dict[str, Any]:
    """The JSON object a request carries, for `served_model` (when it names one)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
    return body


def check_ids(ids: list[Any], vocab: int) -> list[int]:
    # Cheap whole-list checks first (prompts run to thousands of ids), details after.
    if all(type(t) is int for t in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab)):
        return ids
    for t in ids:
        if type(t) is not int:
            raise ApiError(f"token ids must be integers, got {t!r}", param="prompt")
        if not 0 <= t < vocab:
            raise ApiError(f"Token id {t} is out of vocabulary", param="prompt")
    return ids


def prompt_ids(body: dict[str, Any], tokenizer: Tokenizer, key: str = "prompt") -> list[int]:
    prompt = body.get(key)
    add_special = body.get("add_special_tokens", True) is not False
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=add_special)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(
            "batched prompts are not supported by the simulator; send one prompt per request",
            param=key,
        )
    elif isinstance(prompt, list):
        ids = check_ids(prompt, tokenizer.vocab_size)
    else:
        raise ApiError(f"{key} must be a string, a list of token ids or a list of strings")
    if not ids:
        raise ApiError("Prompt cannot be empty", param=key)
    return ids


def chat_ids(body: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    try:
        text = tokenizer.render_chat(
            messages,
            add_generation_prompt=body.get("add_generation_prompt", True) is not False,
            tools=body.get("tools"),
            **kwargs,
        )
    except ChatTemplateError as exc:
        raise ApiError(str(exc), param="messages") from None
    add_special = body.get("add_special_tokens", False) is True
    return tokenizer.encode(text, add_special_tokens=add_special)


def generation_limits(
    body: dict[str, Any], prompt: list[int], chat: bool, max_model_len: int, seed: int
) -> tuple[int, int, bool]:
    """(max_tokens for the engine, min_tokens, simulated EOS?) with vLLM's checks."""
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError("n > 1 is not supported by the simulator", param="n")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError("Stream options can only be defined when `stream=True`.")
    max_tokens = int_param(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = int_param(body, "max_tokens", 1)
    min_tokens = int_param(body, "min_tokens", 0) or 0
    plen, limit = len(prompt), max_model_len
    if plen >= limit:
        raise ApiError(
            f"This model's maximum context length is {limit} tokens. However, your request "
            f"has {plen} input tokens. Please reduce the length of the input messages."
        )
    room = limit - plen
    if max_tokens is not None:
        if max_tokens > room:
            raise ApiError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {limit} tokens and your request has "
                f"{plen} input tokens ({max_tokens} > {limit} - {plen})."
            )
        if min_tokens > max_tokens:
            raise ApiError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {min_tokens}."
            )
        return max_tokens, min_tokens, False
    if body.get("ignore_eos"):
        return room, min_tokens, False
    # Simulated EOS: a length the same prompt always gets (like greedy decoding would).
    h = zlib.crc32(array("q", prompt).tobytes(), seed & 0xFFFFFFFF)
    if isinstance(body.get("seed"), int):
        h = zlib.crc32(str(body["seed"]).encode(), h)
    length = max(EOS_MIN + h % (EOS_MAX - EOS_MIN + 1), min_tokens)
    if length >= room:
        return room, min_tokens, False  # capped by the context: a "length" finish
    return length, min_tokens, True


def models_body(model: str, max_model_len: int) -> bytes:
    """vLLM's /v1/models answer for one model."""
    created = int(time.time())
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{request_id()}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    return orjson.dumps({"object": "list", "data": [card]})


def embedding(ids: list[int], dims: int) -> list[float]:
    """A unit vector that depends only on the token ids (and is cheap: one seeded RNG)."""
    rng = random.Random(zlib.crc32(array("q", ids).tobytes()))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
