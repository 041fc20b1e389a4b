"""The transport operations of `balancer.http1.output.Output`, on an asyncio transport."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from balancer.http1.output import Batch
from balancer.lab.table import ConnRecord


def loop_batch(loop: asyncio.AbstractEventLoop) -> Batch:
    """A write batch flushed by the loop once per turn, after the events of that turn."""
    batch = Batch(lambda: None)

    def wake() -> None:
        loop.call_soon(batch.flush)

    batch.wake = wake
    return batch


LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s


class TransportOps:
    """Mixed into a connection core, before `asyncio.Protocol`: the core decides, this acts."""

    transport: asyncio.Transport
    rec: ConnRecord | None = None  # the network lab's record (who sent the first FIN)

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _pause_reading(self) -> None:
        self.transport.pause_reading()

    def _resume_reading(self) -> None:
        self.transport.resume_reading()

    def _write_eof(self) -> bool:
        t = self.transport
        if not t.can_write_eof():
            return False
        rec = self.rec
        if rec is not None and rec.fin is None:
            rec.fin = "balancer"
        t.write_eof()
        return True

    def _close_transport(self) -> None:
        rec = self.rec
        if rec is not None and rec.fin is None:
            rec.fin = "balancer"
        self.transport.close()

    def _abort_transport(self) -> None:
        # abort() alone drops the buffer but still ends with a FIN; SO_LINGER 0 makes it a RST
        sock = self.transport.get_extra_info("socket")
        rec = self.rec
        if rec is not None and rec.fin is None:
            rec.fin = "reset"
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()


def nodelay(transport: asyncio.BaseTransport) -> None:
    # head and body leave in separate writes; Nagle + delayed ACK would stall them 40 ms
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
