"""The NFQUEUE netlink protocol (nfnetlink_queue), pure: bytes in, bytes out, no sockets.

Enough of it for a userspace delay line: bind a queue, ask for packet metadata only
(copy mode META), read each queued packet's id, answer with a verdict (ACCEPT or DROP).
Layout, as in <linux/netlink.h>, <linux/netfilter/nfnetlink.h> and
<linux/netfilter/nfnetlink_queue.h>:

    nlmsghdr   len u32, type u16, flags u16, seq u32, pid u32     (host order)
    nfgenmsg   family u8, version u8, res_id u16 (queue number)   (res_id big-endian)
    nlattr*    len u16, type u16 (host order), payload padded to 4 bytes
               (payloads of the queue attributes are big-endian)

`DelayLine` is the holder's clock-injected core: when each packet id is due for release.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNETLINK_V0 = 0
AF_UNSPEC = 0
AF_INET = 2

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_DROP = 0
NF_ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_HDR_LEN = _NLMSGHDR.size + _NFGENMSG.size  # 20


class CodecError(ValueError):
    """Bytes that are not a well-formed netlink message."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One nlattr, padded to 4 bytes."""
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align4(len(raw)) - len(raw))


def nfq_message(
    msg: int, queue: int, attrs: bytes, *, seq: int, flags: int = NLM_F_REQUEST
) -> bytes:
    body = _NFGENMSG.pack(AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def config_cmd(queue: int, command: int, *, seq: int) -> bytes:
    """Bind (or unbind) this socket to `queue`; the kernel acks (NLM_F_ACK)."""
    payload = struct.pack("!BxH", command, AF_INET)
    return nfq_message(
        NFQNL_MSG_CONFIG,
        queue,
        attr(NFQA_CFG_CMD, payload),
        seq=seq,
        flags=NLM_F_REQUEST | NLM_F_ACK,
    )


def config_params(queue: int, *, maxlen: int, seq: int) -> bytes:
    """Copy mode META (no payload bytes) and the kernel-side queue bound."""
    params = struct.pack("!IB", 0, NFQNL_COPY_META)
    attrs = attr(NFQA_CFG_PARAMS, params) + attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
    return nfq_message(NFQNL_MSG_CONFIG, queue, attrs, seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK)


def verdict(queue: int, packet_id: int, accept: bool, *, seq: int = 0) -> bytes:
    payload = struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
    return nfq_message(NFQNL_MSG_VERDICT, queue, attr(NFQA_VERDICT_HDR, payload), seq=seq)


@dataclass(frozen=True)
class Message:
    """One decoded netlink message: `kind` 'packet' (with `packet_id`), 'error' (with
    `errno`, 0 for an ack), 'done' or 'other'."""

    kind: str
    seq: int
    packet_id: int | None = None
    queue: int | None = None
    errno: int | None = None


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, off)
        if length < _NLATTR.size or off + length > len(data):
            raise CodecError(f"bad attribute length {length} at {off}")
        yield kind & 0x3FFF, data[off + _NLATTR.size : off + length]
        off += _align4(length)


def parse(buf: bytes) -> list[Message]:
    """Every message in one datagram read from the netlink socket."""
    out: list[Message] = []
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            raise CodecError(f"bad message length {length} at {off}")
        body = buf[off + _NLMSGHDR.size : off + length]
        off += _align4(length)
        if kind == NLMSG_ERROR:
            if len(body) < 4:
                raise CodecError("short error message")
            (err,) = struct.unpack_from("=i", body)
            out.append(Message("error", seq, errno=-err))
        elif kind == NLMSG_DONE:
            out.append(Message("done", seq))
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            if len(body) < _NFGENMSG.size:
                raise CodecError("short queue message")
            _fam, _ver, queue = _NFGENMSG.unpack_from(body)
            pid = None
            for akind, payload in _attrs(body[_NFGENMSG.size :]):
                if akind == NFQA_PACKET_HDR and len(payload) >= 4:
                    (pid,) = struct.unpack_from("!I", payload)
            if pid is None:
                raise CodecError("queued packet without a packet header")
            out.append(Message("packet", seq, packet_id=pid, queue=queue))
        else:
            out.append(Message("other", seq))
    if off < len(buf) and buf[off:].strip(b"\0"):
        raise CodecError(f"{len(buf) - off} trailing bytes")
    return out


@dataclass
class DelayLine:
    """Release each packet `delay_s` (± `jitter_s`, uniform) after it arrived, never
    before the packet queued ahead of it (one FIFO: order is kept, so per flow too).
    At most `max_len` packets wait; beyond that `push` answers False (drop it)."""

    delay_s: float
    jitter_s: float = 0.0
    max_len: int = 10_000
    rng: random.Random = field(default_factory=random.Random)
    _q: deque[tuple[float, int]] = field(default_factory=deque)
    _last: float = 0.0
    dropped: int = 0
    released: int = 0

    def push(self, packet_id: int, now: float) -> bool:
        if len(self._q) >= self.max_len:
            self.dropped += 1
            return False
        jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        due = max(now + max(0.0, self.delay_s + jitter), self._last)
        self._last = due
        self._q.append((due, packet_id))
        return True

    def due(self, now: float) -> list[int]:
        """The ids to release now, in arrival order."""
        out = []
        while self._q and self._q[0][0] <= now:
            out.append(self._q.popleft()[1])
        self.released += len(out)
        return out

    def next_due(self) -> float | None:
        return self._q[0][0] if self._q else None

    def __len__(self) -> int:
        return len(self._q)
