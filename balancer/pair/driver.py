"""The asyncio UDP driver of the pair's Election: adverts out and in, timers, role callbacks.

The wire format and its checks are in balancer.pair.advert; the decisions in
balancer.pair.election. This module only moves datagrams and timers between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from balancer.pair.advert import DEFAULT_REPLAY_WINDOW, AdvertCodec
from balancer.pair.election import (
    Action,
    Advert,
    BecomeActive,
    BecomePassive,
    Election,
    ElectionConfig,
    Role,
    SendAdvert,
)

log = logging.getLogger("balancer.pair")  # one logger for the subsystem

CALLBACK_DRAIN_TIMEOUT = 5.0  # stop() waits this long for pending on_role_change calls


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
        self._initial_tracking: dict[str, Any] = {}

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
        # tracking fed before start, so the first advert tells the truth: an election that
        # starts believing it has no backends hands the role to a peer reporting some, and
        # takes it back a tracking interval later (a cold-start flap)
        self.election.set_tracking(loop.time(), **self._initial_tracking)
        self._apply(self.election.start(loop.time()))

    def set_tracking(
        self, *, listener_ok: bool | None = None, healthy_backends: int | None = None
    ) -> None:
        if self.election is None or self._loop is None:
            # before start: the election begins with it (see start)
            if listener_ok is not None:
                self._initial_tracking["listener_ok"] = listener_ok
            if healthy_backends is not None:
                self._initial_tracking["healthy_backends"] = healthy_backends
            return
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
