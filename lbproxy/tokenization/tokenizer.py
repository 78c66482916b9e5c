"""`Tokenizer`: Hugging Face `tokenizers` + a jinja2 chat template, the way vLLM
tokenises requests.

Used by the simulator (prompt length, `/tokenize`, output text), by the router's
precise-prefix scorer and by the benchmark workloads. `Tokenizer.from_file()` with no
argument loads the small byte-level BPE shipped in `lbproxy/sim/data/`; any real model's
`tokenizer.json` works too (`loader`).

Chat requests are rendered with the template and then encoded *without* special tokens,
as vLLM does: the template itself emits the BOS token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from lbproxy.tokenization.chat_template import (
    ChatTemplateError,
    compile_template,
    render_messages,
    takes_string_content,
)
from lbproxy.tokenization.loader import load_tokenizer_files


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
        self._string_content = takes_string_content(chat_template)
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
        f = load_tokenizer_files(path, chat_template)
        return cls(
            f.tokenizer,
            chat_template=f.chat_template,
            bos_token=f.bos_token,
            eos_token=f.eos_token,
            name=f.name,
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
            self._compiled = compile_template(self._chat_template)

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
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **kwargs,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        return render_messages(
            self._compiled, messages, string_content=self._string_content, context=context
        )

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
