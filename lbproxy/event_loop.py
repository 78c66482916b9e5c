"""`run_loop`: how every long-running command (serve, sim, demo) runs its coroutine.

A module of its own so that subcommands need not import `lbproxy.cli` (no import cycle).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_loop(coro: Coroutine[Any, Any, None], loop: str = "auto") -> None:
    """Run `coro` on uvloop when asked for or, with "auto", when it is installed."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError as e:
            if loop == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed") from e
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)
