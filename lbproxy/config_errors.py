"""Config problems in a user's words: `key.path: what is wrong`, every one of them.

pydantic reports each problem with its own wording ("Extra inputs are not permitted",
"Input should be ...") and the schema's internal names (union members, validators).
This module turns a ValidationError into one line per problem that names the key path
as written in the YAML file, says what is wrong in plain words, and suggests the key
that was meant when an unknown key is close to a known one (`wieght` -> `weight`).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

__all__ = ["format_problems", "path_str", "plural", "validation_problems"]

# pydantic's union members and validator names in an error's location: not config keys.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}

_TYPE_WORDS = {
    "string_type": "must be text",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping (key: value lines)",
    "model_type": "must be a mapping (key: value lines)",
    "model_attributes_type": "must be a mapping (key: value lines)",
}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or part[:1].isupper() or "[" in part)


def path_str(loc: Sequence[Any]) -> str:
    """`pools[0].backends[1].url` from a pydantic or YAML location."""
    out = ""
    for part in loc:
        if _is_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _members(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [tp]


def _models_at(root: type[BaseModel], loc: Sequence[Any]) -> list[type[BaseModel]]:
    """The schema models that the value at `loc` may be (several for a union)."""
    current: list[Any] = [root]
    for part in loc:
        options = [m for tp in current for m in _members(tp)]
        if _is_tag(part):  # a union member's name: keep that member
            named = [m for m in options if getattr(m, "__name__", None) == part]
            current = named or options
            continue
        nxt: list[Any] = []
        for m in options:
            origin = get_origin(m)
            if isinstance(part, int) and origin in (list, tuple):
                nxt.append(get_args(m)[0])
            elif isinstance(part, str) and origin is dict:
                nxt.append(get_args(m)[1])
            elif isinstance(m, type) and issubclass(m, BaseModel) and part in m.model_fields:
                nxt.append(m.model_fields[part].annotation)
        current = nxt
    options = [m for tp in current for m in _members(tp)]
    return [m for m in options if isinstance(m, type) and issubclass(m, BaseModel)]


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _got(value: Any) -> str:
    """What the value is, never the value itself (it may be a secret)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unknown_key(root: type[BaseModel], loc: Sequence[Any], also: Sequence[str]) -> str:
    key = str(loc[-1])
    known = sorted({k for m in _models_at(root, loc[:-1]) for k in m.model_fields})
    if len(loc) == 1:
        known = sorted({*known, *also})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key (known here: {', '.join(known)})" if known else "unknown key"


def _what(err: Any, root: type[BaseModel], also: Sequence[str]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "required, missing"
    if kind == "extra_forbidden":
        return _unknown_key(root, err["loc"], also)
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, got {_got(err.get('input'))}"
    if kind == "greater_than":
        return f"must be greater than {_num(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be at least {_num(ctx['ge'])}"
    if kind == "less_than":
        return f"must be less than {_num(ctx['lt'])}"
    if kind == "less_than_equal":
        return f"must be at most {_num(ctx['le'])}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else err["msg"]
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {plural(n, 'item')}, got {ctx.get('actual_length', 0)}"
    if kind == "too_long":
        return f"must have at most {plural(ctx.get('max_length', 0), 'item')}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return msg.replace("Input should be", "must be").replace("Input ", "value ")


def _drop_other_union_members(errors: list[Any]) -> list[Any]:
    """A value that matches no member of `str | Model` gets an error per member; keep the
    member the value was meant for (the model's errors when it is a mapping)."""
    by_prefix: dict[tuple[Any, ...], set[Any]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        for i, part in enumerate(loc):
            if _is_tag(part):
                by_prefix.setdefault(loc[:i], set()).add(part)
                break
    keep = []
    for err in errors:
        loc = tuple(err["loc"])
        tag_at = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
        if tag_at is not None:
            tags = by_prefix[loc[:tag_at]]
            if loc[tag_at] in _TYPE_TAGS and any(t not in _TYPE_TAGS for t in tags):
                continue  # "must be text" beside the mapping member's own errors
        keep.append(err)
    return keep


def validation_problems(
    e: ValidationError,
    root: type[BaseModel],
    prefix: Sequence[Any] = (),
    also_known: Sequence[str] = (),
) -> list[str]:
    """Every problem of `e` as `key.path: what is wrong` (paths under `prefix`);
    `also_known`: top-level keys valid beside `root`'s fields (for a did-you-mean)."""
    out: list[str] = []
    for err in _drop_other_union_members(e.errors()):
        line = f"{path_str([*prefix, *err['loc']])}: {_what(err, root, also_known)}"
        if line not in out:
            out.append(line)
    return out


def format_problems(source: str, problems: Sequence[str]) -> str:
    """One problem: `file: key: what`; several: a count, then one per line."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    lines = "\n".join(f"  {source}: {p}" for p in problems)
    return f"{source}: {plural(len(problems), 'problem')}\n{lines}"
