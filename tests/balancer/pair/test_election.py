"""The pure election state machine, driven by a fake clock and a deterministic simulated network."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.pair.election import (
    Action,
    Advert,
    BecomeActive,
    BecomePassive,
    Election,
    ElectionConfig,
    SendAdvert,
    address_key,
)

LATENCY = 0.001
INTERVAL = 0.2


def cfg(node: str, priority: int, **kw: object) -> ElectionConfig:
    return ElectionConfig(node=node, priority=priority, advert_interval=INTERVAL, **kw)  # type: ignore[arg-type]


def master_down(priority: int, interval: float = INTERVAL) -> float:
    return 3 * interval + (256 - priority) / 256 * interval


@dataclass
class Sim:
    """Two (or more) Elections on a message queue with latency, partitions, pauses and loss.

    A paused node neither ticks nor receives (SIGSTOP); ``hold`` keeps what was sent to it
    (kernel socket buffer) for delivery on resume, otherwise it is dropped.
    """

    nodes: dict[str, Election] = field(default_factory=dict)
    now: float = 0.0
    latency: float = LATENCY
    paused: set[str] = field(default_factory=set)
    cut: set[frozenset[str]] = field(default_factory=set)
    hold: bool = False
    drop: Callable[[str, str, Advert], bool] | None = None
    held: dict[str, list[Advert]] = field(default_factory=dict)
    queue: list[tuple[float, int, str, Advert]] = field(default_factory=list)
    history: list[tuple[float, str, str, str]] = field(default_factory=list)  # at, node, role, why
    _seq: int = 0

    def add(self, config: ElectionConfig, start: bool = True) -> Election:
        e = Election(config, self.now)
        self.nodes[config.node] = e
        if start:
            self.apply(config.node, e.start(self.now))
        return e

    def apply(self, src: str, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendAdvert):
                for dst in self.nodes:
                    if dst == src or src in self.paused or frozenset((src, dst)) in self.cut:
                        continue
                    if self.drop is not None and self.drop(src, dst, a.advert):
                        continue
                    self._seq += 1
                    heapq.heappush(self.queue, (self.now + self.latency, self._seq, dst, a.advert))
            else:
                role = "active" if isinstance(a, BecomeActive) else "passive"
                self.history.append((self.now, src, role, a.reason))

    def run_until(self, t_end: float, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            deadlines = [e.next_deadline() for n, e in self.nodes.items() if n not in self.paused]
            nxt = min([*deadlines, self.queue[0][0] if self.queue else math.inf])
            if nxt > t_end:
                self.now = t_end
                return
            self.now = nxt
            while self.queue and self.queue[0][0] <= self.now:
                _, _, dst, adv = heapq.heappop(self.queue)
                if dst in self.paused:
                    if self.hold:
                        self.held.setdefault(dst, []).append(adv)
                    continue
                self.apply(dst, self.nodes[dst].on_advert(adv, self.now))
            for name, e in self.nodes.items():
                if name not in self.paused and e.next_deadline() <= self.now:
                    self.apply(name, e.tick(self.now))
        raise AssertionError("simulation did not reach t_end within max_steps")

    def pause(self, node: str) -> None:
        self.paused.add(node)

    def resume(self, node: str) -> None:
        self.paused.discard(node)
        for adv in self.held.pop(node, []):  # the socket buffer is read first, then timers
            self.apply(node, self.nodes[node].on_advert(adv, self.now))

    def partition(self, a: str, b: str) -> None:
        self.cut.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cut.clear()

    def actives(self) -> list[str]:
        return sorted(n for n, e in self.nodes.items() if e.role == "active")

    def transitions(self, node: str) -> list[tuple[float, str, str]]:
        return [(t, role, why) for t, n, role, why in self.history if n == node]


# ----- a single node, exact timers ------------------------------------------------------------


def test_init_does_nothing_until_started() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    assert e.role == "init"
    assert e.next_deadline() == math.inf
    assert e.tick(5.0) == []
    assert e.on_advert(Advert("10.0.0.2", 50, INTERVAL, "active"), 5.0) == []


@pytest.mark.parametrize(("priority", "interval"), [(1, 0.2), (100, 0.2), (254, 1.0), (200, 0.05)])
def test_master_down_is_three_intervals_plus_skew(priority: int, interval: float) -> None:
    e = Election(ElectionConfig("10.0.0.1", priority, advert_interval=interval), 0.0)
    assert e.master_down_interval() == pytest.approx(master_down(priority, interval))


def test_lone_node_waits_exactly_master_down_then_becomes_active() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    start = e.start(0.0)
    assert start[0] == BecomePassive("startup")
    assert isinstance(start[1], SendAdvert) and start[1].advert.role == "passive"
    expected = master_down(100)  # 0.721875 s
    seen: list[float] = []
    for _ in range(10):
        t = e.next_deadline()
        acts = e.tick(t)
        seen.append(t)
        if any(isinstance(a, BecomeActive) for a in acts):
            break
    assert seen[-1] == pytest.approx(expected)
    assert seen[:-1] == pytest.approx([0.2, 0.4, 0.6])  # passive adverts meanwhile
    assert e.role == "active"
    assert e.last_transition is not None
    assert e.last_transition.reason.startswith("master down")


def test_tick_just_before_master_down_keeps_passive() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    e.start(0.0)
    assert not any(isinstance(a, BecomeActive) for a in e.tick(master_down(100) - 1e-6))
    assert e.tick(master_down(100))[0] == BecomeActive("master down: no advert for 0.722 s")
    assert e.role == "active"


def test_active_advert_resets_master_down_timer_using_peer_interval() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    e.start(0.0)
    e.tick(0.2)
    e.tick(0.4)
    e.on_advert(Advert("10.0.0.2", 200, 0.5, "active"), 0.5)
    expected = 0.5 + master_down(100, 0.5)  # the peer's advertised interval, as keepalived uses
    ticks: list[float] = []
    while e.role == "passive" and len(ticks) < 20:
        ticks.append(e.next_deadline())
        e.tick(ticks[-1])
    assert ticks[-1] == pytest.approx(expected)
    assert e.role == "active"


def test_passive_adverts_do_not_reset_master_down() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    e.start(0.0)
    e.on_advert(Advert("10.0.0.2", 200, INTERVAL, "passive"), 0.5)
    e.tick(master_down(100))
    assert e.role == "active"


def test_active_sends_adverts_every_interval_without_bursting_after_a_stall() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    e.start(0.0)
    e.tick(master_down(100))
    t0 = master_down(100)
    assert e.next_deadline() == pytest.approx(t0 + INTERVAL)
    acts = e.tick(t0 + 10.0)  # e.g. the process was paused
    assert len(acts) == 1 and isinstance(acts[0], SendAdvert)
    assert e.next_deadline() == pytest.approx(t0 + 10.0 + INTERVAL)


def test_own_looped_back_advert_is_ignored() -> None:
    e = Election(cfg("10.0.0.1", 100), 0.0)
    e.start(0.0)
    assert e.on_advert(Advert("10.0.0.1", 0, INTERVAL, "passive"), 0.1) == []
    assert e.role == "passive" and e.peer is None


def test_config_rejects_bad_values() -> None:
    # priority and advert interval are validated once, in balancer.config (test_config.py)
    with pytest.raises(ValueError, match="node"):
        ElectionConfig("", 100)


def test_address_key_compares_numerically() -> None:
    assert address_key("10.0.0.10") > address_key("10.0.0.2")
    assert address_key("127.0.0.1:40001") > address_key("127.0.0.1:3999")
    assert address_key("[::1]:5") < address_key("[::1]:6")
    assert address_key("b") > address_key("a")


# ----- two nodes ------------------------------------------------------------------------------


@pytest.mark.parametrize("preempt", [True, False])
@pytest.mark.parametrize("stagger", [0.0, 0.3, 2.0])
def test_pair_startup_ends_with_higher_priority_active(preempt: bool, stagger: float) -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.1", 200, preempt=preempt))
    sim.run_until(stagger)
    sim.add(cfg("10.0.0.2", 100, preempt=preempt))
    sim.run_until(stagger + 5.0)
    assert sim.actives() == ["10.0.0.1"]
    assert [r for _, r, _ in sim.transitions("10.0.0.2")] == ["passive"]


def test_pair_startup_lower_first_without_preempt_keeps_first() -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.2", 100, preempt=False))
    sim.run_until(2.0)
    assert sim.actives() == ["10.0.0.2"]
    sim.add(cfg("10.0.0.1", 200, preempt=False))
    sim.run_until(10.0)
    assert sim.actives() == ["10.0.0.2"]


def test_preempt_higher_priority_takes_over_on_first_advert() -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.2", 100))
    sim.run_until(2.0)
    assert sim.actives() == ["10.0.0.2"]
    sim.add(cfg("10.0.0.1", 200))
    sim.run_until(10.0)
    assert sim.actives() == ["10.0.0.1"]
    # The newcomer's start-up advert reaches the active, which hands over with a priority-0
    # advert: one round trip, no master-down wait.
    t, role, why = sim.transitions("10.0.0.1")[-1]
    assert (role, why) == ("active", "peer stepped down")
    assert t == pytest.approx(2.0 + 2 * LATENCY)
    _, role, why = sim.transitions("10.0.0.2")[-1]
    assert role == "passive" and why.startswith("handover: peer priority 200 > ours 100")


def test_preempt_by_passive_on_active_advert() -> None:
    e = Election(cfg("10.0.0.1", 200), 0.0)
    e.start(0.0)
    acts = e.on_advert(Advert("10.0.0.2", 100, INTERVAL, "active"), 0.1)
    assert acts[0] == BecomeActive("preempt: peer priority 100 < ours 200")
    assert isinstance(acts[1], SendAdvert) and acts[1].advert.role == "active"


def test_no_preempt_by_passive_when_disabled() -> None:
    e = Election(cfg("10.0.0.1", 200, preempt=False), 0.0)
    e.start(0.0)
    assert e.on_advert(Advert("10.0.0.2", 100, INTERVAL, "active"), 0.1) == []
    assert e.role == "passive"


def test_equal_priorities_tie_broken_by_higher_address() -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.2", 100))
    sim.add(cfg("10.0.0.10", 100))  # numerically higher, textually lower
    sim.run_until(5.0)
    assert sim.actives() == ["10.0.0.10"]
    why = sim.transitions("10.0.0.2")[-1][2]
    assert why.startswith("split brain")


def test_equal_priority_never_preempts_a_running_active() -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.2", 100))
    sim.run_until(2.0)
    sim.add(cfg("10.0.0.10", 100))
    sim.run_until(10.0)
    assert sim.actives() == ["10.0.0.2"]


def test_resign_hands_over_at_once() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 200))
    sim.add(cfg("10.0.0.2", 100))
    sim.run_until(3.0)
    assert sim.actives() == ["10.0.0.1"]
    sim.apply("10.0.0.1", a.resign(3.0))
    assert a.role == "passive" and a.resigned
    sim.run_until(10.0)
    assert sim.actives() == ["10.0.0.2"]
    t, role, why = sim.transitions("10.0.0.2")[-1]
    assert (role, why) == ("active", "peer stepped down")
    assert t == pytest.approx(3.0 + LATENCY)
    assert a.next_deadline() == math.inf  # a resigned node stays out for good


def test_resign_advert_to_an_active_is_answered() -> None:
    e = Election(cfg("10.0.0.1", 200), 0.0)
    e.start(0.0)
    e.tick(1.0)
    acts = e.on_advert(Advert("10.0.0.2", 0, INTERVAL, "passive"), 1.1)
    assert len(acts) == 1 and isinstance(acts[0], SendAdvert)
    assert acts[0].advert.role == "active" and e.role == "active"


def test_tracking_lowers_priority_and_hands_over_then_back() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150))
    b = sim.add(cfg("10.0.0.2", 100))
    sim.apply("10.0.0.1", a.set_tracking(0.0, healthy_backends=3))
    sim.apply("10.0.0.2", b.set_tracking(0.0, healthy_backends=3))
    sim.run_until(3.0)
    assert sim.actives() == ["10.0.0.1"]

    sim.apply("10.0.0.1", a.set_tracking(3.0, healthy_backends=0))  # A lost its backends
    assert a.effective_priority == 50
    assert a.role == "passive"  # handed over at once: B is fresh and outranks us now
    sim.run_until(6.0)
    assert sim.actives() == ["10.0.0.2"]
    assert a.peer is not None and a.peer.role == "active"

    sim.apply("10.0.0.1", a.set_tracking(6.0, healthy_backends=2))  # recovered
    sim.run_until(9.0)
    assert a.effective_priority == 150
    assert sim.actives() == ["10.0.0.1"]


def test_tracking_without_backends_on_both_sides_costs_nothing() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150))
    sim.add(cfg("10.0.0.2", 100))
    sim.apply("10.0.0.1", a.set_tracking(0.0, healthy_backends=0))
    sim.run_until(3.0)
    assert a.effective_priority == 150
    assert sim.actives() == ["10.0.0.1"]


def test_failing_listener_hands_over_and_shows_in_status() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150))
    sim.add(cfg("10.0.0.2", 100))
    sim.run_until(3.0)
    sim.apply("10.0.0.1", a.set_tracking(3.0, listener_ok=False))
    sim.run_until(5.0)
    assert sim.actives() == ["10.0.0.2"]
    status = a.status(5.0).as_dict()
    assert status["role"] == "passive"
    assert status["priority"] == 150 and status["effective_priority"] == 50
    assert status["listener_ok"] is False
    assert status["peer"]["role"] == "active" and status["peer"]["priority"] == 100
    assert 0 <= status["peer"]["last_seen_ago_s"] <= INTERVAL
    assert status["last_transition"]["from"] == "active"
    assert status["last_transition"]["reason"].startswith("handover")
    assert status["transitions"] == a.transitions >= 3


def test_tracking_without_preempt_keeps_roles() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150, preempt=False))
    sim.add(cfg("10.0.0.2", 100, preempt=False))
    sim.run_until(3.0)
    sim.apply("10.0.0.1", a.set_tracking(3.0, listener_ok=False))
    sim.run_until(6.0)
    assert sim.actives() == ["10.0.0.1"]  # documented: without preempt, use resign()


@pytest.mark.parametrize(("pa", "pb"), [(200, 100), (100, 200), (100, 100)])
def test_split_brain_resolves_within_one_interval(pa: int, pb: int) -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.1", pa))
    sim.add(cfg("10.0.0.2", pb))
    sim.run_until(2.0)
    sim.partition("10.0.0.1", "10.0.0.2")
    sim.run_until(5.0)
    assert sim.actives() == ["10.0.0.1", "10.0.0.2"]  # both think they are alone
    sim.heal()
    sim.run_until(5.0 + INTERVAL + 2 * LATENCY)
    winner = "10.0.0.1" if (pa, 1) > (pb, 2) else "10.0.0.2"
    assert sim.actives() == [winner]
    sim.run_until(10.0)
    assert sim.actives() == [winner]


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize(("pa", "pb"), [(200, 100), (100, 200)])
def test_paused_active_resumes_to_exactly_one_active(hold: bool, pa: int, pb: int) -> None:
    sim = Sim(hold=hold)
    sim.add(cfg("10.0.0.1", pa))
    sim.add(cfg("10.0.0.2", pb))
    sim.run_until(2.0)
    active = sim.actives()[0]
    other = "10.0.0.2" if active == "10.0.0.1" else "10.0.0.1"
    sim.pause(active)
    sim.run_until(5.0)
    assert sim.nodes[other].role == "active"
    sim.resume(active)
    sim.run_until(5.0 + INTERVAL + 2 * LATENCY)
    assert len(sim.actives()) == 1
    sim.run_until(10.0)
    assert sim.actives() == ["10.0.0.1" if pa > pb else "10.0.0.2"]


def test_lossy_network_settles_once_loss_stops() -> None:
    rng = random.Random(7)
    sim = Sim(drop=lambda s, d, a: rng.random() < 0.3)
    sim.add(cfg("10.0.0.1", 200))
    sim.add(cfg("10.0.0.2", 100))
    sim.run_until(30.0)
    sim.drop = None
    sim.run_until(30.0 + INTERVAL + 2 * LATENCY)
    assert sim.actives() == ["10.0.0.1"]


@settings(max_examples=60, deadline=None, database=None)
@given(
    prios=st.tuples(st.integers(1, 254), st.integers(1, 254)),
    preempt=st.booleans(),
    events=st.lists(
        st.tuples(
            st.sampled_from(["pause", "resume", "cut", "heal", "track"]),
            st.sampled_from(["10.0.0.1", "10.0.0.2"]),
            st.floats(0.0, 2.0),
        ),
        max_size=8,
    ),
)
def test_any_fault_sequence_ends_with_exactly_one_active(
    prios: tuple[int, int], preempt: bool, events: list[tuple[str, str, float]]
) -> None:
    sim = Sim()
    sim.add(cfg("10.0.0.1", prios[0], preempt=preempt))
    sim.add(cfg("10.0.0.2", prios[1], preempt=preempt))
    for kind, node, gap in events:
        sim.run_until(sim.now + gap)
        if kind == "pause":
            sim.pause(node)
        elif kind == "resume":
            sim.resume(node)
        elif kind == "cut":
            sim.partition("10.0.0.1", "10.0.0.2")
        elif kind == "heal":
            sim.heal()
        else:  # a tracking flip on a live node
            e = sim.nodes[node]
            sim.apply(node, e.set_tracking(sim.now, listener_ok=not e.listener_ok))
    sim.heal()
    for node in list(sim.paused):
        sim.resume(node)
    sim.run_until(sim.now + 3 * master_down(1))
    assert len(sim.actives()) == 1


@pytest.mark.parametrize("first_tracking", [0.0, 0.05, 0.2, 1.0])
def test_restarted_active_preempts_with_one_transition_on_each_side(
    first_tracking: float,
) -> None:
    """A killed active restarts and preempts: one role change on each side, none invented.

    The restarted node knows no backends until its tracking is first fed (the driver's
    tracker runs an interval after start; discovery may take longer), so it first advertises
    0 healthy backends while the peer serves with 3."""
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150))
    b = sim.add(cfg("10.0.0.2", 100))
    sim.apply("10.0.0.1", a.set_tracking(0.0, healthy_backends=3))
    sim.apply("10.0.0.2", b.set_tracking(0.0, healthy_backends=3))
    sim.run_until(3.0)
    assert sim.actives() == ["10.0.0.1"]

    sim.pause("10.0.0.1")  # SIGKILL: silent, adverts to it dropped
    sim.run_until(6.0)
    assert b.role == "active"
    restart = sim.now
    sim.resume("10.0.0.1")
    a2 = sim.add(cfg("10.0.0.1", 150))  # a new process: a fresh Election
    sim.run_until(restart + first_tracking)
    sim.apply("10.0.0.1", a2.set_tracking(sim.now, healthy_backends=3))
    sim.run_until(restart + 5.0)

    after = [(n, role, why) for t, n, role, why in sim.history if t >= restart]
    changes = [(n, role) for n, role, why in after if why != "startup"]
    assert changes == [("10.0.0.2", "passive"), ("10.0.0.1", "active")] or changes == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "passive"),
    ], after
    assert not any("resigned" in why for _, _, why in after), after
    assert sim.actives() == ["10.0.0.1"]


def test_status_reports_a_silent_peer_unreachable_not_active() -> None:
    sim = Sim()
    a = sim.add(cfg("10.0.0.1", 150))
    b = sim.add(cfg("10.0.0.2", 100))
    sim.run_until(3.0)
    peer = b.status(3.0).as_dict()["peer"]
    assert (peer["role"], peer["reachable"], peer["priority"]) == ("active", True, 150)
    sim.pause("10.0.0.1")  # killed
    sim.run_until(3.0 + 18.0)
    peer = b.status(sim.now).as_dict()["peer"]
    assert peer["role"] == "unreachable" and peer["reachable"] is False
    assert peer["last_role"] == "active" and peer["last_seen_ago_s"] >= 18.0
    assert a.role == "active" and b.role == "active"  # b took over; a is frozen
