"""Token counts from the `usage` object in the last bytes of a response.

Only the last chunk or two are looked at, once per response: nothing is parsed per chunk.
Requests whose response carries no usage are not counted.
"""

from __future__ import annotations

_PROMPT = b'"prompt_tokens":'
_COMPLETION = b'"completion_tokens":'
_WINDOW = 2048  # usage sits in the last few hundred bytes of a vLLM response


def _usage_int(buf: bytes, key: bytes) -> int | None:
    # Plain finds and int(): a regex here cost as much as the rest of the request's metrics.
    i = buf.rfind(key, len(buf) - _WINDOW if len(buf) > _WINDOW else 0)
    if i <= 0 or buf[i - 1] == 0x5C:  # \"prompt_tokens\": inside a generated string
        return None
    i += len(key)
    comma = buf.find(b",", i, i + 24)
    brace = buf.find(b"}", i, i + 24)
    end = comma if brace < 0 or 0 <= comma < brace else brace
    if end < 0:
        return None
    try:
        return int(buf[i:end])  # int() skips the blanks around the digits
    except ValueError:  # null, or not a number
        return None


def parse_usage(last: bytes, prev: bytes = b"") -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from a response's last two chunks, where the
    backend's `usage` object is; None for what is not there."""
    prompt = _usage_int(last, _PROMPT)
    completion = _usage_int(last, _COMPLETION)
    if prev and (prompt is None or completion is None):
        if prompt is None:
            prompt = _usage_int(prev, _PROMPT)
        if completion is None:
            completion = _usage_int(prev, _COMPLETION)
    return prompt, completion
