"""Active/passive election for a pair of balancers: a pure (sans-I/O) state machine.

Modelled on keepalived's election, but between exactly two peers over unicast and with an
advert of our own (balancer.pair.advert), not keepalived's wire protocol. No sockets, no clock
reads: every input carries ``now`` (monotonic seconds) and every output is an Action for the
driver (balancer.pair.driver.ElectionDriver) to carry out.

Rules this machine keeps:

1. A node starts in "init"; ``start(now)`` makes it passive and arms the master-down timer.
2. Both roles send an advert every interval. Only an *active* advert resets a passive's
   master-down timer; passive adverts just tell the active who is there (priority, backends).
3. master-down time = 3 x interval + skew, skew = (256 - effective priority) / 256 x interval.
   The interval is the active peer's advertised one once seen (as keepalived does), else our own.
4. A passive with no active advert for master-down time becomes active.
5. Active vs active (split brain, start-up race, healed partition, resumed SIGSTOP): the lower
   (priority, address) steps down on the first advert it sees; the higher one answers every
   such advert at once, so one advert exchange settles it.
6. Preempt (default on) compares priorities only, strictly, as keepalived does: a passive
   takes over from a peer of lower priority; an active hands over to a passive peer of higher
   priority. Equal priorities never preempt; the address breaks ties only between two actives.
   An active never hands over to a passive that reports no healthy backends while it has
   some: a just-restarted peer knows none until its tracking is fed (and discovery has run),
   and handing it the role would bounce it back and forth (rule 8 on its side, then
   preemption once its backends appear): four role changes for one restart.
7. Priority 0 in an advert means "stepping down" (a resign or a handover; the wire does not
   say which, so the reason logged is "peer stepped down"): the passive takes over *at once*,
   not after skew as keepalived does; with only two nodes there is no other passive to race,
   so waiting buys nothing and a clean stop fails over in about one one-way network delay.
   A voluntary handover (rule 6, active side) also sends a priority-0 advert, so it works
   even if the peer is slow.
8. Tracking lowers the effective priority (floor 1; 0 stays reserved for resign): a failing
   listener, or no usable backend while the peer reports some, each cost ``track_penalty``.
   The penalty depends on the peer's health, never on its role, so it cannot flap.
   With preempt off, tracking moves no role: call ``resign`` if the node truly cannot serve.
   (There is no separate "fault" role; a low effective priority plays that part.)
9. After ``resign`` the node is passive for good: it never becomes active again.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["init", "passive", "active"]

MIN_PRIORITY = 1
MAX_PRIORITY = 254
RESIGN_PRIORITY = 0
DEFAULT_INTERVAL = 0.2
DEFAULT_TRACK_PENALTY = 100  # must exceed the pair's priority gap to force a handover


def address_key(node: str) -> tuple[int, int, int, str]:
    """Sortable key for tie-breaks: numeric IP (then port) as keepalived; plain text otherwise."""
    host, port = node, 0
    if node.startswith("["):  # "[v6]:port"
        host, _, rest = node[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 0
    elif node.count(":") == 1:  # "v4:port" or "name:port"
        head, _, tail = node.partition(":")
        if tail.isdigit():
            host, port = head, int(tail)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (0, 0, port, node)
    return (ip.version, int(ip), port, node)


@dataclass(frozen=True)
class ElectionConfig:
    node: str  # our own address (or "address:port"); breaks priority ties
    priority: int
    advert_interval: float = DEFAULT_INTERVAL
    preempt: bool = True
    track_penalty: int = DEFAULT_TRACK_PENALTY

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("node address must not be empty")
        # priority and advert_interval come validated from balancer.config
        if self.track_penalty < 0:
            raise ValueError(f"track penalty must be >= 0, got {self.track_penalty}")


@dataclass(frozen=True)
class Advert:
    node: str
    priority: int  # effective priority; 0 = resign
    interval: float  # seconds
    role: Role
    healthy_backends: int = 0

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("advert node must not be empty")
        if not RESIGN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"advert priority {self.priority} out of range 0-254")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"advert interval must be > 0, got {self.interval}")
        if self.role not in ("passive", "active"):
            raise ValueError(f"advert role must be passive or active, got {self.role!r}")
        if self.healthy_backends < 0:
            raise ValueError("advert healthy_backends must be >= 0")


@dataclass(frozen=True)
class SendAdvert:
    advert: Advert


@dataclass(frozen=True)
class BecomeActive:
    reason: str


@dataclass(frozen=True)
class BecomePassive:
    reason: str


Action = SendAdvert | BecomeActive | BecomePassive


@dataclass(frozen=True)
class PeerState:
    node: str
    last_seen: float
    priority: int
    role: Role
    healthy_backends: int
    interval: float


@dataclass(frozen=True)
class Transition:
    at: float
    from_role: Role
    to_role: Role
    reason: str


@dataclass(frozen=True)
class ElectionStatus:
    node: str
    role: Role
    priority: int
    effective_priority: int
    preempt: bool
    advert_interval: float
    master_down_interval: float
    resigned: bool
    listener_ok: bool
    healthy_backends: int
    peer: PeerState | None
    last_transition: Transition | None
    transitions: int
    now: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view for the admin API; times become ages in seconds."""
        peer: dict[str, Any] | None = None
        if self.peer is not None:
            age = self.now - self.peer.last_seen
            # silent for longer than master-down: its last advertised role is history
            reachable = age <= self.master_down_interval
            peer = {
                "node": self.peer.node,
                "last_seen_ago_s": round(age, 3),
                "reachable": reachable,
                "priority": self.peer.priority,
                "role": self.peer.role if reachable else "unreachable",
                "last_role": self.peer.role,
                "healthy_backends": self.peer.healthy_backends,
                "advert_interval_s": self.peer.interval,
            }
        last: dict[str, Any] | None = None
        if self.last_transition is not None:
            t = self.last_transition
            last = {
                "ago_s": round(self.now - t.at, 3),
                "from": t.from_role,
                "to": t.to_role,
                "reason": t.reason,
            }
        return {
            "node": self.node,
            "role": self.role,
            "priority": self.priority,
            "effective_priority": self.effective_priority,
            "preempt": self.preempt,
            "advert_interval_s": self.advert_interval,
            "master_down_interval_s": round(self.master_down_interval, 6),
            "resigned": self.resigned,
            "listener_ok": self.listener_ok,
            "healthy_backends": self.healthy_backends,
            "peer": peer,
            "last_transition": last,
            "transitions": self.transitions,
        }


@dataclass
class Election:
    config: ElectionConfig
    now: float
    role: Role = field(default="init", init=False)
    resigned: bool = field(default=False, init=False)
    listener_ok: bool = field(default=True, init=False)
    healthy_backends: int = field(default=0, init=False)
    peer: PeerState | None = field(default=None, init=False)
    last_transition: Transition | None = field(default=None, init=False)
    transitions: int = field(default=0, init=False)
    _advert_due: float = field(default=math.inf, init=False)
    _master_down_at: float = field(default=math.inf, init=False)
    _effective: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._effective = self.config.priority

    # ----- queries -------------------------------------------------------------------------

    @property
    def effective_priority(self) -> int:
        return self._effective

    def key(self) -> tuple[int, tuple[int, int, int, str]]:
        return (self._effective, address_key(self.config.node))

    def master_down_interval(self) -> float:
        interval = self._master_interval()
        return 3 * interval + (256 - self._effective) / 256 * interval

    def next_deadline(self) -> float:
        """When the driver must call tick() next (inf: nothing scheduled)."""
        if self.role == "init" or self.resigned:
            return math.inf
        if self.role == "active":
            return self._advert_due
        return min(self._advert_due, self._master_down_at)

    def status(self, now: float) -> ElectionStatus:
        return ElectionStatus(
            node=self.config.node,
            role=self.role,
            priority=self.config.priority,
            effective_priority=self._effective,
            preempt=self.config.preempt,
            advert_interval=self.config.advert_interval,
            master_down_interval=self.master_down_interval(),
            resigned=self.resigned,
            listener_ok=self.listener_ok,
            healthy_backends=self.healthy_backends,
            peer=self.peer,
            last_transition=self.last_transition,
            transitions=self.transitions,
            now=now,
        )

    # ----- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        if self.role != "init":
            return []
        self.now = now
        actions: list[Action] = [self._transition("passive", "startup", now)]
        self._master_down_at = now + self.master_down_interval()
        actions.append(self._advert_now(now))
        return actions

    def tick(self, now: float) -> list[Action]:
        self.now = now
        if self.role == "init" or self.resigned:
            return []
        actions: list[Action] = []
        if self.role == "passive" and now >= self._master_down_at:
            waited = self.master_down_interval()
            actions.extend(self._become_active(f"master down: no advert for {waited:.3f} s", now))
        if now >= self._advert_due:
            actions.append(self._advert_now(now))
        return actions

    def on_advert(self, advert: Advert, now: float) -> list[Action]:
        self.now = now
        if advert.node == self.config.node:
            return []  # our own advert looped back
        if advert.priority != RESIGN_PRIORITY:
            self.peer = PeerState(
                node=advert.node,
                last_seen=now,
                priority=advert.priority,
                role=advert.role,
                healthy_backends=advert.healthy_backends,
                interval=advert.interval,
            )
        elif self.peer is not None:
            # Keep the last priority seen, but the peer is no longer a candidate.
            self.peer = replace(self.peer, last_seen=now, role="passive")
        if self.role == "init" or self.resigned:
            return []
        actions = self._retrack(now)
        if advert.priority == RESIGN_PRIORITY:
            if self.role == "passive":
                actions.extend(self._become_active("peer stepped down", now))
            else:
                actions.append(self._advert_now(now))  # tell the peer who is active
            return actions
        actions.extend(self._compare(advert, now))
        return actions

    def set_tracking(
        self, now: float, *, listener_ok: bool | None = None, healthy_backends: int | None = None
    ) -> list[Action]:
        """Feed local health; returns an immediate advert (and handover) if priority changed."""
        self.now = now
        if listener_ok is not None:
            self.listener_ok = listener_ok
        had_backends = self.healthy_backends > 0
        if healthy_backends is not None:
            if healthy_backends < 0:
                raise ValueError("healthy_backends must be >= 0")
            self.healthy_backends = healthy_backends
        if self.role == "init" or self.resigned:
            self._effective = self._tracked_priority()
            return []
        actions = self._retrack(now)
        if not actions and had_backends != (self.healthy_backends > 0):
            # the peer's handover rule (6) depends on whether we have any: tell it at once
            actions.append(self._advert_now(now))
        if actions and self._peer_fresh(now):
            assert self.peer is not None
            peer = self.peer
            actions.extend(
                self._preempt_rules(peer.role, peer.priority, peer.healthy_backends, now)
            )
        return actions

    def resign(self, now: float) -> list[Action]:
        """Step down for good (clean stop); the priority-0 advert tells the peer to take over."""
        self.now = now
        if self.resigned:
            return []
        actions: list[Action] = []
        if self.role == "active":
            actions.append(self._transition("passive", "resigned", now))
        elif self.role == "init":
            self.role = "passive"
        self.resigned = True
        actions.append(SendAdvert(self._advert(priority=RESIGN_PRIORITY)))
        return actions

    # ----- internals -----------------------------------------------------------------------

    def _master_interval(self) -> float:
        if self.peer is not None and self.peer.role == "active":
            return self.peer.interval
        return self.config.advert_interval

    def _peer_fresh(self, now: float) -> bool:
        return self.peer is not None and now - self.peer.last_seen <= self.master_down_interval()

    def _tracked_priority(self) -> int:
        penalty = 0
        if not self.listener_ok:
            penalty += self.config.track_penalty
        peer_backends = self.peer.healthy_backends if self.peer is not None else 0
        if self.healthy_backends == 0 and peer_backends > 0:
            penalty += self.config.track_penalty
        return max(MIN_PRIORITY, self.config.priority - penalty)

    def _retrack(self, now: float) -> list[Action]:
        new = self._tracked_priority()
        if new == self._effective:
            return []
        self._effective = new
        return [self._advert_now(now)]  # let the peer see the new priority at once

    def _compare(self, advert: Advert, now: float) -> list[Action]:
        if self.role == "active" and advert.role == "active":
            theirs = (advert.priority, address_key(advert.node))
            if theirs > self.key():
                reason = f"split brain: peer {advert.node} priority {advert.priority} outranks us"
                return self._become_passive(reason, now)
            return [self._advert_now(now)]  # answer at once so the peer yields quickly
        if self.role == "passive" and advert.role == "active":
            self._master_down_at = now + self.master_down_interval()
        return self._preempt_rules(advert.role, advert.priority, advert.healthy_backends, now)

    def _preempt_rules(
        self, peer_role: Role, peer_priority: int, peer_backends: int, now: float
    ) -> list[Action]:
        if not self.config.preempt:
            return []
        mine = self._effective
        if self.role == "passive" and peer_priority < mine:
            return self._become_active(f"preempt: peer priority {peer_priority} < ours {mine}", now)
        peer_can_serve = peer_backends > 0 or self.healthy_backends == 0
        if (
            self.role == "active"
            and peer_role == "passive"
            and peer_priority > mine
            and peer_can_serve
        ):
            reason = f"handover: peer priority {peer_priority} > ours {mine}"
            actions = self._become_passive(reason, now)
            actions.append(SendAdvert(self._advert(priority=RESIGN_PRIORITY)))
            return actions
        return []

    def _become_active(self, reason: str, now: float) -> list[Action]:
        actions: list[Action] = [self._transition("active", reason, now)]
        self._master_down_at = math.inf
        actions.append(self._advert_now(now))
        return actions

    def _become_passive(self, reason: str, now: float) -> list[Action]:
        action = self._transition("passive", reason, now)
        self._master_down_at = now + self.master_down_interval()
        return [action]

    def _transition(self, to: Role, reason: str, now: float) -> Action:
        self.last_transition = Transition(at=now, from_role=self.role, to_role=to, reason=reason)
        self.role = to
        self.transitions += 1
        return BecomeActive(reason) if to == "active" else BecomePassive(reason)

    def _advert_now(self, now: float) -> SendAdvert:
        self._advert_due = now + self.config.advert_interval
        return SendAdvert(self._advert(priority=self._effective))

    def _advert(self, *, priority: int) -> Advert:
        role: Role = "active" if self.role == "active" else "passive"
        return Advert(
            node=self.config.node,
            priority=priority,
            interval=self.config.advert_interval,
            role=role,
            healthy_backends=self.healthy_backends,
        )
