"""A compose drill waits until the stack is ready (loadtest.ready): the pair settled, every
backend listed and up, the service answering in a row; bounded, with one-line reasons."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.ready import NotReady, wait_ready, why_not_ready
from loadtest.report import StateSample

WANT = ["backend-1", "backend-2"]


def s(name: str, role: str | None, backends: dict[str, str] | None = None) -> StateSample:
    return StateSample(0.0, name, role is not None, role, backends or {})


UP = {"backend-1": "up", "backend-2": "up"}


def test_each_unmet_condition_is_named() -> None:
    no_pair = why_not_ready([s("a", "active", UP), s("b", None)], 3, WANT)
    assert no_pair is not None and "b=unreachable" in no_pair
    both = why_not_ready([s("a", "active", UP), s("b", "active", UP)], 3, WANT)
    assert both is not None and "no single active" in both
    missing = why_not_ready([s("a", "active", {"backend-1": "up"}), s("b", "passive")], 3, WANT)
    assert missing == "a does not list backend-2 yet"
    down = {"backend-1": "up", "backend-2": "down"}
    assert why_not_ready([s("a", "passive"), s("b", "active", down)], 3, WANT) == (
        "b: backends not up: backend-2=down"
    )
    assert why_not_ready([s("a", "active", UP), s("b", "passive")], 1, WANT) == (
        "the service answered 1 of 3 requests in a row"
    )
    assert why_not_ready([s("a", "active", {}), s("b", "passive")], 3, []) == "a lists no backend"


def test_ready_when_all_hold() -> None:
    assert why_not_ready([s("a", "active", UP), s("b", "passive")], 3, WANT) is None
    assert why_not_ready([s("a", "standalone", UP)], 3, WANT) is None


class Script:
    """Poll rounds and probe answers played back in order; a fake clock the sleeps move."""

    def __init__(self, rounds: list[list[StateSample]], probes: list[bool]) -> None:
        self.rounds = rounds
        self.probes = probes
        self.t = 0.0
        self.probed = 0

    async def poll(self) -> list[StateSample]:
        return self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0]

    async def probe(self) -> bool:
        self.probed += 1
        return self.probes.pop(0) if len(self.probes) > 1 else self.probes[0]

    async def sleep(self, dt: float) -> None:
        self.t += dt

    def clock(self) -> float:
        return self.t


def test_the_wait_probes_only_a_settled_stack_and_needs_a_streak() -> None:
    settling = [s("a", "active", {"backend-1": "up"}), s("b", None)]
    ready = [s("a", "active", UP), s("b", "passive")]
    # two rounds unsettled (no probe), then the service fails once, then answers three times
    script = Script([settling, settling, ready], [True, False, True, True, True])
    took = asyncio.run(
        wait_ready(script.poll, script.probe, WANT, 30.0, script.sleep, script.clock, 0.25)
    )
    assert script.probed == 5  # the failure restarted the streak
    assert took == pytest.approx(6 * 0.25)


def test_the_wait_is_bounded_and_says_what_was_missing() -> None:
    down = [s("a", "active", {"backend-1": "up", "backend-2": "down"}), s("b", "passive")]
    script = Script([down], [True])
    with pytest.raises(NotReady, match=r"not ready after 5 s: a: backends not up: backend-2=down"):
        asyncio.run(wait_ready(script.poll, script.probe, WANT, 5.0, script.sleep, script.clock))
    assert script.probed == 0 and script.t <= 5.0
