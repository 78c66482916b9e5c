"""Logging of repeating failures (scrapes, health checks, discovery) without a flood.

A backend that answers garbage fails every scrape, 4 times a second, each time with a
different error text. `FailureLog` logs, per key (an endpoint):

- the first failure as a WARNING;
- then at most one WARNING per `every` seconds, with the number of failures since the
  last line and the last error (every other failure goes to DEBUG);
- one INFO line when it recovers, with the failure count and how long it lasted.

Error texts may quote what the backend sent: `sanitize` them before they reach a log or
the dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable

__all__ = ["FailureLog", "sanitize"]


def sanitize(text: str, limit: int = 120) -> str:
    """`text` as one line of printable ASCII, at most `limit` characters: whatever a
    backend sent (random bytes, HTML, escape sequences) never reaches a log as is."""
    printable = "".join(c if " " <= c <= "~" else (" " if c.isspace() else "?") for c in text)
    line = " ".join(printable.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _Failing:
    __slots__ = ("last_logged", "since", "total", "unlogged")

    def __init__(self, now: float) -> None:
        self.since = now
        self.last_logged = now
        self.total = 1
        self.unlogged = 0  # failures since the last WARNING line


class FailureLog:
    """Per-key rate-limited failure logging; see the module docstring."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.what = what  # "metrics scrape", "health check", ...
        self.every = every
        self.clock = clock
        self._failing: dict[Hashable, _Failing] = {}

    def failing(self, key: Hashable) -> bool:
        return key in self._failing

    def failed(self, key: Hashable, label: str, error: str) -> None:
        now = self.clock()
        f = self._failing.get(key)
        if f is None:
            self._failing[key] = _Failing(now)
            self.log.warning("%s of %s failed: %s", self.what, label, error)
            return
        f.total += 1
        f.unlogged += 1
        if now - f.last_logged < self.every:
            self.log.debug("%s of %s failed: %s", self.what, label, error)
            return
        self.log.warning(
            "%s of %s still failing: %d failures in the last %.0fs, %d in all; last: %s",
            self.what,
            label,
            f.unlogged,
            now - f.last_logged,
            f.total,
            error,
        )
        f.last_logged = now
        f.unlogged = 0

    def recovered(self, key: Hashable, label: str) -> None:
        f = self._failing.pop(key, None)
        if f is not None:
            self.log.info(
                "%s of %s recovered after %d failures over %.1fs",
                self.what,
                label,
                f.total,
                self.clock() - f.since,
            )

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Forget keys not in `keys` (endpoints a reload removed)."""
        current = set(keys)
        for gone in [k for k in self._failing if k not in current]:
            del self._failing[gone]
