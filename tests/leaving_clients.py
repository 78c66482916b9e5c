"""Clients that give up: for the storm tests of flow control (tests/test_flow_proxy.py,
tests/test_pd_flow.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from multidict import CIMultiDictProxy


async def send_as(
    post: Any, kind: str, seen: Counter[str], leave_within: float
) -> tuple[int, CIMultiDictProxy[str], bytes] | None:
    """Send `post` (an aiohttp request not yet awaited) as a client of `kind`:
    `leave_queued` gives up within `leave_within` s, answered or not; `leave_mid` leaves
    after the first piece of a 200; any other reads the whole answer: (status, headers,
    body). None when the client left; `seen` counts how each leaving client went."""
    if kind == "leave_queued":
        try:
            async with asyncio.timeout(leave_within):
                async with post as r:
                    await r.read()
            seen["leave_queued answered"] += 1
        except TimeoutError:
            seen["leave_queued left"] += 1
        return None
    async with post as r:
        if kind == "leave_mid" and r.status == 200:
            await r.content.readany()
            seen["leave_mid left"] += 1
            return None
        return r.status, r.headers, await r.read()
