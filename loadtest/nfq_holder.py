"""The NFQUEUE delay holder: a small process, run inside a backend's network namespace,
that binds one netfilter queue and accepts each queued packet `delay_ms` (± jitter) later.
Used by `loadtest.impair` where the kernel has no sch_netem.

    ip netns exec NS python -m loadtest.nfq_holder --queue 0 --delay-ms 50 --owner PID

It prints `ready` once bound. It is bounded: at most --max-len packets wait (more are
dropped), it exits after --max-seconds, when its owner dies (PR_SET_PDEATHSIG, and a
parent-pid check; --owner 0 in a compose helper container, which `docker rm -f` stops)
and on SIGTERM/SIGINT, accepting what it still holds. The iptables
rule uses `--queue-bypass`, so packets flow (undelayed) whenever no holder is bound.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import sys
import time
from types import FrameType

from loadtest import nfq_codec as nfq

PR_SET_PDEATHSIG = 1
RECV_BURST = 512  # datagrams read per wake-up, at most
POLL_S = 0.2  # longest sleep: the owner and stop checks run at least this often


def die_with_parent(owner: int) -> None:
    """SIGTERM this process when its parent dies; exit now if the owner is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if owner and os.getppid() != owner:
        sys.exit(0)


class Holder:
    def __init__(self, queue: int, line: nfq.DelayLine) -> None:
        self.queue = queue
        self.line = line
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nfq.NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.overruns = 0

    def _request(self, data: bytes) -> None:
        """Send a config message and wait (bounded) for its ack."""
        self.sock.sendall(data)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            for msg in nfq.parse(self.sock.recv(65536)):
                if msg.kind == "error":
                    if msg.errno:
                        raise OSError(msg.errno, os.strerror(msg.errno))
                    return
        raise OSError(errno.ETIMEDOUT, "no ack from nfnetlink_queue")

    def bind(self, maxlen: int) -> None:
        self.seq += 1
        self._request(nfq.config_cmd(self.queue, nfq.NFQNL_CFG_CMD_BIND, seq=self.seq))
        self.seq += 1
        self._request(nfq.config_params(self.queue, maxlen=maxlen, seq=self.seq))

    def _verdict(self, packet_id: int, accept: bool) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(nfq.verdict(self.queue, packet_id, accept))

    def _read(self, now: float) -> None:
        for _ in range(RECV_BURST):
            try:
                buf = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel outran us: packets were lost
                    self.overruns += 1
                    continue
                raise
            for msg in nfq.parse(buf):
                if msg.kind == "packet" and msg.packet_id is not None:
                    if not self.line.push(msg.packet_id, now):
                        self._verdict(msg.packet_id, False)

    def run(self, stop_at: float, owner: int, stopping: list[bool]) -> None:
        while not stopping and time.monotonic() < stop_at and owner in (0, os.getppid()):
            now = time.monotonic()
            nxt = self.line.next_due()
            wait = POLL_S if nxt is None else min(POLL_S, max(0.0, nxt - now))
            ready, _, _ = select.select([self.sock], [], [], wait)
            now = time.monotonic()
            if ready:
                self._read(now)
            for pid in self.line.due(now):
                self._verdict(pid, True)
        for pid in self.line.due(float("inf")):  # let go of what is held
            self._verdict(pid, True)
        self.seq += 1
        with contextlib.suppress(OSError):
            self.sock.send(nfq.config_cmd(self.queue, nfq.NFQNL_CFG_CMD_UNBIND, seq=self.seq))
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.nfq_holder", description=__doc__)
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--max-len", type=int, default=10_000)
    ap.add_argument("--max-seconds", type=float, default=6 * 3600.0)
    ap.add_argument(
        "--owner",
        type=int,
        required=True,
        help="pid of the process to die with; 0 in a helper container (docker rm -f stops it)",
    )
    a = ap.parse_args(argv)
    if a.delay_ms < 0 or a.jitter_ms < 0 or a.max_len < 1 or not 0 <= a.queue < 65536:
        ap.error("delay/jitter must be >= 0, max-len >= 1, queue within 0..65535")
    die_with_parent(a.owner)
    stopping: list[bool] = []

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    line = nfq.DelayLine(a.delay_ms / 1000, a.jitter_ms / 1000, a.max_len)
    try:
        holder = Holder(a.queue, line)
        holder.bind(a.max_len)
    except (OSError, nfq.CodecError) as exc:
        print(f"nfq_holder: cannot bind queue {a.queue}: {exc}", file=sys.stderr)
        return 2
    print("ready", flush=True)
    holder.run(time.monotonic() + a.max_seconds, a.owner, stopping)
    print(
        f"nfq_holder: released {line.released}, dropped {line.dropped}, overruns {holder.overruns}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
