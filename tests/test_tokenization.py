"""The shipped tokenizer, chat rendering, loading real-model layouts, make_tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lbproxy.tokenization.chat_template import ChatTemplateError
from lbproxy.tokenization.loader import DATA_DIR
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, the quick brown fox jumps over the lazy dog.",
        "def route(request):\n    return cache[prefix] + 42\n",
        "  leading spaces, tabs\tand trailing newline\n",
        "Ünïcödé ✓ 日本語 and emoji 🚀",
        "",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode_fast(ids) == tok.decode(ids) or not text.isascii()


def test_special_tokens_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 8192
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.eos_token_id == 1
    ids = tok.encode("hello")
    assert ids[0] == 0  # <s> added by the post-processor
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hello"


def test_english_words_are_single_tokens(tok: Tokenizer) -> None:
    # The point of training on English-like text: common words cost one token each.
    ids = tok.encode(" the model server caches the prefix", add_special_tokens=False)
    assert len(ids) == 6


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = ["one prompt", "another, longer prompt with more words", "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_fast_matches_decode_for_every_ascii_token(tok: Tokenizer) -> None:
    ids = list(range(tok.vocab_size))
    ascii_ids = [i for i in ids if tok.decode([i]).isascii()]
    assert len(ascii_ids) > 7000
    assert tok.decode_fast(ascii_ids) == tok.decode(ascii_ids)
    assert tok.decode_fast([0, 1, 2, 5]) == ""  # special tokens are skipped


def test_render_chat(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "Say hello"},
    ]
    text = tok.render_chat(messages)
    assert text == (
        "<s><|system|>\nYou are a test.<|end|>\n<|user|>\nSay hello<|end|>\n<|assistant|>\n"
    )
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("<|assistant|>\n")
    ids = tok.encode_chat(messages)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(0) == 1 and ids[0] == 0  # one BOS, from the template
    assert ids[1] == 3  # <|system|> is one special token


def test_render_chat_content_parts_equal_string(tok: Tokenizer) -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    plain = [{"role": "user", "content": "a\nb"}]
    assert tok.render_chat(parts) == tok.render_chat(plain)


def test_render_chat_tools_and_tool_calls(tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tok.render_chat(messages, tools=tools)
    assert text.startswith("<s><|system|>\nBe brief.\nYou may call these tools:\n")
    assert '"name": "get_weather"' in text
    assert text.count("<|system|>") == 1  # the system message was folded into the tools block
    assert (
        '<|assistant|>\n\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}' in text
    )
    assert "<|tool|>\nsunny<|end|>" in text


def test_render_chat_errors(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="Unknown role: wizard"):
        tok.render_chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        tok.render_chat("not a list")  # type: ignore[arg-type]


def test_sandbox_blocks_unsafe_templates(tok: Tokenizer) -> None:
    evil = Tokenizer(tok.tokenizer, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        evil.render_chat([{"role": "user", "content": "x"}])


def test_no_chat_template(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.tokenizer)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.render_chat([{"role": "user", "content": "x"}])


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_from_file_real_model_layout(tmp_path: Path) -> None:
    """A model directory: tokenizer.json + tokenizer_config.json holding the template."""
    shutil.copy(DATA_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"content": "<|begin|>", "lstrip": False},
        "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": LLAMA3_TEMPLATE}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        t = Tokenizer.from_file(path)
        assert t.bos_token == "<|begin|>"
        assert t.render_chat([{"role": "user", "content": "hi"}]) == (
            "<|begin|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )


def test_from_file_explicit_template(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    t = Tokenizer.from_file(None, chat_template=path)
    assert t.render_chat([{"role": "user", "content": "a"}]) == "[a]"
    inline = Tokenizer.from_file(None, chat_template="{{ messages | length }}")
    assert inline.render_chat([{"role": "user", "content": "a"}] * 3) == "3"
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.from_file(None, chat_template=tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer"):
        Tokenizer.from_file(path)


def test_template_that_iterates_content_gets_the_parts(tok: Tokenizer) -> None:
    template = (
        "{% for m in messages %}{% for p in m['content'] %}<{{ p.text }}>{% endfor %}{% endfor %}"
    )
    t = Tokenizer(tok.tokenizer, chat_template=template)
    msg = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert t.render_chat(msg) == "<a><b>"


def test_default_tokenizer_is_cached() -> None:
    assert default_tokenizer() is default_tokenizer()


def test_make_tokenizer_is_deterministic_and_matches_shipped(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_tokenizer", ROOT / "scripts/make_tokenizer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    assert (DATA_DIR / "tokenizer.json").stat().st_size < 1_000_000
