"""Token ids for routing, computed before it, and off the event loop when they cost.

Routing is synchronous and reads `ctx.token_ids()`; a cold 7,000-token prompt takes
10-20 ms to encode, which on the event loop would stall every open stream. So the
forwarder calls `prepare_token_ids` first: what the prompt token cache answers cheaply
(`PromptTokenizer.array_or_prompt`) is computed inline, the rest on a small process-wide
thread pool whose encodes release the GIL. When its threads are busy, requests wait for
their ids in its queue: one item per waiting request (a client that goes away takes its
item out unless it is running), so nothing grows beyond the requests in flight.
"""

from __future__ import annotations

import asyncio
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from lbproxy.routing.state import RequestContext

if TYPE_CHECKING:
    from lbproxy.tokenization.token_cache import PromptTokenizer

# Encodes run in Rust without the GIL; their Python bookkeeping (cache cuts, keys) holds
# it, so more threads would mostly compete with the event loop for it.
TOKENIZE_THREADS = 2

_executor: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:  # created on first use: in the process (worker) that serves
        _executor = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="lbproxy-tokenize")
    return _executor


async def prepare_token_ids(tokenizer: PromptTokenizer, ctx: RequestContext) -> None:
    """Set the prompt's token ids on `ctx`: cache hits inline, misses in a thread."""
    out = tokenizer.array_or_prompt(ctx.body, ctx.route)
    if not isinstance(out, array):
        text, special = out
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(_threads(), tokenizer.encode_off_loop, text, special)
    ctx.set_token_ids(out)
