"""The pair's advert: wire format, authentication and replay guard. Pure: no sockets, no asyncio.

Wire format, version 1 (network byte order, 71 + len(node) bytes)::

    magic     4s  b"LBEL"
    version   B   1
    role      B   1 passive, 2 active
    priority  B   0-254 (0 = resign)
    flags     B   0 (reserved)
    interval  H   advert interval, ms (1-65535)
    healthy   I   healthy backends
    seq       Q   per-boot sequence number, starts at 1, strictly increasing
    boot_id   Q   random 64-bit, new on every process start
    time_ms   Q   sender's wall clock, ms since the Unix epoch
    node_len  B   then node_len bytes of UTF-8 node address
    mac       32s HMAC-SHA256(secret, every byte before it)

Receiving: length, magic, version, MAC (constant-time), fields, then replay. Anything that
fails is dropped and counted, never raised. Replay protection, per node:

* same boot id: accept only seq > last accepted seq;
* a boot id not seen before (first packet, or the peer restarted): accept only if its
  timestamp is within +-30 s (``replay_window``) of our wall clock, so a captured packet is
  only replayable within that window after we restart; the pair needs clocks within 30 s
  (NTP). Boot ids that were replaced are remembered (last 8) and refused.

The MAC authenticates the pair, not each node: anyone holding the shared secret can speak for
either side. The source address of a packet is not checked (NAT-friendly); the MAC is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from balancer.pair.election import MAX_PRIORITY, Advert, Role

log = logging.getLogger("balancer.pair")  # one logger for the subsystem

MAGIC = b"LBEL"
VERSION = 1
MAC_LEN = 32
_HEADER = struct.Struct("!4sBBBBHIQQQB")
MIN_LEN = _HEADER.size + MAC_LEN
MAX_NODE_LEN = 255
_ROLE_CODES: dict[Role, int] = {"passive": 1, "active": 2}
_CODE_ROLES: dict[int, Role] = {v: k for k, v in _ROLE_CODES.items()}
DEFAULT_REPLAY_WINDOW = 30.0
_U64 = 2**64

# Names of the drop counters; all start at zero so the admin API shows every one.
DROP_REASONS = ("truncated", "bad_magic", "bad_version", "bad_mac", "malformed", "replay", "stale")


class AdvertError(Exception):
    """A packet to drop; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    advert: Advert
    seq: int
    boot_id: int
    timestamp_ms: int


def encode(envelope: Envelope, secret: bytes) -> bytes:
    adv = envelope.advert
    node = adv.node.encode()
    if len(node) > MAX_NODE_LEN:
        raise ValueError(f"node address longer than {MAX_NODE_LEN} bytes")
    interval_ms = min(65535, max(1, round(adv.interval * 1000)))
    body = _HEADER.pack(
        MAGIC,
        VERSION,
        _ROLE_CODES[adv.role],
        adv.priority,
        0,
        interval_ms,
        min(adv.healthy_backends, 2**32 - 1),
        envelope.seq,
        envelope.boot_id,
        envelope.timestamp_ms,
        len(node),
    )
    body += node
    return body + sign(body, secret)


def sign(body: bytes, secret: bytes) -> bytes:
    """The MAC that follows ``body`` on the wire."""
    return hmac.digest(secret, body, hashlib.sha256)


def authenticate(data: bytes, secret: bytes) -> bytes:
    """``data`` without its MAC if the MAC is right (constant-time); AdvertError otherwise."""
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if len(data) < MAC_LEN or not hmac.compare_digest(mac, sign(body, secret)):
        raise AdvertError("bad_mac", "MAC mismatch")
    return body


def decode(data: bytes, secret: bytes) -> Envelope:
    """Parse and authenticate one packet; raises AdvertError (only) on anything wrong."""
    if len(data) < MIN_LEN:
        raise AdvertError("truncated", f"{len(data)} bytes")
    if data[:4] != MAGIC:
        raise AdvertError("bad_magic", repr(data[:4]))
    if data[4] != VERSION:
        raise AdvertError("bad_version", f"version {data[4]}")
    (_, _, role_code, priority, _, interval_ms, healthy, seq, boot_id, ts_ms, node_len) = (
        _HEADER.unpack_from(data)
    )
    if len(data) != MIN_LEN + node_len:
        raise AdvertError("truncated", f"{len(data)} bytes, expected {MIN_LEN + node_len}")
    body = authenticate(data, secret)
    role = _CODE_ROLES.get(role_code)
    if role is None or priority > MAX_PRIORITY or interval_ms == 0 or node_len == 0:
        raise AdvertError("malformed", "field out of range")
    try:
        node = body[_HEADER.size :].decode()
    except UnicodeDecodeError as exc:
        raise AdvertError("malformed", "node is not UTF-8") from exc
    advert = Advert(
        node=node,
        priority=priority,
        interval=interval_ms / 1000,
        role=role,
        healthy_backends=healthy,
    )
    return Envelope(advert=advert, seq=seq, boot_id=boot_id, timestamp_ms=ts_ms)


@dataclass
class _PeerBoot:
    boot_id: int
    last_seq: int
    retired: deque[int]


class ReplayGuard:
    """Per-node (boot id, last seq) memory; see the module docstring for the rules."""

    def __init__(self, window_s: float = DEFAULT_REPLAY_WINDOW, max_nodes: int = 16) -> None:
        self.window_ms = window_s * 1000
        self.max_nodes = max_nodes
        self._nodes: dict[str, _PeerBoot] = {}

    def check(self, env: Envelope, wall_ms: float) -> str | None:
        """None to accept (and remember), else the drop reason."""
        node = env.advert.node
        state = self._nodes.get(node)
        if state is not None and env.boot_id == state.boot_id:
            if env.seq <= state.last_seq:
                return "replay"
            state.last_seq = env.seq
            return None
        if state is not None and env.boot_id in state.retired:
            return "replay"
        if abs(env.timestamp_ms - wall_ms) > self.window_ms:
            return "stale"
        if state is None:
            if len(self._nodes) >= self.max_nodes:
                del self._nodes[next(iter(self._nodes))]  # forget the oldest node
            self._nodes[node] = _PeerBoot(env.boot_id, env.seq, deque(maxlen=8))
        else:
            state.retired.append(state.boot_id)
            state.boot_id, state.last_seq = env.boot_id, env.seq
        return None


class AdvertCodec:
    """Stateful codec: stamps our seq/boot id/time, verifies and de-duplicates theirs."""

    def __init__(
        self,
        secret: bytes,
        *,
        boot_id: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        if not secret:
            raise ValueError("shared secret must not be empty")
        self._secret = secret
        self.boot_id = secrets.randbits(64) if boot_id is None else boot_id % _U64
        self._wall = wall_clock
        self._seq = 0
        self.guard = ReplayGuard(replay_window)
        self.counters: dict[str, int] = {"sent": 0, "received": 0, "accepted": 0}
        self.counters.update(dict.fromkeys(DROP_REASONS, 0))

    def pack(self, advert: Advert) -> bytes:
        self._seq += 1
        env = Envelope(advert, self._seq, self.boot_id, int(self._wall() * 1000))
        self.counters["sent"] += 1
        return encode(env, self._secret)

    def unpack(self, data: bytes) -> Advert | None:
        """The advert, or None if the packet was dropped (and counted). Never raises."""
        self.counters["received"] += 1
        try:
            env = decode(bytes(data), self._secret)
            reason = self.guard.check(env, self._wall() * 1000)
        except AdvertError as exc:
            reason = exc.reason
        except Exception:  # a decoder bug must not take the election down
            log.exception("advert decoding failed")
            reason = "malformed"
        if reason is not None:
            self.counters[reason] += 1
            return None
        self.counters["accepted"] += 1
        return env.advert
