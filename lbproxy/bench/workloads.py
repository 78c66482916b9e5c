"""Benchmark workloads: deterministic request sequences with exact token lengths.

Text is made of "words" that are each exactly one token of the configured tokenizer
(space-prefixed vocabulary entries such as " member"), and a byte-level BPE never merges
across them, so N words are N tokens and the token ids of a prompt are known without
tokenising it: the live load generator sends the text, the offline simulator uses the
ids, and both describe the same request. `Workload.check()` encodes one request and
compares, and the builder falls back to encoding every prompt for a tokenizer where the
splice does not hold.

Lengths are in tokens of the content; the server adds its specials (the BOS for
completions, the chat template's tokens for chat), which `Request.token_ids()` includes.

- `shared-prefix` (inference-perf's): `num_groups` system prompts of `system_prompt_len`
  tokens, each followed by `num_prompts_per_group` questions of `question_len` tokens;
  `output_len` tokens out. The prompts are shuffled once and then cycled.
- `diverse-prefix`: `num_prompts` unrelated prompts of `prompt_len` tokens: little reuse.
- `multi-turn`: `num_conversations` conversations of `turns` turns; turn t resends the
  system prompt and every earlier turn plus a new `question_len`-token question, with the
  conversation's id as session key. Earlier answers are synthetic `output_len`-token text
  (not what the server generated), so both bench and simulate send the same bytes. Turns
  go out in rounds (turn 1 of every conversation in a shuffled order, then turn 2, ...).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lbproxy.routing.prompt import prompt_bytes_from_body
from lbproxy.tokenization.tokenizer import Tokenizer

Api = Literal["completions", "chat"]
APIS: tuple[Api, ...] = ("completions", "chat")


# ---------------------------------------------------------------------------- words
@dataclass(frozen=True, slots=True)
class WordBank:
    """Single-token words of a tokenizer: `texts[i]` encodes to exactly `[ids[i]]`."""

    texts: tuple[str, ...]
    ids: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> Segment:
        pick = rng.integers(0, len(self.texts), size=n)
        texts = self.texts
        return Segment("".join([texts[i] for i in pick.tolist()]), self.ids[pick].tolist())


@functools.lru_cache(maxsize=4)
def word_bank(tokenizer: Tokenizer) -> WordBank:
    tk = tokenizer.tokenizer
    all_ids = sorted(tk.get_vocab().values())
    decoded = tk.decode_batch([[i] for i in all_ids])
    cands = [
        (i, t)
        for i, t in zip(all_ids, decoded, strict=True)
        if len(t) >= 3 and t[0] == " " and t[1:].isascii() and t[1:].isalpha()
    ]
    encoded = tokenizer.encode_batch([t for _, t in cands], add_special_tokens=False)
    texts: list[str] = []
    ids: list[int] = []
    for (token_id, text), enc in zip(cands, encoded, strict=True):
        if enc == [token_id]:
            texts.append(text)
            ids.append(token_id)
    if len(texts) < 64:
        raise ValueError(f"tokenizer {tokenizer.name}: too few single-token words ({len(texts)})")
    return WordBank(tuple(texts), np.asarray(ids, dtype=np.int64))


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Segment:
    """A run of words: its text and its token ids (never mutated)."""

    text: str
    ids: list[int]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload. Prompt text and token ids are assembled on demand from
    shared segments, so a workload of long shared prefixes stays small in memory."""

    index: int
    api: Api
    segments: tuple[Segment, ...]
    roles: tuple[str, ...]  # chat: one role per segment
    max_tokens: int
    group: int  # shared-prefix group, conversation, or prompt number
    session: str | None
    _codec: _Codec = field(repr=False, compare=False)
    send_ids: bool = False  # completions: send the prompt as token ids, not text

    @property
    def prompt_text(self) -> str:
        return "".join(s.text for s in self.segments)

    def messages(self) -> list[dict[str, str]]:
        pairs = zip(self.roles, self.segments, strict=True)
        return [{"role": r, "content": s.text} for r, s in pairs]

    def token_ids(self) -> list[int]:
        """The prompt's token ids exactly as the server tokenises the body."""
        return self._codec.ids(self)

    @property
    def num_prompt_tokens(self) -> int:
        return self._codec.num_ids(self)

    def body(self, model: str, *, stream: bool = True) -> dict[str, Any]:
        """The OpenAI request body: exact output length (ignore_eos), usage in the stream."""
        body: dict[str, Any] = {"model": model}
        if self.api == "chat":
            body["messages"] = self.messages()
        else:
            body["prompt"] = self.token_ids() if self.send_ids else self.prompt_text
        body.update(max_tokens=self.max_tokens, min_tokens=self.max_tokens, ignore_eos=True)
        body["temperature"] = 0.0
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def prompt_bytes(self) -> bytes:
        """What the proxy hashes for approximate prefix matching (same function)."""
        if self.api == "chat":
            return prompt_bytes_from_body({"messages": self.messages()})
        if self.send_ids:
            return prompt_bytes_from_body({"prompt": self.token_ids()})
        return self.prompt_text.encode()

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"


class _Codec:
    """Token ids of a request without tokenising its text: specials + content ids.

    Completions: the tokenizer's specials around a plain concatenation. Chat: the
    template is rendered once per role sequence with markers for the contents, and the
    text between markers (the scaffold) is tokenised once.
    """

    _MARK = "\ue000{}\ue001"
    _SPLIT = re.compile("\ue000\\d+\ue001")

    def __init__(self, tokenizer: Tokenizer, api: Api) -> None:
        self.tokenizer = tokenizer
        self.api = api
        self.exact = True  # False: fall back to tokenising (see Workload.check)
        self._scaffolds: dict[tuple[str, ...], list[list[int]]] = {}
        if api == "completions":
            with_specials = tokenizer.encode("x", add_special_tokens=True)
            bare = tokenizer.encode("x", add_special_tokens=False)
            at = _find(with_specials, bare)
            self._head = with_specials[:at]
            self._tail = with_specials[at + len(bare) :]

    def scaffold(self, roles: tuple[str, ...]) -> list[list[int]]:
        parts = self._scaffolds.get(roles)
        if parts is None:
            msgs = [{"role": r, "content": self._MARK.format(i)} for i, r in enumerate(roles)]
            text = self.tokenizer.render_chat(msgs)
            pieces = self._SPLIT.split(text)
            if len(pieces) != len(roles) + 1:
                raise ValueError("the chat template does not render each content once")
            enc = self.tokenizer.encode
            parts = [enc(p, add_special_tokens=False) if p else [] for p in pieces]
            self._scaffolds[roles] = parts
        return parts

    def ids(self, req: Request) -> list[int]:
        if not self.exact:
            return self.encode(req)
        if self.api == "completions":
            out = list(self._head)
            for s in req.segments:
                out += s.ids
            out += self._tail
            return out
        parts = self.scaffold(req.roles)
        out = list(parts[0])
        for s, p in zip(req.segments, parts[1:], strict=True):
            out += s.ids
            out += p
        return out

    def num_ids(self, req: Request) -> int:
        if not self.exact:
            return len(self.encode(req))
        n = sum(len(s.ids) for s in req.segments)
        if self.api == "completions":
            return n + len(self._head) + len(self._tail)
        return n + sum(len(p) for p in self.scaffold(req.roles))

    def encode(self, req: Request) -> list[int]:
        """Tokenise as the server does (slow: only for checks and the fallback)."""
        if self.api == "chat":
            return self.tokenizer.encode_chat(req.messages())
        return self.tokenizer.encode(req.prompt_text, add_special_tokens=True)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise ValueError("the tokenizer's specials wrap the text in an unexpected way")


# ---------------------------------------------------------------------------- workloads
@dataclass(frozen=True, slots=True)
class _Item:
    segments: tuple[Segment, ...]
    roles: tuple[str, ...]
    max_tokens: int
    group: int
    session: str | None


class Workload:
    """A deterministic, endless sequence of requests: `request(i)` for i = 0, 1, ..."""

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        api: Api,
        items: Sequence[_Item],
        order: Sequence[int],
        codec: _Codec,
    ) -> None:
        self.name = name
        self.params = params
        self.api = api
        # "ids": completions prompts go out as token ids (vLLM then skips tokenising them).
        self.prompt_format: Literal["text", "ids"] = "text"
        self._items = items
        self._order = list(order)
        self._codec = codec
        self._ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        """Distinct requests before the sequence repeats."""
        return len(self._order)

    def request(self, i: int) -> Request:
        it = self._items[self._order[i % len(self._order)]]
        return Request(
            i,
            self.api,
            it.segments,
            it.roles,
            it.max_tokens,
            it.group,
            it.session,
            self._codec,
            self.prompt_format == "ids",
        )

    def token_ids(self, i: int) -> list[int]:
        """`request(i).token_ids()`, assembled once per distinct prompt and shared: callers
        must not mutate it (the simulator hands it to engines, which copy it)."""
        k = self._order[i % len(self._order)]
        ids = self._ids.get(k)
        if ids is None:
            ids = self._ids[k] = self.request(i).token_ids()
        return ids

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "api": self.api,
            "prompt_format": self.prompt_format,
            "params": dict(self.params),
        }

    def check(self, samples: int = 1) -> bool:
        """Tokenise the first `samples` requests and compare with the assembled ids; on a
        mismatch switch to tokenising every request (exact but slow). True if exact."""
        for i in range(min(samples, len(self))):
            req = self.request(i)
            if self._codec.ids(req) != self._codec.encode(req):
                self._codec.exact = False
                return False
        return True


def _positive(params: dict[str, Any], *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    for n in names:
        v = params[n]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{n} must be an integer, got {v!r}")
        if v < (0 if n in allow_zero else 1):
            raise ValueError(f"{n} must be >= {0 if n in allow_zero else 1}, got {v}")


def shared_prefix(
    tokenizer: Tokenizer,
    *,
    num_groups: int = 150,
    num_prompts_per_group: int = 5,
    system_prompt_len: int = 6000,
    question_len: int = 1200,
    output_len: int = 1000,
    seed: int = 0,
    api: Api = "completions",
) -> Workload:
    """inference-perf's shared_prefix (defaults: its 7,200-in / 1,000-out configuration)."""
    params = dict(
        num_groups=num_groups,
        num_prompts_per_group=num_prompts_per_group,
        system_prompt_len=system_prompt_len,
        question_len=question_len,
        output_len=output_len,
        seed=seed,
    )
    _positive(params, "num_groups", "num_prompts_per_group", "question_len", "output_len")
    _positive(params, "system_prompt_len", allow_zero=("system_prompt_len",))
    bank = word_bank(tokenizer)
    rng = np.random.default_rng(seed)
    items: list[_Item] = []
    for g in range(num_groups):
        system = bank.sample(rng, system_prompt_len)
        for _ in range(num_prompts_per_group):
            question = bank.sample(rng, question_len)
            roles = ("system", "user") if api == "chat" else ("", "")
            items.append(_Item((system, question), roles, output_len, g, None))
    order = rng.permutation(len(items)).tolist()
    return Workload("shared-prefix", params, api, items, order, _Codec(tokenizer, api))


def diverse_prefix(
    tokenizer: Tokenizer,
    *,
    num_prompts: int = 1000,
    prompt_len: int = 7200,
    output_len: int = 1000,
    seed: int = 0,
    api: Api = "completions",
) -> Workload:
    """Unrelated random prompts: prefix caching and cache-aware routing gain little."""
    params = dict(num_prompts=num_prompts, prompt_len=prompt_len, output_len=output_len, seed=seed)
    _positive(params, "num_prompts", "prompt_len", "output_len")
    bank = word_bank(tokenizer)
    rng = np.random.default_rng(seed)
    roles = ("user",) if api == "chat" else ("",)
    items = [
        _Item((bank.sample(rng, prompt_len),), roles, output_len, i, None)
        for i in range(num_prompts)
    ]
    return Workload(
        "diverse-prefix", params, api, items, range(num_prompts), _Codec(tokenizer, api)
    )


def multi_turn(
    tokenizer: Tokenizer,
    *,
    num_conversations: int = 64,
    turns: int = 6,
    system_prompt_len: int = 1000,
    question_len: int = 200,
    output_len: int = 200,
    seed: int = 0,
    api: Api = "chat",
) -> Workload:
    """Growing conversations, each with its own system prompt, sent with a session key."""
    params = dict(
        num_conversations=num_conversations,
        turns=turns,
        system_prompt_len=system_prompt_len,
        question_len=question_len,
        output_len=output_len,
        seed=seed,
    )
    _positive(params, "num_conversations", "turns", "question_len", "output_len")
    _positive(params, "system_prompt_len", allow_zero=("system_prompt_len",))
    bank = word_bank(tokenizer)
    rng = np.random.default_rng(seed)
    items: list[_Item] = []
    per_turn: list[list[int]] = [[] for _ in range(turns)]
    for c in range(num_conversations):
        history: list[Segment] = [bank.sample(rng, system_prompt_len)] if system_prompt_len else []
        session = f"conv-{seed}-{c}"
        for t in range(turns):
            history.append(bank.sample(rng, question_len))
            segs = tuple(history)
            if api == "chat":
                first = ("system",) if system_prompt_len else ()
                roles = (*first, *("user", "assistant") * turns)[: len(segs)]
            else:
                roles = ("",) * len(segs)
            per_turn[t].append(len(items))
            items.append(_Item(segs, roles, output_len, c, session))
            history.append(bank.sample(rng, output_len))  # the (synthetic) answer
    order: list[int] = []
    for t in range(turns):
        order += rng.permutation(per_turn[t]).tolist()
    return Workload("multi-turn", params, api, items, order, _Codec(tokenizer, api))


WORKLOADS = {
    "shared-prefix": shared_prefix,
    "diverse-prefix": diverse_prefix,
    "multi-turn": multi_turn,
}

# Parameters each workload takes (besides seed and api), for the command line.
WORKLOAD_PARAMS: dict[str, tuple[str, ...]] = {
    "shared-prefix": (
        "num_groups",
        "num_prompts_per_group",
        "system_prompt_len",
        "question_len",
        "output_len",
    ),
    "diverse-prefix": ("num_prompts", "prompt_len", "output_len"),
    "multi-turn": ("num_conversations", "turns", "system_prompt_len", "question_len", "output_len"),
}


def make_workload(
    name: str,
    tokenizer: Tokenizer,
    params: dict[str, Any] | None = None,
    *,
    prompt_format: Literal["text", "ids"] = "text",
    check: bool = True,
) -> Workload:
    """Build a workload by name; unknown parameters are an error naming the known ones.

    `prompt_format="ids"` sends completions prompts as token ids (as clients that
    tokenise themselves do); chat requests are always text.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    params = dict(params or {})
    known = {*WORKLOAD_PARAMS[name], "seed", "api"}
    unknown = sorted(set(params) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise ValueError(f"workload {name!r} takes no parameter {unknown[0]!r} (known: {names})")
    api = params.get("api", "chat" if name == "multi-turn" else "completions")
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    if prompt_format not in ("text", "ids"):
        raise ValueError(f"prompt_format must be text or ids, got {prompt_format!r}")
    if prompt_format == "ids" and api != "completions":
        raise ValueError("prompt_format ids needs the completions api")
    wl = WORKLOADS[name](tokenizer, **params)
    wl.prompt_format = prompt_format
    if check:
        wl.check()
    return wl
