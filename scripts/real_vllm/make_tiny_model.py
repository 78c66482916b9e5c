#!/usr/bin/env python3
"""Build a tiny, randomly initialised Llama and its tokenizer for a real vLLM server, offline.

Usage (from the real-vLLM venv made by scripts/real_vllm/setup.sh, which calls it):

    HF_HUB_OFFLINE=1 python scripts/real_vllm/make_tiny_model.py OUTDIR

OUTDIR gets a Hugging Face model directory that vLLM's CPU build loads with
`--model OUTDIR`: `config.json` + `model.safetensors` (a 2-layer Llama, about 1 M
parameters, float32) and `tokenizer.json` / `tokenizer_config.json` (+ the chat template,
in `chat_template.jinja` or `tokenizer_config.json` depending on the transformers
version): a byte-level BPE of 2,048 tokens trained here on generated text, with
Llama-3-style special tokens and a chat template that emits the BOS token itself.
Nothing is downloaded. The weights are random, so the model's answers are gibberish; what
matters is that vLLM really runs it: its API, `/metrics`, `/tokenize`, prefix caching and
KV-cache events are the real ones.

Constraints met here:
- vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... only: the model
  uses hidden 128 with 4 heads of 32 (a head of 16 crashes the engine on the first
  request).
- lbproxy's precise-prefix scorer tokenises prompts itself from `tokenizer.json` and the
  chat template, so the tokenizer must be a plain `tokenizers` file (no slow tokenizer).
"""

from __future__ import annotations

import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 2048
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, HEADER_START, HEADER_END, EOT]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

COMMON_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or an "
    "have not but which one all were when we there can more if will would about "
    "server client request response token cache prefix block route router balance "
    "queue latency throughput memory model prompt system user assistant answer "
    "question fleet backend engine batch decode prefill event index hash score "
    "alpha beta gamma delta river stone cloud forest garden window mountain ocean "
    "red green blue yellow quick slow bright dark early late first last new old"
)
SYLLABLES = "ar be co di el fo gra hu in jo ka lu mo ne or pa qui ro su ta ul ve wi xo ze"


def corpus(seed: int = 1234, lines: int = 30000) -> list[str]:
    """English-looking sentences: common words plus made-up ones, so BPE learns merges."""
    rng = random.Random(seed)
    common = COMMON_WORDS.split()
    parts = SYLLABLES.split()
    made_up = {"".join(rng.choice(parts) for _ in range(rng.randint(2, 4))) for _ in range(1200)}
    words = common + sorted(made_up) + [str(n) for n in range(100)]
    out = []
    for _ in range(lines):
        n = rng.randint(4, 18)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!,;:"))
    return out


def build_tokenizer(outdir: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain prompts (the completions API) start with BOS, as Llama 3's do.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    path = os.path.join(outdir, "tokenizer.json")
    tok.save(path)
    hf = PreTrainedTokenizerFast(
        tokenizer_file=path,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[HEADER_START, HEADER_END, EOT],
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(outdir)
    return hf


def build_model(outdir: str, tok: PreTrainedTokenizerFast) -> int:
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,  # vLLM CPU attention: 32, 64, 80, ... (see the module docstring)
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    model.save_pretrained(outdir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    random.seed(1234)
    tok = build_tokenizer(outdir)
    params = build_model(outdir, tok)
    print(f"tiny model: {params:,} parameters, vocab {len(tok)}, in {os.path.abspath(outdir)}")


if __name__ == "__main__":
    main()
