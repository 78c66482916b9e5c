"""Hugging Face `tokenizers` + a jinja2 chat template, the way vLLM tokenises requests.

Used by the simulator (prompt length, `/tokenize`, output text), by the router's
precise-prefix scorer and by the benchmark workloads. `Tokenizer.from_file()` with no
argument loads the small byte-level BPE shipped in `lbproxy/sim/data/` (built offline by
`scripts/make_tokenizer.py`); any real model's `tokenizer.json` works too, with its chat
template taken from `chat_template.jinja` or `tokenizer_config.json` next to it.

Chat requests are rendered with the template and then encoded *without* special tokens,
as vLLM does: the template itself emits the BOS token.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATA_DIR = Path(__file__).resolve().parent / "sim" / "data"
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer.json"

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


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _text_of(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    return "\n".join(
        part["text"] if isinstance(part, dict) else str(part)
        for part in content
        if not isinstance(part, dict) or part.get("type", "text") == "text"
    )


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its chat template and special tokens."""

    __slots__ = (
        "_chat_template",
        "_compiled",
        "_pieces",
        "_string_content",
        "bos_token",
        "eos_token",
        "eos_token_id",
        "name",
        "tokenizer",
    )

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        name: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self._chat_template = chat_template
        self._compiled: Any = None
        self._string_content = not (chat_template and _ITERATES_CONTENT.search(chat_template))
        self._pieces: list[str] | None = None

    @classmethod
    def from_file(
        cls, path: str | Path | None = None, chat_template: str | Path | None = None
    ) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a directory holding one; None: the shipped one).

        `chat_template` is a template file's path or the template text itself; without it,
        `chat_template.jinja` or the `chat_template` of `tokenizer_config.json` next to the
        tokenizer is used when present.
        """
        file = Path(path) if path is not None else DEFAULT_TOKENIZER
        if file.is_dir():
            file = file / "tokenizer.json"
        try:
            tk = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({exc})") from exc

        config: dict[str, Any] = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))

        template: str | None = None
        if chat_template is not None:
            template = str(chat_template)
            if "{" not in template:  # a path: template text always holds "{{" or "{%"
                if not Path(template).is_file():
                    raise ValueError(f"chat template file not found: {template}")
                template = Path(template).read_text(encoding="utf-8")
        elif (file.parent / "chat_template.jinja").is_file():
            template = (file.parent / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            found = config.get("chat_template")
            if isinstance(found, list):  # named templates: take "default"
                found = next((t.get("template") for t in found if t.get("name") == "default"), None)
            template = found if isinstance(found, str) else None

        return cls(
            tk,
            chat_template=template,
            bos_token=_token_str(config.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")),
            name=str(file),
        )

    # ---------------------------------------------------------------- plain text
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Many texts in one call; the Rust side spreads them over threads."""
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_fast(self, ids: Sequence[int]) -> str:
        """`decode(ids)` for streaming hot paths: a table lookup per token.

        Exact for byte-level BPE tokenizers as long as no multi-byte character is split
        across the ids (each piece is decoded on its own, so a split one shows as U+FFFD).
        Other decoders (e.g. SentencePiece's Metaspace) fall back to `decode`.
        """
        pieces = self._pieces
        if pieces is None:
            pieces = self._pieces = self._build_pieces()
        if not pieces:
            return self.decode(ids)
        n = len(pieces)
        return "".join([pieces[i] if 0 <= i < n else "" for i in ids])

    def _build_pieces(self) -> list[str]:
        if not isinstance(self.tokenizer.decoder, tokenizers.decoders.ByteLevel):
            return []
        return self.tokenizer.decode_batch(
            [[i] for i in range(self.vocab_size)], skip_special_tokens=True
        )

    # ---------------------------------------------------------------- chat
    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def compile_chat_template(self) -> None:
        """Compile the chat template now (~10 ms), not on the first request (the event
        loop's time). Raises ChatTemplateError."""
        if self._compiled is None and self._chat_template is not None:
            try:
                self._compiled = _jinja_env().from_string(self._chat_template)
            except TemplateError as exc:
                raise ChatTemplateError(f"invalid chat template: {exc}") from exc

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render OpenAI-style messages with the chat template (content as a string or as a
        list of `{"type": "text", "text": ...}` parts). Raises ChatTemplateError."""
        if self._chat_template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template; pass chat_template= "
                "(a .jinja file or the template text)"
            )
        self.compile_chat_template()
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("messages must be a list of objects")
        if self._string_content:
            messages = [
                {**m, "content": _text_of(m["content"])}
                if isinstance(m.get("content"), list)
                else m
                for m in messages
            ]
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled.render(context)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ChatTemplateError(f"cannot render the messages: {exc!r}") from exc

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False)


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The shipped tokenizer, loaded once per process."""
    return Tokenizer.from_file()
