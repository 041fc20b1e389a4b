"""find_active: the drill faults the balancer that is settled as active, not a passing blip."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from loadtest.drill import find_active, settled_active
from loadtest.report import StateSample
from loadtest.targets import DrillError


def s(name: str, role: str | None, reachable: bool = True) -> StateSample:
    return StateSample(0.0, name, reachable, role)


def test_settled_active_needs_the_other_node_reachable_and_passive() -> None:
    assert settled_active([s("a", "active"), s("b", "passive")]) == "a"
    assert settled_active([s("a", "standalone")]) == "a"
    assert settled_active([s("a", None, reachable=False), s("b", "active")]) is None  # a stalled
    assert settled_active([s("a", "active"), s("b", "active")]) is None  # start-up race
    assert settled_active([s("a", "passive"), s("b", "passive")]) is None
    assert settled_active([s("a", "active"), s("b", "init")]) is None


@contextlib.asynccontextmanager
async def scripted_pair(script: list[tuple[str, str]]) -> AsyncIterator[dict[str, str]]:
    """Two fake admin APIs whose roles follow `script`, one step per poll of each;
    "down" answers 503 (unreachable for the drill)."""
    polls = {"a": 0, "b": 0}

    def app(name: str) -> web.Application:
        async def state(_: web.Request) -> web.Response:
            role = script[min(polls[name], len(script) - 1)][0 if name == "a" else 1]
            polls[name] += 1
            if role == "down":
                return web.Response(status=503, text="starting")
            return web.json_response({"role": role, "backends": []})

        application = web.Application()
        application.router.add_get("/api/state", state)
        return application

    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    try:
        for name in ("a", "b"):
            runner = web.AppRunner(app(name))
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_one_round_blip_of_the_peer_is_not_taken_for_the_active() -> None:
    # a is stalled for a round and b steps in, then a comes back and b steps down again:
    # the drill must pick a, the node that stays active
    script = [("down", "active"), ("active", "passive")]
    async with scripted_pair(script) as admins:
        assert await find_active(admins, timeout=5.0, interval=0.01) == "a"


async def test_a_streak_restarts_when_the_answer_changes() -> None:
    script = [("active", "passive"), ("active", "passive"), ("passive", "active")]
    async with scripted_pair(script) as admins:
        assert await find_active(admins, timeout=5.0, interval=0.01) == "b"


async def test_an_unsettled_pair_is_a_clear_drill_error() -> None:
    async with scripted_pair([("active", "active")]) as admins:
        with pytest.raises(DrillError, match="no single active balancer"):
            await find_active(admins, timeout=0.3, interval=0.01)
