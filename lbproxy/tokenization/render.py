"""An OpenAI request body -> what vLLM tokenises for it.

Chat (`messages`): rendered with the chat template as vLLM does (its tool and tool-call
shapes, `chat_template_kwargs`, `documents`, `continue_final_message`), then encoded
without special tokens unless the body asks for them. Completions and embeddings
(`prompt`, `input`): the text with special tokens, or the token ids given. Responses
(`input` on a `/responses` route): rendered as chat, `instructions` as the system message.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeAlias

from lbproxy.tokenization.chat_template import ChatTemplateError

if TYPE_CHECKING:
    from lbproxy.tokenization.tokenizer import Tokenizer

# What vLLM tokenises: (text, add_special_tokens), token ids as given, or None.
Prompt: TypeAlias = "tuple[str, bool] | list[int] | None"


def prompt_of(tokenizer: Tokenizer, body: dict[str, Any], route: str | None = None) -> Prompt:
    """What vLLM tokenises for this body: (text, add_special_tokens), the token ids
    it was given, or None (a shape we do not handle). Raises on malformed bodies."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if messages is not None:
        return _chat(tokenizer, body, messages)
    if "prompt" in body:
        prompt = body["prompt"]
    elif "input" in body:
        if route is not None and route.rstrip("/").endswith("/responses"):
            return _responses(tokenizer, body)
        prompt = body["input"]
    else:
        return None
    special = body.get("add_special_tokens", True)
    special = special if isinstance(special, bool) else True
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, str):
        return prompt, special
    if isinstance(prompt, list) and prompt and _token_ids(prompt):
        return prompt
    return None


def _chat(tokenizer: Tokenizer, body: dict[str, Any], messages: Any) -> Prompt:
    if not isinstance(messages, list) or not messages or "chat_template" in body:
        return None  # a request-supplied template: we cannot render what vLLM would
    kwargs: dict[str, Any] = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "tools": _vllm_tools(body.get("tools")),
    }
    if body.get("documents") is not None:
        kwargs["documents"] = body["documents"]
    extra = body.get("chat_template_kwargs")
    if isinstance(extra, dict):  # vLLM lets these override the request's fields
        kwargs.update((k, v) for k, v in extra.items() if isinstance(k, str))
    if "chat_template" in kwargs:
        return None
    kwargs.pop("messages", None)
    generation = bool(kwargs.pop("add_generation_prompt"))
    continue_final = bool(kwargs.pop("continue_final_message"))
    tools = kwargs.pop("tools")
    if continue_final and generation:
        return None  # vLLM rejects this combination
    msgs = _vllm_messages(messages)
    try:
        text = tokenizer.render_chat(msgs, generation, tools, **kwargs)
    except ChatTemplateError:
        return None
    if continue_final:
        cut = _continue_final_message(text, msgs[-1])
        if cut is None:
            return None
        text = cut
    return text, body.get("add_special_tokens", False) is True  # vLLM's chat default


def _responses(tokenizer: Tokenizer, body: dict[str, Any]) -> Prompt:
    # vLLM: instructions as a system message, then the input as messages; the
    # conversation behind previous_response_id lives on the server.
    if body.get("previous_response_id") or body.get("tools"):
        return None
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            msg = _response_item(item)
            if msg is None:
                return None
            messages.append(msg)
    if not messages:
        return None
    return _chat(tokenizer, {"messages": messages}, messages)


def _token_ids(prompt: list[Any]) -> bool:
    return {type(t) for t in prompt} == {int} and min(prompt) >= 0 and max(prompt) < 1 << 32


def _vllm_tools(tools: Any) -> list[Any] | None:
    """Tools as vLLM hands them to the template: `ChatCompletionToolsParam.model_dump()`,
    i.e. type, then function {name, description, parameters, extras}, then extras."""
    if not isinstance(tools, list) or not tools:
        return None
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            out.append(tool)
            continue
        f2 = {
            "name": fn.get("name"),
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        f2.update((k, v) for k, v in fn.items() if k not in f2)
        t2: dict[str, Any] = {"type": tool.get("type", "function"), "function": f2}
        t2.update((k, v) for k, v in tool.items() if k not in t2)
        out.append(t2)
    return out


def _vllm_messages(messages: list[Any]) -> list[Any]:
    """vLLM parses assistant tool-call arguments (JSON strings) into objects before
    rendering; everything else is left to `Tokenizer.render_chat`."""
    out = messages
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        calls = m.get("tool_calls")
        if not isinstance(calls, list) or not calls:
            continue
        new_calls = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and not isinstance(fn.get("arguments"), dict):
                args = fn.get("arguments")
                parsed = json.loads(args) if args else {}
                call = {**call, "function": {**fn, "arguments": parsed}}
            new_calls.append(call)
        if out is messages:
            out = list(messages)
        out[n] = {**m, "tool_calls": new_calls}
    return out


def _continue_final_message(text: str, final: Any) -> str | None:
    """Cut the rendering right after the final message's content, as transformers'
    `apply_chat_template(continue_final_message=True)` does."""
    content = final.get("content") if isinstance(final, dict) else None
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and "text" in p]
        content = texts[-1] if texts else None
    if not isinstance(content, str) or content.strip() not in text:
        return None
    at = text.rindex(content.strip())
    if text[at : at + len(content.lstrip())] == content:
        return text[: at + len(content)]
    return text[: at + len(content.strip())]


def _response_item(item: Any) -> dict[str, Any] | None:
    """A Responses API input item as a chat message (plain messages only)."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        return None
    role, content = item.get("role"), item.get("content")
    if not isinstance(role, str):
        return None
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        return None
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in (
            "input_text",
            "output_text",
            "text",
        ):
            return None
        parts.append({"type": "text", "text": part.get("text", "")})
    return {"role": role, "content": parts}
