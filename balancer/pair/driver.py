"""Advert wire format and the asyncio UDP driver for balancer.election.

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

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import ipaddress
import logging
import math
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancer.config import split_hostport
from balancer.pair.election import (
    MAX_PRIORITY,
    Action,
    Advert,
    BecomeActive,
    BecomePassive,
    Election,
    ElectionConfig,
    Role,
    SendAdvert,
)

log = logging.getLogger(__name__)

MAGIC = b"LBEL"
VERSION = 1
MAC_LEN = 32
_HEADER = struct.Struct("!4sBBBBHIQQQB")
MIN_LEN = _HEADER.size + MAC_LEN
MAX_NODE_LEN = 255
_ROLE_CODES: dict[Role, int] = {"passive": 1, "active": 2}
_CODE_ROLES: dict[int, Role] = {v: k for k, v in _ROLE_CODES.items()}
DEFAULT_REPLAY_WINDOW = 30.0
CALLBACK_DRAIN_TIMEOUT = 5.0  # stop() waits this long for pending on_role_change calls
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
    return body + hmac.digest(secret, body, hashlib.sha256)


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
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.digest(secret, body, hashlib.sha256)):
        raise AdvertError("bad_mac", "MAC mismatch")
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
            log.exception("election: advert decoding failed")
            reason = "malformed"
        if reason is not None:
            self.counters[reason] += 1
            return None
        self.counters["accepted"] += 1
        return env.advert


# ----- configuration -------------------------------------------------------------------------


def load_secret(path: str | Path) -> bytes:
    """Read the shared secret; surrounding whitespace is ignored, empty is refused."""
    try:
        data = Path(path).read_bytes().strip()
    except FileNotFoundError:
        raise ValueError(f"secret file {path} not found") from None
    except OSError as exc:
        raise ValueError(f"secret file {path} unreadable: {exc.strerror}") from None
    if not data:
        raise ValueError(f"secret file {path} is empty")
    return data


def parse_hostport(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); the config's parser (one for all)."""
    return split_hostport(text, "address", wildcard=False)


def _same_endpoint(a: tuple[str, int], b: tuple[str, int]) -> bool:
    if a[1] != b[1]:
        return False
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return a[0].lower() == b[0].lower()


@dataclass(frozen=True)
class ValidatedPair:
    bind: tuple[str, int]
    peer: tuple[str, int]
    secret: bytes


def validate_pair_config(
    *,
    secret_file: str | Path | None,
    bind: str,
    peer: str,
    node: str | None = None,
) -> ValidatedPair:
    """Resolve the pair's addresses and secret; raises ValueError with a one-line message.

    Priority and advert interval come validated from balancer.config."""
    if not secret_file:
        raise ValueError("secret file is required")
    bind_ep, peer_ep = parse_hostport(bind), parse_hostport(peer)
    if _same_endpoint(bind_ep, peer_ep) or (
        node is not None and _same_endpoint((node, bind_ep[1]), peer_ep)
    ):
        raise ValueError(f"peer {peer} is this node itself")
    return ValidatedPair(bind=bind_ep, peer=peer_ep, secret=load_secret(secret_file))


# ----- asyncio driver ------------------------------------------------------------------------

RoleCallback = Callable[[str, str], Awaitable[None] | None]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, driver: ElectionDriver) -> None:
        self._driver = driver

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._driver._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while the peer is down: expected, just counted.
        self._driver.codec.counters["send_errors"] += 1


class ElectionDriver:
    """Runs an Election over UDP: adverts out to ``peer``, in on ``bind``, timers via call_at.

    ``on_role_change(role, reason)`` may be sync or async; calls run one at a time, in order,
    so a bind/unbind of the service address never overtakes the previous one.
    """

    def __init__(
        self,
        config: ElectionConfig,
        *,
        bind: tuple[str, int] | socket.socket,
        peer: tuple[str, int],
        secret: bytes,
        on_role_change: RoleCallback | None = None,
        boot_id: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        resign_copies: int = 3,
    ) -> None:
        self.config = config
        self._bind = bind
        self._peer = peer
        self._on_role_change = on_role_change
        self._resign_copies = max(1, resign_copies)
        self.codec = AdvertCodec(
            secret, boot_id=boot_id, wall_clock=wall_clock, replay_window=replay_window
        )
        self.codec.counters["send_errors"] = 0
        self.election: Election | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        # uvloop's call_at returns a plain Handle (no .when()) for a deadline already past,
        # so the deadline is kept here
        self._timer: asyncio.Handle | None = None
        self._timer_due = math.inf
        self._events: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self._notifier: asyncio.Task[None] | None = None
        self._stopping = False
        self._wall = wall_clock

    # ----- public ------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return "init" if self.election is None else self.election.role

    @property
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("driver not started")
        sockname = self._transport.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1]))

    def status(self) -> dict[str, Any]:
        if self.election is None or self._loop is None:
            return {"role": "init", "counters": dict(self.codec.counters)}
        out = self.election.status(self._loop.time()).as_dict()
        if out["last_transition"] is not None:  # wall time for humans; ages stay exact
            out["last_transition"]["at_unix"] = round(
                self._wall() - out["last_transition"]["ago_s"], 3
            )
        out["counters"] = dict(self.codec.counters)
        out["boot_id"] = f"{self.codec.boot_id:016x}"
        out["peer_address"] = f"{self._peer[0]}:{self._peer[1]}"
        return out

    async def start(self) -> None:
        if self._transport is not None or self._stopping:
            raise RuntimeError("driver already started (drivers are single-use)")
        loop = asyncio.get_running_loop()
        self._loop = loop
        if isinstance(self._bind, socket.socket):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=self._bind
            )
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=self._bind
            )
        self._transport = transport
        self._notifier = loop.create_task(self._notify_loop(), name="election-role-callbacks")
        self.election = Election(self.config, loop.time())
        self._apply(self.election.start(loop.time()))

    def set_tracking(
        self, *, listener_ok: bool | None = None, healthy_backends: int | None = None
    ) -> None:
        if self.election is None or self._loop is None:
            raise RuntimeError("driver not started")
        self._apply(
            self.election.set_tracking(
                self._loop.time(), listener_ok=listener_ok, healthy_backends=healthy_backends
            )
        )

    async def stop(self, resign: bool = True) -> None:
        """Resign (priority-0 adverts, a few copies, like keepalived) and close.

        ``resign=False`` just goes silent, as a killed process would; the peer then takes
        over after its master-down time.
        """
        if self._stopping or self._transport is None or self.election is None:
            return
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if resign and self._loop is not None:
            actions = self.election.resign(self._loop.time())
            self._apply(actions, reschedule=False)
            resign_adverts = [a for a in actions if isinstance(a, SendAdvert)]
            for _ in range(self._resign_copies - 1):
                await asyncio.sleep(0.005)  # spread the copies a little against burst loss
                for action in resign_adverts:
                    self._send(action.advert)
        self._transport.close()
        self._transport = None
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            self._events.put_nowait(None)  # run the queued callbacks, then finish
            if resign and notifier is not asyncio.current_task():
                # Bounded: a stuck callback must not make stop() hang forever.
                await asyncio.wait({notifier}, timeout=CALLBACK_DRAIN_TIMEOUT)
            notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                if notifier is not asyncio.current_task():
                    await notifier

    # ----- internals ---------------------------------------------------------------------

    def _on_datagram(self, data: bytes) -> None:
        if self.election is None or self._loop is None or self._transport is None:
            return
        advert = self.codec.unpack(data)
        if advert is not None:
            self._apply(self.election.on_advert(advert, self._loop.time()))

    def _on_timer(self) -> None:
        self._timer = None
        if self.election is None or self._loop is None or self._transport is None:
            return
        self._apply(self.election.tick(self._loop.time()))

    def _apply(self, actions: list[Action], *, reschedule: bool = True) -> None:
        for action in actions:
            if isinstance(action, SendAdvert):
                self._send(action.advert)
            elif isinstance(action, BecomeActive | BecomePassive):
                role = "active" if isinstance(action, BecomeActive) else "passive"
                log.info("election: %s -> %s (%s)", self.config.node, role, action.reason)
                self._events.put_nowait((role, action.reason))
        if reschedule:
            self._reschedule()

    def _reschedule(self) -> None:
        if self.election is None or self._loop is None or self._transport is None:
            return
        deadline = self.election.next_deadline()
        if self._timer is not None:
            if self._timer_due == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if math.isfinite(deadline):
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_due = deadline

    def _send(self, advert: Advert) -> None:
        if self._transport is None:
            return
        try:
            self._transport.sendto(self.codec.pack(advert), self._peer)
        except OSError:
            self.codec.counters["send_errors"] += 1

    async def _notify_loop(self) -> None:
        while True:
            event = await self._events.get()
            if event is None:
                return
            if self._on_role_change is None:
                continue
            try:
                result = self._on_role_change(*event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("election: on_role_change(%s) failed", event[0])
