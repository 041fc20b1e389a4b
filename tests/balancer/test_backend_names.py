"""One name per backend: X-Backend, /api/state, metrics, the access log, admin URLs and
events all say the name given with `--backend H:P,name=N`; discovery names by reverse DNS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import balancer.io.discovery
from balancer.app import Balancer
from balancer.config import AdminSettings, BackendSpec
from balancer.events import Event
from harness import run_backend


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get("X-Backend", ""), await resp.text()


async def test_a_named_backend_has_one_name_everywhere(
    start_balancer: Callable[..., Awaitable[Balancer]], tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    async with run_backend("b1") as demo, aiohttp.ClientSession() as session:
        address = f"{demo.host}:{demo.port}"
        bal = await start_balancer(
            [BackendSpec(demo.host, demo.port, name="b1")],
            access_log=str(log),
            admin=AdminSettings(listen="127.0.0.1:0"),
        )
        events: list[Event] = []
        bal.subscribe(events.append)
        assert bal.admin is not None
        admin = bal.admin.url
        host, port = bal.address
        status, x_backend, _ = await _get(session, f"http://{host}:{port}/")
        assert (status, x_backend) == (200, "b1")  # the demo backend's --name

        status, _, body = await _get(session, admin + "/api/state")
        (view,) = json.loads(body)["backends"]
        assert (view["name"], view["id"], view["address"]) == ("b1", "b1", address)
        assert view["requests"] == 1

        _, _, metrics = await _get(session, admin + "/metrics")
        assert 'lb_backend_requests_total{backend="b1"} 1.0' in metrics
        assert f'lb_backend_info{{address="{address}",backend="b1"}} 1.0' in metrics
        assert address not in metrics.replace(f'address="{address}"', "")

        async with session.post(admin + "/api/backends/b1/drain") as resp:
            assert resp.status == 200
        assert [(e.kind.value, e.backend) for e in events][-1:] == [("drain", "b1")]
        assert bal.cluster.backends["b1"].admin_state == "draining"
        # the address shown beside the name reaches the same backend; events say the name
        async with session.post(admin + f"/api/backends/{address}/enable") as resp:
            assert resp.status == 200
        assert [(e.kind.value, e.backend) for e in events][-1:] == [("enable", "b1")]
        async with session.post(admin + "/api/backends/b9/drain") as resp:
            assert resp.status == 404

    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (entry["backend"], entry["backend_address"]) == ("b1", address)


async def test_an_unnamed_backend_is_known_by_its_address(
    start_balancer: Callable[..., Awaitable[Balancer]],
) -> None:
    async with run_backend("b2") as demo:
        bal = await start_balancer([BackendSpec(demo.host, demo.port)])
        (view,) = bal.backend_view()
        address = f"{demo.host}:{demo.port}"
        assert (view["name"], view["address"]) == (address, address)


async def _discovered(bal: Balancer) -> list[tuple[str, str]]:
    for _ in range(100):  # bounded: 5 s
        found = [(b.id, b.address) for b in bal.cluster.backends.values() if b.discovered]
        if found:
            return found
        await asyncio.sleep(0.05)
    return []


async def test_discovery_names_an_address_by_its_reverse_dns(
    start_balancer: Callable[..., Awaitable[Balancer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []

    async def replica_3(loop: Any, addr: str, service: str) -> str | None:
        asked.append((addr, service))
        return "backend-3"

    monkeypatch.setattr(balancer.io.discovery, "reverse_replica_name", replica_3)
    async with run_backend("backend-3") as demo, aiohttp.ClientSession() as session:
        bal = await start_balancer([], discover=(f"localhost:{demo.port}",), discover_interval=0.1)
        assert await _discovered(bal) == [("backend-3", f"127.0.0.1:{demo.port}")]
        assert asked == [("127.0.0.1", "localhost")]
        host, port = bal.address
        status, x_backend, _ = await _get(session, f"http://{host}:{port}/")
        assert (status, x_backend) == (200, "backend-3")
        assert "backend-3" in {view["name"] for view in bal.backend_view()}


async def test_discovery_falls_back_to_the_address(
    start_balancer: Callable[..., Awaitable[Balancer]],
) -> None:
    # the real reverse lookup: 127.0.0.1 is `localhost` (or nothing), no replica of a service
    async with run_backend("x") as demo:
        bal = await start_balancer([], discover=(f"localhost:{demo.port}",), discover_interval=0.1)
        address = f"127.0.0.1:{demo.port}"
        assert await _discovered(bal) == [(address, address)]


async def test_discovery_keeps_names_unique_and_addresses_single(
    start_balancer: Callable[..., Awaitable[Balancer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def always_3(loop: Any, addr: str, service: str) -> str | None:
        return "backend-3"

    monkeypatch.setattr(balancer.io.discovery, "reverse_replica_name", always_3)
    async with run_backend("s") as static, run_backend("d1") as d1, run_backend("d2") as d2:
        bal = await start_balancer(
            [BackendSpec(static.host, static.port, name="b1")],
            discover=tuple(f"localhost:{b.port}" for b in (static, d1, d2)),
            discover_interval=0.1,
        )
        found: list[tuple[str, str]] = []
        for _ in range(100):  # bounded: 5 s
            found = sorted((b.id, b.address) for b in bal.cluster.backends.values())
            if len(found) == 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more discovery rounds add nothing
        assert sorted((b.id, b.address) for b in bal.cluster.backends.values()) == found
        by_address = dict((address, bid) for bid, address in found)
        # the configured address is not discovered a second time
        assert by_address[f"127.0.0.1:{static.port}"] == "b1"
        # one of the two discovered addresses gets the name, the other keeps its address
        names = {by_address[f"127.0.0.1:{d.port}"] for d in (d1, d2)}
        assert "backend-3" in names and len(names) == 2
        assert names - {"backend-3"} <= {f"127.0.0.1:{d.port}" for d in (d1, d2)}
