"""The simulator's `/v1/responses` (OpenAI Responses API) in vLLM's shapes: text in, one
assistant message out, non-streaming or as the SSE event sequence vLLM sends.

Only what a text model does: `input` (a string, or a list of messages whose content is a
string or `input_text` parts), `instructions` (a system message), `max_output_tokens`,
`stream`. Tools, reasoning items, `previous_response_id` and background mode are refused
with vLLM's 400 error shape, as for any parameter vLLM rejects.
"""

from __future__ import annotations

import time
from typing import Any

from lbproxy.sim.openai_api import ApiError, request_id

_UNSUPPORTED = ("previous_response_id", "background", "tools", "reasoning", "conversation")


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages a Responses request means (vLLM renders them with the model's
    chat template, as for /v1/chat/completions)."""
    for key in _UNSUPPORTED:
        if body.get(key):
            raise ApiError(f"`{key}` is not supported by the simulator", param=key)
    messages: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        for item in given:
            messages.append(_message(item))
    else:
        raise ApiError("input must be a string or a non-empty list of messages", param="input")
    return messages


def _message(item: Any) -> dict[str, str]:
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise ApiError("input items must be messages", param="input")
    role, content = item.get("role"), item.get("content")
    if role not in ("user", "assistant", "system", "developer"):
        raise ApiError(f"unknown message role {role!r}", param="input")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                raise ApiError("only text content parts are supported", param="input")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError("message content must be a string or a list of text parts", param="input")
    return {"role": "system" if role == "developer" else role, "content": content}


class ResponseShape:
    """The ids and fixed fields of one response, and its objects at each stage."""

    def __init__(self, body: dict[str, Any], model: str, max_output_tokens: int) -> None:
        self.id = f"resp_{request_id()}{request_id()}"
        self.msg_id = f"msg_{request_id()}{request_id()}"
        self.created = int(time.time())
        self.body = body
        self.model = model
        self.max_output_tokens = max_output_tokens

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = (
            [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}]
            if status == "completed" or text
            else []
        )
        return {"id": self.msg_id, "content": content, "role": "assistant", "status": status,
                "type": "message"}  # fmt: skip

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """`status`: in_progress, completed or incomplete (the length limit was hit)."""
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        return {
            "id": self.id,
            "created_at": self.created,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature", 1.0),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "background": False,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": body.get("max_tool_calls"),
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": body.get("service_tier", "auto"),
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": body.get("user"),
        }


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def final_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"
