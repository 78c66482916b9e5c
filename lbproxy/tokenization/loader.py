"""Finding a tokenizer's files: `tokenizer.json`, and next to it `tokenizer_config.json`
(special tokens, maybe the chat template) and `chat_template.jinja`.

The shipped tokenizer is the small byte-level BPE in `lbproxy/sim/data/` (built offline
by `scripts/make_tokenizer.py`); any real model's `tokenizer.json` works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

DATA_DIR = Path(__file__).resolve().parent.parent / "sim" / "data"
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer.json"


@dataclass(frozen=True, slots=True)
class TokenizerFiles:
    """What a tokenizer directory holds, loaded."""

    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    name: str


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer_files(
    path: str | Path | None = None, chat_template: str | Path | None = None
) -> TokenizerFiles:
    """Load `tokenizer.json` (a file, or a directory holding one; None: the shipped one).

    `chat_template` is a template file's path or the template text itself; without it,
    `chat_template.jinja` or the `chat_template` of `tokenizer_config.json` next to the
    tokenizer is used when present. Raises ValueError naming the file.
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

    return TokenizerFiles(
        tk,
        template,
        _token_str(config.get("bos_token")),
        _token_str(config.get("eos_token")),
        str(file),
    )
