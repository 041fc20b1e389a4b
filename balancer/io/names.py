"""Reverse DNS for discovered backends (the naming rule is balancer.lb.names)."""

from __future__ import annotations

import asyncio
import logging
import socket

from balancer.lb.names import replica_name

log = logging.getLogger("balancer")

REVERSE_TIMEOUT = 2.0  # seconds; Docker's DNS answers at once, anything slower is no answer


async def reverse_name(loop: asyncio.AbstractEventLoop, addr: str) -> str | None:
    """The PTR name of `addr`, or None (no answer, an error, or too slow)."""
    try:
        host, _ = await asyncio.wait_for(
            loop.getnameinfo((addr, 0), socket.NI_NAMEREQD), REVERSE_TIMEOUT
        )
    except (OSError, UnicodeError, TimeoutError) as exc:
        log.debug("reverse lookup of %s: %s", addr, exc)
        return None
    return str(host)


async def reverse_replica_name(
    loop: asyncio.AbstractEventLoop, addr: str, service: str
) -> str | None:
    """`backend-3` when `addr` is the compose replica 3 of `service`, else None."""
    ptr = await reverse_name(loop, addr)
    return replica_name(ptr, service) if ptr is not None else None
