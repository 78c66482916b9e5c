"""When a streaming vLLM server sends an SSE chunk: the one rule the simulated server
(`sim/server.py`, which writes the chunks) and the virtual-time simulation
(`bench/simulate.py`, which times them for TTFT and ITL) both follow."""

from __future__ import annotations


def chunk_due(unsent: int, interval: int, *, first: bool, finished: bool) -> bool:
    """Whether the tokens generated so far go out in a chunk now: the first token at once,
    then whenever `interval` tokens (`--stream-interval`) are waiting, and at the end.
    `unsent`: the tokens generated since the last chunk."""
    return first or finished or unsent >= interval
