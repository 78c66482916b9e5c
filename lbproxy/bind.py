"""Listening sockets: a taken port is one clear error, found before anything starts.

`probe_listen` binds and closes the address a server is about to listen on, so that a
caller can fail with `AddressInUse` ("port 8080 on 127.0.0.1 is already in use") before it
opens client sessions or starts background tasks that would then need tearing down.
"""

from __future__ import annotations

import asyncio
import errno

__all__ = ["AddressInUse", "address_in_use", "probe_listen"]


class AddressInUse(OSError):
    """EADDRINUSE whose str() is the message alone (no "[Errno 98]")."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return str(self.strerror)


def address_in_use(exc: OSError, host: str, port: int) -> OSError:
    """`exc` as AddressInUse when it is a bind failure on a taken port, else `exc`."""
    if exc.errno == errno.EADDRINUSE:
        return AddressInUse(f"port {port} on {host} is already in use")
    return exc


async def probe_listen(host: str | None, port: int) -> None:
    """Raise AddressInUse (or the bind's OSError) if `host:port` cannot be listened on.

    Binds as aiohttp's TCPSite does (SO_REUSEADDR), so a port in TIME_WAIT passes.
    Port 0 always can."""
    if port == 0:
        return
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(asyncio.Protocol, host or None, port, reuse_address=True)
    except OSError as e:
        raise address_in_use(e, host or "0.0.0.0", port) from None
    server.close()
    await server.wait_closed()
