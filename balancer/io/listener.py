"""Listener drivers other than the proxy's own: the HTTP→HTTPS redirect, the access log."""

from __future__ import annotations

import asyncio
import sys
from typing import IO, cast

from balancer.http1.redirect import Redirect


class RedirectProtocol(asyncio.Protocol):
    """A plain-HTTP listener that sends everyone to HTTPS with 308."""

    def __init__(self, https_port: int) -> None:
        self.redirect = Redirect(https_port)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        answer = self.redirect.feed(data)
        t = self.transport
        if answer is not None and t is not None and not t.is_closing():
            t.write(answer)
            t.close()


class AccessLog:
    """The access-log sink: `-` for stdout, a path to append to (line-buffered)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.out: IO[str] = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115

    def __call__(self, line: str) -> None:
        self.out.write(line + "\n")

    def close(self) -> None:
        if self.out is not sys.stdout:
            self.out.close()


def access_log_sink(target: str | None) -> AccessLog | None:
    """None for no access log."""
    return None if target is None else AccessLog(target)
