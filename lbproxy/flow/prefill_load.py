"""What one backend of a P/D pool runs for split requests, for flow control's P/D rules.

A prefill leg is judged apart from the decode-latency limit (`flow.limiter`): a prefill
engine normally has prompts waiting, and the time a new prompt waits there is the
uncached prompt tokens queued ahead of it over the backend's prefill rate. Both are
counted here from flow control's own accounting, so they agree with each other (the
routing's estimate of what a backend has cached is in both):

- `legs`, `tokens`: prefill legs in flight and their uncached prompt tokens;
- `rate`: uncached prompt tokens of the legs that ended, per second of time the backend
  had prefill legs in flight (an exponentially weighted count over ~10 s of it, known once
  it has 2 s and 3 legs behind it): what it prefills while it has work, which for a
  `role: both` backend counts the decoding it does meanwhile;
- `reserved`: decode slots counted for split requests whose prefill still runs (the
  engine does not run them yet, which its `running` count must not be expected to show);
- `seen_legs`: the most prefill legs it had in flight since its last scrape.
"""

from __future__ import annotations

import math

_TAU = 10.0  # seconds of prefill work the rate is averaged over
_MIN_TIME = 2.0
_MIN_LEGS = 3.0


class PrefillLoad:
    __slots__ = ("_busy", "_done", "_n", "_t", "legs", "reserved", "seen_legs", "tokens")

    def __init__(self) -> None:
        self.legs = 0
        self.tokens = 0
        self.reserved = 0
        self.seen_legs = 0
        self._t: float | None = None  # last time the busy clock was advanced
        self._busy = 0.0  # decayed seconds with prefill legs in flight
        self._done = 0.0  # decayed uncached tokens of the legs that prefilled
        self._n = 0.0  # decayed count of those legs

    def _advance(self, now: float | None) -> None:
        if now is None:
            return
        t, self._t = self._t, now
        if t is None or now <= t or not self.legs:
            return
        d = math.exp(-(now - t) / _TAU)
        self._busy = self._busy * d + _TAU * (1.0 - d)
        self._done *= d
        self._n *= d

    def started(self, tokens: int, now: float | None) -> None:
        self._advance(now)
        self.legs += 1
        self.tokens += tokens
        if self.legs > self.seen_legs:
            self.seen_legs = self.legs

    def ended(self, tokens: int, now: float | None, done: bool) -> None:
        """A leg counted by `started` ended; `done`: it prefilled (else it failed or was
        abandoned, and says nothing of the rate)."""
        self._advance(now)
        self.legs = max(0, self.legs - 1)
        self.tokens = max(0, self.tokens - tokens)
        if done and now is not None:
            self._done += tokens
            self._n += 1.0

    def rate(self) -> float | None:
        """Uncached prompt tokens prefilled per second while busy; None until measured."""
        if self._busy < _MIN_TIME or self._n < _MIN_LEGS or self._done <= 0:
            return None
        return self._done / self._busy

    def scraped(self) -> int:
        """A scrape landed: the most legs it had since the last one (then reset)."""
        seen, self.seen_legs = self.seen_legs, self.legs
        return seen
