"""SIGHUP while `lbproxy serve` starts.

SIGHUP's default action ends a process at once (exit 129, nothing logged), and the
reload handler exists only once the proxy serves. `hold()` installs, as early as
possible, a handler that only notes the signal; `run_until_signalled` then `take()`s it:
a SIGHUP noted during start-up is logged and reloads the config once the proxy serves
(the file may have changed after start-up read it). No imports beyond the standard
library: the console script calls `hold()` before importing the rest of lbproxy.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_held = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _held
    _held = True  # only a flag: a signal handler must not log (the log lock may be held)


def hold() -> None:
    """Note SIGHUPs instead of dying from them, until the serving loop takes over."""
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, _note)


def take() -> bool:
    """Whether a SIGHUP was noted since `hold()`; clears the note."""
    global _held
    held, _held = _held, False
    return held
