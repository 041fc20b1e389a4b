"""Batched writes and the transport operations a connection core asks its driver for.

Cores in this package never touch a socket. They queue bytes with `_send`; the listener's
`flush` (scheduled once per event-loop turn by the driver) hands each connection's queue to
`_write` in one piece. The underscore methods below the line are what a driver implements
(`balancer.io`), and what playbook tests record.
"""

from __future__ import annotations

from collections.abc import Callable


class Output:
    """A connection whose writes wait until the loop has handled its current batch of events.

    Each write to a local peer that sleeps in epoll wakes it (a cross-CPU interrupt). Sending
    at once, between the reads of one poll, wakes nginx or the client once per request;
    sending after the batch wakes it about once per batch, as HAProxy does. That costs one
    loop iteration of latency; in `make bench` it took a request from ~85 to ~45 us of CPU.
    """

    batch: Batch
    closed: bool
    out: list[bytes] | None

    def _send(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
            return
        self.out = [data]
        batch = self.batch  # runs for every response: no method call
        if not batch.dirty:
            batch.wake()
        batch.dirty.append(self)

    def flush(self) -> None:
        """Write what is waiting now; a close or half-close calls this first."""
        out = self.out
        if out is None:
            return
        self.out = None
        if not self.closed:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    # what the driver implements -----------------------------------------------------------
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        raise NotImplementedError

    def _write_eof(self) -> bool:
        """Half-close (send FIN); False when the transport cannot (TLS)."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        raise NotImplementedError

    def _abort_transport(self) -> None:
        """Close at once, dropping what is unsent, with a RST: after a FIN a truncated body
        that ends at the close would look complete."""
        raise NotImplementedError

    def unsent(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        raise NotImplementedError


class Batch:
    """The connections with queued writes, flushed together after the loop's batch of events.

    `wake` asks the driver to call `flush` once, after the events being handled now; a test
    passes a no-op and calls `flush` itself.
    """

    __slots__ = ("dirty", "wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.dirty: list[Output] = []

    def flush(self) -> None:
        dirty = self.dirty
        self.dirty = []
        for conn in dirty:
            conn.flush()
