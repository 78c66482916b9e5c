"""Canonical prompt bytes of an OpenAI request body, for approximate prefix hashing.

Two requests that share a prompt prefix must share a byte prefix here, so chat
messages are rendered in order, each as role, a separator, its text and a record
separator; anything that is not text (images, tool calls) contributes its JSON.
"""

from __future__ import annotations

from array import array
from typing import Any

import orjson

_UNIT = b"\x1f"  # between role and content
_RECORD = b"\x1e"  # after each message


def _content_bytes(content: Any) -> bytes:
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")).encode())
            else:
                parts.append(orjson.dumps(part))
        return b"".join(parts)
    if content is None:
        return b""
    return orjson.dumps(content)


def asked_output_tokens(body: dict[str, Any]) -> int:
    """The output tokens a request asks for at most (`max_tokens`, chat's
    `max_completion_tokens`, responses' `max_output_tokens`); 0 when it does not say."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


def prompt_bytes_from_body(body: dict[str, Any]) -> bytes:
    """Completions: the prompt; chat: rendered messages; responses: the input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        out = bytearray()
        for m in messages:
            if isinstance(m, dict):
                out += str(m.get("role", "")).encode()
                out += _UNIT
                out += _content_bytes(m.get("content"))
            out += _RECORD
        return bytes(out)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):  # token ids: 4 bytes each, like text's ~4 bytes/token
            try:
                return array("I", prompt).tobytes()
            except (OverflowError, TypeError):
                return orjson.dumps(prompt)
        if isinstance(first, str):
            return first.encode()
        return orjson.dumps(first)
    return b""
