"""The pair settings and the asyncio UDP driver over real loopback UDP."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from balancer.pair.advert import AdvertCodec
from balancer.pair.driver import (
    ElectionDriver,
    load_secret,
)
from balancer.pair.election import Advert, ElectionConfig

SECRET = b"correct horse battery staple"


# ----- configuration --------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret\n")
    return path


def test_load_secret(tmp_path: Path, secret_file: Path) -> None:
    assert load_secret(secret_file) == b"s3cret"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match=r"^secret file .*empty is empty$"):
        load_secret(empty)
    with pytest.raises(ValueError, match=r"^secret file .*nope not found$"):
        load_secret(tmp_path / "nope")


# ----- driver over real UDP -------------------------------------------------------------------

INTERVAL = 0.05
WAIT = 10.0  # an upper bound for waits, not a performance threshold


async def wait_until(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(INTERVAL / 5)


class Node:
    def __init__(self, priority: int, secret: bytes = SECRET) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr: tuple[str, int] = self.sock.getsockname()
        self.name = f"127.0.0.1:{self.addr[1]}"
        self.priority = priority
        self.secret = secret
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.driver: ElectionDriver | None = None

    def make(self, peer: Node, *, async_callback: bool = False) -> ElectionDriver:
        async def on_change_async(role: str, reason: str) -> None:
            await asyncio.sleep(0)
            self.events.put_nowait((role, reason))

        def on_change(role: str, reason: str) -> None:
            self.events.put_nowait((role, reason))

        self.driver = ElectionDriver(
            ElectionConfig(self.name, self.priority, advert_interval=INTERVAL),
            bind=self.sock,
            peer=peer.addr,
            secret=self.secret,
            on_role_change=on_change_async if async_callback else on_change,
        )
        return self.driver

    def drain(self) -> None:
        """Forget past callbacks, so a wait sees only what happens next."""
        while not self.events.empty():
            self.events.get_nowait()

    async def wait_role(self, role: str) -> str:
        """Wait for the next callback announcing ``role``; returns its reason."""
        async with asyncio.timeout(WAIT):
            while True:
                got, reason = await self.events.get()
                if got == role:
                    return reason


async def stop_silently(*nodes: Node) -> None:
    """Stop each node's driver without resigning, as a killed process would, and close."""
    for n in nodes:
        if n.driver is not None:
            await n.driver.stop(resign=False)
        n.sock.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(200), Node(100)
    a.make(b, async_callback=True)
    b.make(a)
    try:
        yield a, b
    finally:
        await stop_silently(a, b)


@contextlib.asynccontextmanager
async def started_pair(hi: int, lo: int) -> AsyncIterator[tuple[ElectionDriver, ElectionDriver]]:
    """Two started drivers (sync callbacks), the first active; both stopped silently after."""
    a, b = Node(hi), Node(lo)
    try:
        drivers = a.make(b), b.make(a)
        await start_pair(a, b)
        yield drivers
    finally:
        await stop_silently(a, b)


async def start_pair(a: Node, b: Node) -> None:
    assert a.driver is not None and b.driver is not None
    await a.driver.start()
    await b.driver.start()
    await a.wait_role("active")
    assert b.driver.role == "passive"


async def test_driver_pair_elects_the_higher_priority(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await start_pair(a, b)
    assert a.driver is not None and b.driver is not None
    assert (await b.wait_role("passive")) == "startup"
    # Let a few adverts flow, then check both sides see each other.
    async with asyncio.timeout(WAIT):
        while b.driver.codec.counters["accepted"] < 5 or a.driver.codec.counters["accepted"] < 5:
            await asyncio.sleep(INTERVAL)
    assert a.driver.role == "active" and b.driver.role == "passive"
    status = b.driver.status()
    assert status["peer"]["node"] == a.name and status["peer"]["role"] == "active"
    assert status["counters"]["bad_mac"] == 0 and status["counters"]["replay"] == 0
    assert a.driver.local_address == a.addr
    last = a.driver.status()["last_transition"]
    assert (last["from"], last["to"]) == ("passive", "active")
    assert abs(last["at_unix"] - time.time()) < 3600  # a wall-clock time, not loop time


async def test_resign_on_stop_hands_over_at_once(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await start_pair(a, b)
    assert a.driver is not None and b.driver is not None
    b.drain()
    assert b.driver.role == "passive"
    await asyncio.gather(a.driver.stop(resign=True), a.driver.stop(resign=True))  # idempotent
    assert (await a.wait_role("passive")) == "resigned"
    assert a.driver.codec.counters["sent"] >= 3  # the resign copies
    # "peer stepped down" (not "master down") shows it was the priority-0 advert, not the timer.
    assert (await b.wait_role("active")) == "peer stepped down"
    assert b.driver.status()["role"] == "active"


async def test_silent_death_fails_over_after_master_down(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await start_pair(a, b)
    assert a.driver is not None and b.driver is not None
    loop = asyncio.get_running_loop()
    b.drain()
    assert b.driver.role == "passive"
    killed_at = loop.time()
    await a.driver.stop(resign=False)  # like SIGKILL: no goodbye
    reason = await b.wait_role("active")
    assert reason.startswith("master down")
    assert loop.time() - killed_at >= 3 * INTERVAL  # it did wait for the timer


async def test_forged_packets_do_not_disturb_the_pair(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await start_pair(a, b)
    assert a.driver is not None and b.driver is not None
    forger = AdvertCodec(b"wrong secret")
    evil = forger.pack(Advert(a.name, 0, INTERVAL, "passive"))  # a fake resign
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for payload in (evil, b"garbage" * 20, evil[:20]):
            s.sendto(payload, b.addr)
    async with asyncio.timeout(WAIT):
        while b.driver.codec.counters["bad_mac"] < 1 or b.driver.codec.counters["truncated"] < 1:
            await asyncio.sleep(INTERVAL / 5)
    assert b.driver.codec.counters["bad_magic"] == 1
    assert b.driver.role == "passive" and a.driver.role == "active"


async def test_tracking_through_the_driver_hands_over() -> None:
    async with started_pair(150, 100) as (a, b):
        a.set_tracking(listener_ok=False)
        await wait_until(lambda: a.role == "passive" and b.role == "active")
        assert a.status()["last_transition"]["reason"].startswith("handover")
        assert a.status()["effective_priority"] == 50


async def test_driver_refuses_to_start_twice(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    assert a.driver is not None
    await a.driver.start()
    with pytest.raises(RuntimeError, match="already started"):
        await a.driver.start()


async def test_stop_is_bounded_when_a_role_callback_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("balancer.pair.driver.CALLBACK_DRAIN_TIMEOUT", 0.05)
    calls: list[str] = []
    never = asyncio.Event()

    async def stuck(role: str, reason: str) -> None:
        calls.append(role)
        await never.wait()

    a, b = Node(200), Node(100)
    driver = ElectionDriver(
        ElectionConfig(a.name, 200, advert_interval=INTERVAL),
        bind=a.sock,
        peer=b.addr,
        secret=SECRET,
        on_role_change=stuck,
    )
    try:
        await driver.start()
        async with asyncio.timeout(WAIT):
            await driver.stop(resign=True)
        assert calls == ["passive"]  # stuck in the first call; stop() still returned
        assert driver.role == "passive" and driver.status()["resigned"] is True
    finally:
        a.sock.close()
        b.sock.close()


def test_a_deadline_already_due_on_uvloop_does_not_stop_the_election() -> None:
    """uvloop's call_at hands back a plain Handle (no .when()) when the deadline is less
    than half a millisecond away or past: a timer that fires a hair early, or a starved loop.
    A second reschedule before that handle ran once raised AttributeError, which silently
    stopped the pair's tracking task and the adverts (the peer then took over)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with started_pair(150, 100) as (a, b):
            election = a.election
            assert election is not None
            real = election.next_deadline
            election.next_deadline = asyncio.get_running_loop().time  # type: ignore[method-assign]
            a.set_tracking(healthy_backends=1)  # due now: uvloop gives a Handle
            a.set_tracking(healthy_backends=1)  # a second reschedule, same turn
            election.next_deadline = real  # type: ignore[method-assign]
            sent = a.codec.counters["sent"]
            await asyncio.sleep(INTERVAL * 5)
            assert a.codec.counters["sent"] >= sent + 3  # adverts keep going
            assert a.role == "active" and b.role == "passive"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_tracking_fed_before_start_is_what_the_election_starts_with() -> None:
    """The cold-start flap: an election that starts believing it has no backends hands the
    role to a peer that reports some, and takes it back once its own tracking is fed.
    Fed before start, the higher-priority node becomes active and stays so."""
    a, b = Node(150), Node(100)
    try:
        da, db = a.make(b), b.make(a)
        da.set_tracking(listener_ok=True, healthy_backends=3)
        db.set_tracking(listener_ok=True, healthy_backends=3)
        await start_pair(a, b)
        assert da.status()["healthy_backends"] == 3
        assert da.status()["effective_priority"] == 150
        for _ in range(10):  # a few advert rounds: no handover happens
            await asyncio.sleep(INTERVAL)
            assert (da.role, db.role) == ("active", "passive")
        assert da.status()["last_transition"]["to"] == "active"
    finally:
        await stop_silently(a, b)
