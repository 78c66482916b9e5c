"""Prompt token ids as vLLM computes them, with an exact shared-prefix cache.

`PromptTokenizer(tokenizer)` turns an OpenAI request body into the token ids vLLM would
feed the model (chat: rendered with the chat template, then encoded without special
tokens; completions: the prompt encoded with them; token-id prompts as they are), for
the precise-prefix scorer: the proxy computes them before routing (`proxy.prompt_ids`);
offline callers may set it as `RequestContext._tokenize` instead.

Encoding a 7,200-token prompt costs ~10 ms; most of it is usually a system prompt shared
with earlier requests. The cache keeps the token ids of recent prompts and splices:

    ids(text) == ids(text[:p]) + ids(text[p:])   when p is a pre-token boundary,

because BPE / WordPiece / Unigram models never merge across pre-tokens, and added tokens
are split out before normalisation and pre-tokenisation. A cut p is used only if

- the cached prompt's own encoding has a token boundary at p (no token straddles it:
  checked with the encoding's offsets; this also rules out an rstrip added token that
  swallows the space after it), and
- p lies at least `margin` bytes (16, or the longest added token, plus 1) before the end
  of the bytes the new prompt is known to share, so regex look-ahead and added-token
  matching around p see the same text in both prompts; pre-tokenisers look neither
  behind (so the remainder starts a pre-token exactly where the full text does) nor far
  ahead, so the boundary and the tokens before it are the same in the new prompt.

Two kinds of cut are looked for:

- "space": `text[p] == " "` after a non-whitespace character: a pre-token boundary for
  every byte-level regex in use (GPT-2, Llama 3, Qwen, o200k: no alternative runs from
  a non-space across a space), for Metaspace (splits before "▁") and for BERT's
  whitespace split. After whitespace it is not one: "word  \nnext" is "word", "  ",
  "\n", ... and a cut at the second space would give "word", " ", " ", "\n", ...
- "special": the start of an added token (no lstrip / single_word / normalisation),
  i.e. a chat-template marker. Exact for nearly any tokenizer, SentencePiece ones whose
  normaliser prepends "▁" included, and available in text without spaces.

Prompts are cut into `chunk_chars`-byte chunks (UTF-8; characters for ASCII text); every
chunk boundary of a cached prompt is indexed by the xxh3 hash of the prefix up to it,
with the best cut of each kind before it and the number of tokens before that cut. A new
prompt probes its own boundaries (top-down, then a binary search), compares the bytes
(ruling out hash collisions), takes the cached ids up to the cut and encodes only the
rest. Spliced results are cached in turn (the next turn of a conversation extends them);
ids are kept as `array('I')` in an LRU bounded by their total count.

Off the event loop: `array_or_prompt(body)` gives the ids when they are cheap (a cached
prompt, a cached prefix with at most `INLINE_FRESH_BYTES` of fresh text, a short prompt,
no verification due), else the (text, add_special_tokens) that `encode_off_loop` turns
into ids in a worker thread, where every encode goes through `encode_batch`: unlike
`encode` (tokenizers 0.23), it releases the GIL while Rust works. The cache is shared:
lookups and insertions hold `_lock`; entries are never changed once built.

Self-check: the first `verify_first` splices of each kind, and every `verify_every`-th
after that, are compared with a full encode. A mismatch is logged once, disables that
kind of cut for this tokenizer (a space mismatch leaves special cuts on) and clears the
cache; the caller gets the full encode's result. Tokenizers where space cuts are wrong,
e.g. SentencePiece with a "Prepend ▁" normaliser and no pre-tokenizer (Llama 2), are
caught on their first space splice. Sampling costs a full encode per `verify_every`
splices (~40 µs a request at 1 in 256 for 7k-token prompts).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeAlias

import tokenizers
import xxhash

from lbproxy.routing.state import RequestContext
from lbproxy.tokenization.boundaries import CharPositions, TokenBoundaries
from lbproxy.tokenization.chat_template import ChatTemplateError
from lbproxy.tokenization.render import prompt_of
from lbproxy.tokenization.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SPACE, SPECIAL = 0, 1  # kinds of cut
_KIND_NAMES = ("space", "special")
_WS = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")  # the ASCII bytes isspace() holds
_MIN_MARGIN = 16  # bytes kept clear of the shared prefix's end (look-ahead room)
_MAX_SPACE_TRIES = 4  # space candidates tried per chunk before giving up on it
_TOP_DOWN_PROBES = 8  # boundaries probed from the top before the binary search
# Fresh text encoded on the event loop at most (~1 ms): more goes to a worker thread.
INLINE_FRESH_BYTES = 4096

_hash = xxhash.xxh3_64_intdigest

if TYPE_CHECKING:
    Ids: TypeAlias = list[int] | array[int]


class _NotInline(Exception):
    """Raised by `_encode(max_fresh=...)`: the ids cost more than the event loop may pay."""


class _Entry:
    """A cached prompt: its UTF-8 bytes and content token ids (no post-processor specials).

    `cuts` holds 4 ints per chunk boundary i (at 4*(i-1)): the best cut of either kind
    at least `margin` bytes before the boundary (byte position, tokens before it), then
    the best special cut (same); position 0 means none. `keys` are the prefix hashes of
    its boundaries; `kind` is None for a full encode, else the kind of cut it relies on.
    """

    __slots__ = ("cuts", "ids", "keys", "kind", "raw")

    def __init__(
        self, raw: bytes, ids: array[int], keys: list[int], cuts: list[int], kind: int | None
    ) -> None:
        self.raw = raw
        self.ids = ids
        self.keys = keys
        self.cuts = cuts
        self.kind = kind


class PromptTokenizer:
    """Token ids of OpenAI request bodies, exactly as vLLM computes them, with a cache of
    shared prefixes (see the module docstring). Thread-safe; never raises on bad bodies.

    Counters: `hits` (requests whose ids reused cached tokens), `misses` (requests that
    needed a full encode), `cached_tokens_reused`, `verify_failures`, `verifications`
    (plain attributes, updated without the lock: approximate under threads); memory:
    `cached_tokens` in `entries` prompts, bounded by `max_cached_tokens` (about 9 bytes a
    token in all: the ids, the prompts' UTF-8 text, lists of the hot ones, the index).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_cached_tokens: int = 2_000_000,
        chunk_chars: int = 256,
        verify_first: int = 32,
        verify_every: int = 256,
    ) -> None:
        if chunk_chars < 16:
            raise ValueError("chunk_chars must be at least 16")
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self.chunk = chunk_chars
        self.verify_first = verify_first
        self.verify_every = max(0, verify_every)  # 0: no sampling
        self.hits = 0
        self.misses = 0
        self.cached_tokens_reused = 0
        self.verify_failures = 0
        self.verifications = 0
        self.cached_tokens = 0

        tk: tokenizers.Tokenizer = tokenizer.tokenizer
        self._tk = tk
        self._lock = threading.Lock()
        self._lru: OrderedDict[_Entry, None] = OrderedDict()
        self._index: dict[int, _Entry] = {}  # prefix hash at a chunk boundary -> entry
        self._exact: dict[int, _Entry] = {}  # hash of a whole prompt -> entry
        # Splicing is only sound when an encode depends on nothing but its text.
        enabled = tk.truncation is None and tk.padding is None
        self._kind_ok = [enabled, enabled]
        self._spliced = [0, 0]  # splices per kind, for the verification schedule
        # Python lists of the most recently hit entries' ids: slicing one costs a tenth
        # of array.tolist(). About 9x the memory of the array, so a budget of their own.
        self._lists: OrderedDict[_Entry, list[int]] = OrderedDict()
        self._list_tokens = 0
        self.max_list_tokens = max_cached_tokens // 8

        added = tk.get_added_tokens_decoder()
        longest = max((len(t.content.encode()) for t in added.values()), default=0)
        self.margin = max(_MIN_MARGIN, longest) + 1
        # Added tokens a special cut may start at: matched verbatim, nothing stripped.
        specials = {
            t.content.encode(): tid
            for tid, t in added.items()
            if len(t.content) >= 2
            and not (t.lstrip or t.single_word or t.normalized)
            and not t.content[0].isspace()
        }
        self._special_ids = specials
        self._special_re = (
            re.compile(b"|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )
        # What add_special_tokens=True puts around the content (None: not a plain wrap).
        self._wrap = self._find_wrap()
        with contextlib.suppress(ChatTemplateError):  # an invalid one fails each request
            tokenizer.compile_chat_template()

    # ------------------------------------------------------------------ public API
    def __call__(self, ctx: RequestContext) -> list[int]:
        return self.ids_for_body(ctx.body, route=ctx.route)

    def ids_for_body(self, body: dict[str, Any], route: str | None = None) -> list[int]:
        """The prompt's token ids as vLLM computes them; [] for shapes it cannot handle.

        `messages`: chat (template, `tools`, `chat_template_kwargs`, `documents`,
        `add_generation_prompt`, `continue_final_message`, `add_special_tokens`).
        `prompt`: a string (encoded with special tokens unless `add_special_tokens` is
        false), token ids, or a list of either (the first is used, as the approximate
        prefix scorer does). `input`: on a `/responses` route, rendered as chat like vLLM
        (`instructions` as the system message); elsewhere (embeddings) like a prompt.
        """
        out = self._for_body(body, route, False)
        return out if isinstance(out, list) else out.tolist()

    def array_for_body(self, body: dict[str, Any], route: str | None = None) -> array[int]:
        """`ids_for_body` as an `array('I')`: a few µs instead of ~150 µs to build for a
        7k-token prompt, and what `precise_index.token_bytes` converts a list into."""
        out = self._for_body(body, route, True)
        return out if isinstance(out, array) else array("I", out)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer.encode(text, add_special_tokens).ids`, reusing cached prefixes."""
        out = self._encode(text, add_special_tokens, False)
        return out if isinstance(out, list) else out.tolist()

    def encode_array(self, text: str, add_special_tokens: bool = True) -> array[int]:
        out = self._encode(text, add_special_tokens, True)
        return out if isinstance(out, array) else array("I", out)

    def array_or_prompt(
        self, body: dict[str, Any], route: str | None = None, max_fresh: int = INLINE_FRESH_BYTES
    ) -> array[int] | tuple[str, bool]:
        """`array_for_body` when it is cheap enough for the event loop (at most `max_fresh`
        bytes to encode, no verification due); else the (text, add_special_tokens) to
        finish with `encode_off_loop` in a worker thread. Never raises."""
        try:
            prompt = prompt_of(self.tokenizer, body, route)
            if prompt is None:
                return array("I")
            if isinstance(prompt, list):
                return array("I", prompt)
            try:
                out = self._encode(prompt[0], prompt[1], True, max_fresh=max_fresh)
            except _NotInline:
                return prompt
        except Exception:  # a bad body must never break routing: it just gets no ids
            log.debug("cannot tokenise the request body", exc_info=True)
            return array("I")
        return out if isinstance(out, array) else array("I", out)

    def encode_off_loop(self, text: str, add_special_tokens: bool) -> array[int]:
        """`encode_array` for a worker thread: its encodes release the GIL. Never raises."""
        try:
            out = self._encode(text, add_special_tokens, True, off_loop=True)
        except Exception:
            log.debug("cannot tokenise the request body", exc_info=True)
            return array("I")
        return out if isinstance(out, array) else array("I", out)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "cached_tokens_reused": self.cached_tokens_reused,
            "verify_failures": self.verify_failures,
            "verifications": self.verifications,
            "cached_tokens": self.cached_tokens,
            "entries": len(self._lru),
        }

    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def splicing(self) -> dict[str, bool]:
        """Which kinds of cut are (still) trusted for this tokenizer."""
        return {name: self._kind_ok[kind] for kind, name in enumerate(_KIND_NAMES)}

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._index.clear()
            self._exact.clear()
            self._lists.clear()
            self.cached_tokens = self._list_tokens = 0

    # ------------------------------------------------------------------ request bodies
    def _for_body(self, body: dict[str, Any], route: str | None, as_array: bool) -> Ids:
        try:
            prompt = prompt_of(self.tokenizer, body, route)
            if prompt is None:
                return []
            if isinstance(prompt, list):
                return array("I", prompt) if as_array else list(prompt)
            return self._encode(prompt[0], prompt[1], as_array)
        except Exception:  # a bad body must never break routing: it just gets no ids
            log.debug("cannot tokenise the request body", exc_info=True)
            return []

    # ------------------------------------------------------------------ encoding
    def _find_wrap(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        tk = self._tk
        wraps = set()
        for probe in ("x", "hello world", " a, b"):
            full = tk.encode(probe, add_special_tokens=True).ids
            bare = tk.encode(probe, add_special_tokens=False).ids
            at = _find(full, bare)
            if at < 0:
                return None
            wraps.add((tuple(full[:at]), tuple(full[at + len(bare) :])))
        return wraps.pop() if len(wraps) == 1 else None

    def _encoding(self, text: str, add_special_tokens: bool, off_loop: bool) -> tokenizers.Encoding:
        if off_loop:  # the same result, but the GIL is released while Rust works
            return self._tk.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self._tk.encode(text, add_special_tokens=add_special_tokens)

    def _encode(
        self,
        text: str,
        add_special_tokens: bool,
        as_array: bool,
        *,
        max_fresh: int | None = None,
        off_loop: bool = False,
    ) -> Ids:
        """The ids of `text`, reusing cached prefixes. With `max_fresh`, raises _NotInline
        rather than encode more than that many bytes or verify a splice."""
        wrap = self._wrap if add_special_tokens else ((), ())
        if wrap is None or not (self._kind_ok[SPACE] or self._kind_ok[SPECIAL]):
            if max_fresh is not None and len(text) > max_fresh:
                raise _NotInline
            self.misses += 1
            return self._encoding(text, add_special_tokens, off_loop).ids
        raw = text.encode()
        head, tail = wrap
        with self._lock:
            found = self._lookup(raw)
        if found is None:
            if max_fresh is not None and len(raw) > max_fresh:
                raise _NotInline
            return self._encode_cold(text, raw, add_special_tokens, head, tail, as_array, off_loop)
        entry, i, p, k, kind = found
        if max_fresh is not None and (
            (i != 0 and len(raw) - p > max_fresh) or self._verify_due(kind)
        ):
            raise _NotInline
        if i == 0:  # the whole prompt is cached
            out = _join(head, entry.ids[:] if as_array else self._list(entry, -1), None, tail)
            return self._checked(out, text, add_special_tokens, kind, len(entry.ids), off_loop)

        rest = text[p:] if len(raw) == len(text) else raw[p:].decode()
        enc = self._encoding(rest, False, off_loop)
        rest_ids = enc.ids
        out = _join(head, entry.ids[:k] if as_array else self._list(entry, k), rest_ids, tail)
        out = self._checked(out, text, add_special_tokens, kind, k, off_loop)
        if kind is not None and self._kind_ok[kind] and len(raw) >= (i + 1) * self.chunk:
            self._insert_spliced(entry, i, p, k, kind, raw, enc, rest_ids)
        return out

    def _encode_cold(
        self,
        text: str,
        raw: bytes,
        add_special_tokens: bool,
        head: tuple[int, ...],
        tail: tuple[int, ...],
        as_array: bool,
        off_loop: bool = False,
    ) -> Ids:
        """A full encode (exact by definition), cached if the prompt spans a chunk."""
        self.misses += 1
        enc = self._encoding(text, add_special_tokens, off_loop)
        ids = enc.ids
        n = len(raw) // self.chunk
        h, t = len(head), len(tail)
        if (
            n == 0
            or len(ids) - h - t > self.max_cached_tokens
            or ids[:h] != list(head)
            or (t and ids[len(ids) - t :] != list(tail))
        ):
            return ids
        content = array("I", ids)
        if h or t:
            content = content[h : len(ids) - t]
        chars = CharPositions(raw, self.chunk)
        offsets = TokenBoundaries(enc, h, h + len(content), len(content) / max(1, len(text)))
        cuts = self._cuts(raw, chars, offsets, content, 1, n, 0, [0, 0, 0, 0])
        keys = _prefix_keys(raw, self.chunk, 0, n)
        with self._lock:
            self._add(_Entry(raw, content, keys, cuts, None), 0)
        if not as_array:
            return ids
        return _join(head, content[:], None, tail)  # a copy: the cache keeps content

    def _verify_due(self, kind: int | None) -> bool:
        """Whether the next splice of this kind is to be compared with a full encode."""
        if kind is None:
            return False
        n = self._spliced[kind]
        return n < self.verify_first or bool(self.verify_every and (n + 1) % self.verify_every == 0)

    def _checked(
        self,
        out: Ids,
        text: str,
        add_special_tokens: bool,
        kind: int | None,
        reused: int,
        off_loop: bool = False,
    ) -> Ids:
        """Count a hit, or, when the schedule says so, compare with a full encode."""
        if kind is not None:
            due = self._verify_due(kind)
            self._spliced[kind] += 1
            if due:
                self.verifications += 1
                full = self._encoding(text, add_special_tokens, off_loop).ids
                if (out if isinstance(out, list) else out.tolist()) != full:
                    self._distrust(kind, text)
                    self.misses += 1
                    return full
        self.hits += 1
        self.cached_tokens_reused += reused
        return out

    def _distrust(self, kind: int, text: str) -> None:
        self.verify_failures += 1
        with self._lock:
            if self._kind_ok[kind]:
                self._kind_ok[kind] = False
                log.warning(
                    "tokenizer %s: token ids spliced at a %s cut differ from a full encode "
                    "(prompt of %d chars); %s",
                    self.tokenizer.name or "?",
                    _KIND_NAMES[kind],
                    len(text),
                    "splicing at special tokens only"
                    if kind == SPACE and self._kind_ok[SPECIAL]
                    else "encoding every prompt in full",
                )
        self.clear()  # entries spliced the same way may be wrong too

    # ------------------------------------------------------------------ the cache
    def _lookup(self, raw: bytes) -> tuple[_Entry, int, int, int, int | None] | None:
        """(entry, boundary, cut, tokens before the cut, kind) for the longest usable
        cached prefix of `raw`; boundary 0 if the whole prompt is cached; None on a miss.
        The kind is SPACE if the result relies on any space cut (the entry's own splice
        included), None if on no cut at all. Called with the lock held."""
        if not self._lru:
            return None
        e = self._exact.get(_hash(raw))
        if e is not None and e.raw == raw and (e.kind is None or self._kind_ok[e.kind]):
            self._lru.move_to_end(e)
            return e, 0, 0, 0, e.kind
        c = self.chunk
        top = len(raw) // c
        if top == 0:
            return None
        index = self._index
        view = memoryview(raw)
        found, key = 0, 0
        floor = max(0, top - _TOP_DOWN_PROBES)
        for i in range(top, floor, -1):  # the usual case: a fresh tail of a few chunks
            key = _hash(view[: i * c])
            if key in index:
                found = i
                break
        if not found and floor > 0 and _hash(view[:c]) in index:
            lo, hi = 1, floor  # lo is present; find the last present (keys are prefixes)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _hash(view[: mid * c]) in index:
                    lo = mid
                else:
                    hi = mid - 1
            found, key = lo, _hash(view[: lo * c])
        if not found:
            return None
        entry = index[key]
        end = found * c
        if 4 * found > len(entry.cuts) or entry.raw[:end] != raw[:end]:
            return None  # a hash collision
        at = 4 * (found - 1)
        cuts = entry.cuts
        if self._kind_ok[SPACE] and cuts[at]:
            p, k = cuts[at], cuts[at + 1]
            kind = SPECIAL if p == cuts[at + 2] else SPACE
        else:
            p, k, kind = cuts[at + 2], cuts[at + 3], SPECIAL
        if not p or not self._kind_ok[kind]:
            return None
        if SPACE in (kind, entry.kind):
            kind = SPACE
        # Re-own the path, so that evicting whoever indexed it first keeps it indexed.
        self._lru.move_to_end(entry)
        index.update(zip(entry.keys[:found], repeat(entry)))
        return entry, found, p, k, kind

    def _list(self, entry: _Entry, k: int) -> list[int]:
        """entry.ids[:k] (all for k < 0) as a new list, from the entry's list if it has
        one; the entry gets one (on its first hit, at the cost of the plain tolist)."""
        with self._lock:
            lst = self._lists.get(entry)
            if lst is not None:
                self._lists.move_to_end(entry)
                return lst[:k] if k >= 0 else lst[:]
        lst = entry.ids.tolist()
        if len(lst) <= self.max_list_tokens:
            with self._lock:
                if entry in self._lru and entry not in self._lists:
                    self._lists[entry] = lst
                    self._list_tokens += len(lst)
                    while self._list_tokens > self.max_list_tokens:
                        _, dropped = self._lists.popitem(last=False)
                        self._list_tokens -= len(dropped)
        return lst[:k] if k >= 0 else lst[:]

    def _add(self, entry: _Entry, shared: int) -> None:
        """Index a new entry (its first `shared` keys are indexed already) and evict the
        least recently used entries past the token budget. Called with the lock held."""
        if not (self._kind_ok[SPACE] or self._kind_ok[SPECIAL]):
            return
        if entry.kind is not None and not self._kind_ok[entry.kind]:
            return  # spliced in another thread while that kind was found wrong
        self._lru[entry] = None
        self.cached_tokens += len(entry.ids)
        index = self._index
        for key in entry.keys[shared:]:
            index.setdefault(key, entry)
        self._exact[_hash(entry.raw)] = entry
        while self.cached_tokens > self.max_cached_tokens and self._lru:
            old, _ = self._lru.popitem(last=False)
            lst = self._lists.pop(old, None)
            if lst is not None:
                self._list_tokens -= len(lst)
            self.cached_tokens -= len(old.ids)
            for key in old.keys:
                if index.get(key) is old:
                    del index[key]
            h = _hash(old.raw)
            if self._exact.get(h) is old:
                del self._exact[h]

    def _insert_spliced(
        self,
        parent: _Entry,
        i: int,
        p: int,
        k: int,
        kind: int,
        raw: bytes,
        enc: tokenizers.Encoding,
        rest_ids: list[int],
    ) -> None:
        """Cache a spliced prompt that extends past its parent's matched boundary `i`:
        the next turn of a conversation starts with it."""
        n = len(raw) // self.chunk
        if k + len(rest_ids) > self.max_cached_tokens:
            return
        ids = parent.ids[:k]
        ids.fromlist(rest_ids)
        rest_raw = raw[p:]
        at = 4 * (i - 1)
        cuts = parent.cuts[: at + 4]
        offsets = TokenBoundaries(enc, 0, len(rest_ids), len(rest_ids) / max(1, len(rest_raw)))
        chars = CharPositions(rest_raw, self.chunk)
        cuts += self._cuts(raw, chars, offsets, rest_ids, i + 1, n, p, cuts[at:], k)
        keys = parent.keys[:i] + _prefix_keys(raw, self.chunk, i, n)
        with self._lock:
            self._add(_Entry(raw, ids, keys, cuts, kind), i)

    def _cuts(
        self,
        raw: bytes,
        chars: CharPositions,
        offsets: TokenBoundaries,
        ids: Sequence[int],
        first: int,
        last: int,
        origin: int,
        prev: list[int],
        base_tokens: int = 0,
    ) -> list[int]:
        """Cut records for boundaries first..last of `raw`, with cuts only after byte
        `origin`, where the encoding `offsets` (of `raw[origin:]`, ids `ids`) starts;
        `prev` is the record of boundary first-1. Token counts get `base_tokens` added."""
        c, margin = self.chunk, self.margin
        specials: list[tuple[int, int]] = []
        if self._special_re is not None:
            sid = self._special_ids
            specials = [
                (m.start(), sid[m.group()])
                for m in self._special_re.finditer(raw, origin)
                if m.start() > origin
            ]
        si, n_specials = 0, len(specials)
        any_p, any_k, sp_p, sp_k = prev
        lo = max(origin, (first - 1) * c - margin - 1)  # the previous boundary's limit
        out: list[int] = []
        for i in range(first, last + 1):
            limit = i * c - margin - 1
            if limit > lo:
                # the last special in (lo, limit] that the encoding split out
                while si < n_specials and specials[si][0] <= limit:
                    pos, tid = specials[si]
                    si += 1
                    if pos > lo:
                        j = offsets.tokens_before(chars(pos - origin))
                        if j is not None and j < len(ids) and ids[j] == tid:
                            sp_p, sp_k = pos, j + base_tokens
                if sp_p > any_p:
                    any_p, any_k = sp_p, sp_k
                # the last space cut in (lo, limit] after that
                floor = max(lo, any_p)
                p = raw.rfind(b" ", floor + 1, limit + 1)
                tries = 0
                while p > floor and tries < _MAX_SPACE_TRIES:
                    if not _is_space_before(raw, p):
                        tries += 1
                        j = offsets.tokens_before(chars(p - origin))
                        if j is not None:
                            any_p, any_k = p, j + base_tokens
                            break
                    p = raw.rfind(b" ", floor + 1, p)
                lo = limit
            out += (any_p, any_k, sp_p, sp_k)
        return out


def _join(head: tuple[int, ...], ids: Ids, rest: list[int] | None, tail: tuple[int, ...]) -> Ids:
    """head + ids + rest + tail, extending `ids` (a fresh list or array) in place."""
    if head:
        ids[:0] = array("I", head) if isinstance(ids, array) else list(head)
    if rest:
        if isinstance(ids, array):
            ids.fromlist(rest)
        else:
            ids += rest
    if tail:
        if isinstance(ids, array):
            ids.fromlist(list(tail))
        else:
            ids += tail
    return ids


# ---------------------------------------------------------------------------- helpers
def _prefix_keys(raw: bytes, chunk: int, done: int, last: int) -> list[int]:
    """Hashes of raw[:i*chunk] for i in done+1..last (streaming from 0 when that is
    cheaper than hashing each prefix on its own)."""
    if last <= done:
        return []
    if done == 0 or last - done > 8:
        h = xxhash.xxh3_64()
        view = memoryview(raw)
        keys = []
        for i in range(1, last + 1):
            h.update(view[(i - 1) * chunk : i * chunk])
            if i > done:
                keys.append(h.intdigest())
        return keys
    view = memoryview(raw)
    return [_hash(view[: i * chunk]) for i in range(done + 1, last + 1)]


def _is_space_before(raw: bytes, p: int) -> bool:
    """Whether the character before byte `p` is whitespace (or there is none)."""
    if p <= 0:
        return True
    b = raw[p - 1]
    if b < 0x80:
        return b in _WS
    s = p - 1
    while s > 0 and p - s < 4 and 0x80 <= raw[s] < 0xC0:
        s -= 1
    try:
        return raw[s:p].decode().isspace()
    except UnicodeDecodeError:
        return True


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1
