#!/usr/bin/env python3
"""Build the simulator's small, real Hugging Face tokenizer, offline and deterministically.

A byte-level BPE (like GPT-2 / Llama 3) is trained on English-like text that this script
generates from its own word lists with a seeded RNG; nothing is downloaded. Writes, next
to each other as a Hugging Face model directory would hold them:

    lbproxy/sim/data/tokenizer.json         the tokenizer (vocab 8192)
    lbproxy/sim/data/tokenizer_config.json  bos/eos/pad tokens, model_max_length
    lbproxy/sim/data/chat_template.jinja    a Phi-3-like chat template with tool support

Usage: python scripts/make_tokenizer.py [OUTDIR]   (run twice: the bytes are identical)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 8192
SEED = 20240531
N_DOCS = 24_000

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
SPECIALS = [BOS, EOS, PAD, *ROLE_TOKENS]


def _words(text: str) -> list[str]:
    return text.split()


# Function words carry most of the mass in English; Zipf-like weights follow list order.
FUNCTION = _words("""the of and to a in is that for it as was with be by on not he this are or his
from at which but have an they you were her she there been one all we their has would when
if so no will can more about what up out who them some could into its then my two than
only other do also time these may first any new like our over such me even most made after
where many before must through back years much your way well down should because each just
those how too very still own same another while last might us great since against both
under never here between few during without again off always however every yet""")

CONTENT = _words("""people world year day man woman child life work system part group number case
point company program question government place state fact home water room area money
story month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher
force education foot boy age policy music market sense nation plan college interest death
experience effect use class control care field development role effort rate heart drug
show leader light voice wife police mind price report decision son view relationship town
road arm difference value building action model season society tax director position
player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair
window evidence population site network server request token cache prefix load balancer
route queue latency user assistant memory engine batch model prompt answer weather river
fox dog cat bird horse fish mountain ocean forest garden kitchen library museum train
station airport hospital school
bridge island village valley desert planet moon sun cloud rain snow wind storm summer
winter spring autumn breakfast lunch dinner coffee bread apple orange music song poem
letter message email meeting report budget contract customer product feature release
version update error warning file folder document function variable array string object
request response header body status client proxy endpoint backend cluster node pod
container image volume secret config metric alert dashboard graph chart table column row""")

VERBS = _words("""say get make go know take see come think look want give use find tell ask work
seem feel try leave call keep let begin help talk turn start show hear play run move like
live believe hold bring happen write provide sit stand lose pay meet include continue set
learn change lead understand watch follow stop create speak read allow add spend grow open
walk win offer remember consider appear buy wait serve die send expect build stay fall cut
reach kill remain suggest raise pass sell require report decide pull explain hope develop
jump carry break receive agree support hit produce eat cover catch draw choose deploy route
cache compute measure schedule balance process return store evict publish subscribe
retry stream parse render encode decode train test fix ship review merge deliver""")

ADJ = _words("""good new first last long great little own other old right big high different small
large next early young important few public bad same able human local sure free better
true whole real best clear full special easy strong certain late hard major simple recent
fast slow quick brown lazy bright dark warm cold quiet loud happy sad rich poor heavy light
busy empty open closed short tall deep wide safe dangerous modern ancient careful curious
helpful friendly efficient reliable scalable distributed concurrent cached stale fresh""")

NAMES = _words("""Alice Bob Carol Dave Eve Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent
Victor Walter London Paris Tokyo Berlin Madrid Rome Cairo Lima Oslo Seoul Sydney Toronto
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April
May June July August September October November December Python Rust Linux Kubernetes""")

SYLLABLES = _words("""ka ro mi tel vos an dri pu sen lo qua zir bel tor ny gas fen ul pre mon ix sta
che dor bra cly dem fos gri hul jin kest lom mar nev oth pra quin ris sul tam ven wex yor zan""")

CODE_SNIPPETS = [
    "def {f}({a}, {b}):\n    return {a} + {b}\n",
    "for i in range({n}):\n    print(i, {a})\n",
    '{{"{a}": {n}, "{b}": "{w}", "ok": true}}',
    "if ({a} > {n}) {{\n  return {b};\n}}\n",
    "SELECT {a}, {b} FROM {w} WHERE id = {n};",
    "$ curl -s http://localhost:{n}/v1/{w}\n",
    "import {w}\nfrom {a} import {b}\n",
    '<{w} class="{a}">{b}</{w}>',
]


def _weighted(rng: random.Random, words: list[str], k: int) -> list[str]:
    # 1/rank weights give the long tail that BPE needs to learn sub-word units.
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    return rng.choices(words, weights=weights, k=k)


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random) -> str:
    shape = rng.random()
    noun = lambda: rng.choice(CONTENT) if rng.random() < 0.75 else _pseudo_word(rng)  # noqa: E731
    verb = rng.choice(VERBS)
    if shape < 0.35:
        s = f"the {rng.choice(ADJ)} {noun()} {verb}s the {noun()} {rng.choice(FUNCTION)} {noun()}"
    elif shape < 0.55:
        s = f"{rng.choice(NAMES)} {verb}ed {rng.randint(2, 999)} {noun()}s on {rng.choice(NAMES)}"
    elif shape < 0.7:
        s = f"how do I {verb} a {rng.choice(ADJ)} {noun()} when the {noun()} is {rng.choice(ADJ)}"
    else:
        s = " ".join(_weighted(rng, FUNCTION + CONTENT + VERBS + ADJ, rng.randint(5, 18)))
    end = rng.choices([".", "?", "!", ":", ","], weights=[70, 12, 5, 5, 8])[0]
    return s[0].upper() + s[1:] + end


def _code(rng: random.Random) -> str:
    words = CONTENT + VERBS
    return rng.choice(CODE_SNIPPETS).format(
        f=rng.choice(VERBS) + "_" + rng.choice(CONTENT),
        a=rng.choice(words),
        b=rng.choice(words),
        w=rng.choice(words),
        n=rng.randint(0, 9999),
    )


def corpus(seed: int = SEED, n_docs: int = N_DOCS) -> list[str]:
    """English-like paragraphs with some numbers, names, lists and code; deterministic."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.8:
            doc = " ".join(_sentence(rng) for _ in range(rng.randint(1, 6)))
        elif kind < 0.9:
            doc = "\n".join(f"{i + 1}. {_sentence(rng)}" for i in range(rng.randint(2, 5)))
        else:
            doc = _code(rng)
        docs.append(doc)
    return docs


CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
{{- '<|system|>\\n' }}
{%- if messages and messages[0]['role'] == 'system' %}
{{- messages[0]['content'] ~ '\\n' }}
{%- set messages = messages[1:] %}
{%- endif %}
{{- 'You may call these tools:\\n' }}
{%- for tool in tools %}
{{- (tool | tojson) ~ '\\n' }}
{%- endfor %}
{{- '<|end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('Unknown role: ' ~ message['role']) }}
{%- endif %}
{{- '<|' ~ message['role'] ~ '|>\\n' }}
{%- if message['content'] is string %}{{ message['content'] }}{% endif %}
{%- for call in message.get('tool_calls') or [] %}
{{- '\\n' ~ (call['function'] | tojson) }}
{%- endfor %}
{{- '<|end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>\\n' }}
{%- endif %}
"""


def build(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        max_token_length=16,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # Re-serialise with sorted keys and no indentation: stable bytes and a small file.
    data = json.loads(tok.to_str())
    (out_dir / "tokenizer.json").write_text(
        json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    print(f"wrote {out_dir} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "lbproxy" / "sim" / "data"
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
