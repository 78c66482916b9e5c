"""Chat templates rendered as transformers' `apply_chat_template` does (jinja2 sandbox,
its `tojson`, `raise_exception` and `strftime_now`), and as vLLM hands them messages."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A template that loops over `message['content']` (or `.content`) handles OpenAI-style
# content-part lists itself; for any other template the parts are joined into a string
# first (vLLM's "string" vs "openai" content formats, detected the same rough way).
_ITERATES_CONTENT = re.compile(r"\bfor\s+\w+\s+in\s+\w+(?:\[['\"]content['\"]\]|\.content)(?!\w)")


class ChatTemplateError(ValueError):
    """The messages could not be rendered (no template, a bad message, or the template
    itself raised). Servers answer it with a 400."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # transformers overrides jinja's tojson so that templates see unescaped, unsorted JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def takes_string_content(template: str | None) -> bool:
    """Whether content-part lists are to be joined into a string before rendering."""
    return not (template and _ITERATES_CONTENT.search(template))


def compile_template(template: str) -> Template:
    """Compile a chat template (~10 ms). Raises ChatTemplateError."""
    try:
        return _jinja_env().from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"invalid chat template: {exc}") from exc


def _text_of(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    return "\n".join(
        part["text"] if isinstance(part, dict) else str(part)
        for part in content
        if not isinstance(part, dict) or part.get("type", "text") == "text"
    )


def render_messages(
    compiled: Template,
    messages: list[dict[str, Any]],
    *,
    string_content: bool,
    context: dict[str, Any],
) -> str:
    """Render OpenAI-style messages with a compiled template; `context` holds the other
    template variables. Raises ChatTemplateError."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of objects")
    if string_content:
        messages = [
            {**m, "content": _text_of(m["content"])} if isinstance(m.get("content"), list) else m
            for m in messages
        ]
    try:
        return compiled.render({**context, "messages": messages})
    except TemplateError as exc:
        raise ChatTemplateError(str(exc)) from exc
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ChatTemplateError(f"cannot render the messages: {exc!r}") from exc
