"""Positions in a prompt for the token cache's cuts: byte -> character (`CharPositions`)
and character -> token boundary of an encoding (`TokenBoundaries`)."""

from __future__ import annotations

import tokenizers

# Bytes that start a UTF-8 character (everything but continuation bytes 0x80-0xBF).
_STARTS = bytes(range(0x80)) + bytes(range(0xC0, 0x100))


class CharPositions:
    """Byte position -> character position in a UTF-8 text (identity for ASCII)."""

    __slots__ = ("ascii", "chunk", "cum", "raw")

    def __init__(self, raw: bytes, chunk: int) -> None:
        self.raw = raw
        self.ascii = raw.isascii()
        self.chunk = chunk
        self.cum: list[int] = []
        if not self.ascii:  # continuation bytes before each chunk start
            cum, n = [0], 0
            for i in range(0, len(raw), chunk):
                n += len(raw[i : i + chunk].translate(None, _STARTS))
                cum.append(n)
            self.cum = cum

    def __call__(self, p: int) -> int:
        if self.ascii:
            return p
        j = p // self.chunk
        return p - self.cum[j] - len(self.raw[j * self.chunk : p].translate(None, _STARTS))


class TokenBoundaries:
    """Token boundaries of an encoding by character position: a search over
    `token_to_chars` (cheap) instead of materialising every offset (about 1 ms for 7k).

    Queries that find a boundary must come in increasing order; each search starts
    from a guess (the last boundary plus the characters since times `ratio`, tokens
    per character) and gallops, so it costs a handful of calls."""

    __slots__ = ("end", "last", "lo", "ratio", "spans", "start")

    def __init__(self, enc: tokenizers.Encoding, start: int, end: int, ratio: float) -> None:
        self.spans = enc.token_to_chars
        self.start = start  # first content token (after the post-processor's specials)
        self.end = end
        self.ratio = ratio
        self.lo = start  # the token at the last boundary found
        self.last = 0  # ... and its character position

    def tokens_before(self, pos: int) -> int | None:
        """The number of content tokens that start before character `pos`, if none of
        them reaches past it (a token boundary), else None."""
        spans, lo, end = self.spans, self.lo, self.end
        if lo >= end:
            return None
        g = min(end - 1, lo + int((pos - self.last) * self.ratio))
        s = spans(g)
        if s is None:
            return None
        # Bracket the first token starting at or after pos in (left, right].
        left_span: tuple[int, int] | None
        step = 1
        if s[0] < pos:
            left, left_span = g, s
            while True:
                j = left + step
                if j >= end:
                    right = end
                    break
                sj = spans(j)
                if sj is None:
                    return None
                if sj[0] >= pos:
                    right = j
                    break
                left, left_span, step = j, sj, step * 2
        else:
            right = g
            while True:
                j = right - step
                if j < lo:
                    left, left_span = lo - 1, None
                    break
                sj = spans(j)
                if sj is None:
                    return None
                if sj[0] < pos:
                    left, left_span = j, sj
                    break
                right, step = j, step * 2
        while right - left > 1:
            mid = (left + right) // 2
            sm = spans(mid)
            if sm is None:
                return None
            if sm[0] < pos:
                left, left_span = mid, sm
            else:
                right = mid
        # right_span may start after pos (a dropped or trimmed space): still a boundary.
        if left_span is None and right > self.start:
            left_span = spans(right - 1)
        if left_span is not None and left_span[1] > pos:
            return None  # a token straddles pos
        self.lo, self.last = right, pos
        return right - self.start
