"""The admin API: state, drain/enable/maint, weight, algorithm, reload, auth, errors, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from balancer.admin.api import AdminError, AuthPolicy, SSEClient, authorize, is_loopback
from balancer.app import Balancer
from balancer.config import AdminSettings, BackendSpec, Config, from_args
from harness import RunningBackend, run_backend

TOKEN = "s3cret-token"
TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def backends() -> AsyncIterator[list[RunningBackend]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(run_backend(f"b{i}")) for i in range(3)]


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")  # trailing whitespace must not matter
    return str(path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


@pytest.fixture
async def balancer(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    token_file: str,
) -> Balancer:
    return await start_balancer(
        [_spec(b) for b in backends],
        admin=AdminSettings(listen="127.0.0.1:0", token_file=token_file),
    )


def _spec(b: RunningBackend) -> BackendSpec:
    return BackendSpec(b.host, b.port)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def bid(b: RunningBackend) -> str:
    return f"{b.host}:{b.port}"


async def send(session: aiohttp.ClientSession, bal: Balancer, n: int) -> list[str]:
    """n sequential requests through the public listener; returns X-Backend of each."""
    host, port = bal.address
    names = []
    for _ in range(n):
        async with session.get(f"http://{host}:{port}/") as resp:
            assert resp.status == 200
            await resp.read()
            names.append(resp.headers["X-Backend"])
    return names


async def api(
    session: aiohttp.ClientSession,
    bal: Balancer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, Any]:
    kw: dict[str, Any] = {"headers": headers if headers is not None else AUTH}
    if body is not None:
        kw["json"] = body
    if data is not None:
        kw["data"] = data
    async with session.request(method, bal.admin.url + path, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_healthz_and_state_shape(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    await send(session, balancer, 6)
    status, text = await api(session, balancer, "GET", "/healthz", headers={})
    assert (status, text.strip()) == (200, "ok")
    status, state = await api(session, balancer, "GET", "/api/state", headers={})
    assert status == 200
    for key in ("algorithm", "mode", "role", "role_detail", "listener", "uptime_s", "stats"):
        assert key in state
    assert state["algorithm"] == "round-robin"
    assert state["mode"] == "normal"
    assert state["role"] == "standalone"
    assert state["listener"]["bound"] == "{}:{}".format(*balancer.address)
    assert state["stats"]["requests_total"] == 6
    assert [b["id"] for b in state["backends"]] == [bid(b) for b in backends]
    for b in state["backends"]:
        assert b["state"] == "up"
        assert b["weight"] == 1.0
        assert b["in_flight"] == 0
        assert b["requests"] == 2
        assert b["responses"]["2xx"] == 2
        assert sum(b["latency_buckets"]) == 2
        assert set(b["errors"]) == {"connect", "response"}
    assert isinstance(state["events"], list)


async def test_drain_enable_maint(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    target = backends[0]
    # the colon URL-encoded must work as well as the plain one
    encoded = bid(target).replace(":", "%3A")
    status, body = await api(session, balancer, "POST", f"/api/backends/{encoded}/drain")
    assert status == 200, body
    assert body["admin_state"] == "draining"
    names = await send(session, balancer, 20)
    assert target.name not in names
    assert set(names) == {"b1", "b2"}
    _, state = await api(session, balancer, "GET", "/api/state")
    row = next(b for b in state["backends"] if b["id"] == bid(target))
    assert row["state"] == "drained"  # nothing in flight
    assert any(e["kind"] == "drain" and e["backend"] == bid(target) for e in state["events"])

    status, body = await api(session, balancer, "POST", f"/api/backends/{bid(target)}/enable")
    assert (status, body["state"]) == (200, "up")
    assert target.name in await send(session, balancer, 6)

    status, body = await api(session, balancer, "POST", f"/api/backends/{bid(target)}/maint")
    assert (status, body["state"]) == (200, "maint")
    assert target.name not in await send(session, balancer, 6)


async def test_drain_lets_in_flight_finish(
    start_balancer: Callable[..., Awaitable[Balancer]],
    token_file: str,
    session: aiohttp.ClientSession,
) -> None:
    async with run_backend("slow", delay_ms=400) as slow:
        bal = await start_balancer(
            [_spec(slow)], admin=AdminSettings(listen="127.0.0.1:0", token_file=token_file)
        )
        host, port = bal.address

        async def one() -> int:
            async with session.get(f"http://{host}:{port}/") as resp:
                await resp.read()
                return resp.status

        pending = asyncio.create_task(one())
        backend = bal.cluster.backends[bid(slow)]
        for _ in range(200):  # until the request is at the backend (bounded: 2 s)
            if backend.in_flight:
                break
            await asyncio.sleep(0.01)
        status, body = await api(session, bal, "POST", f"/api/backends/{bid(slow)}/drain")
        assert (status, body["state"]) == (200, "draining")
        assert await asyncio.wait_for(pending, 10) == 200
        _, state = await api(session, bal, "GET", "/api/state")
        assert state["backends"][0]["state"] == "drained"
        assert state["mode"] == "none"


async def test_weight(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    status, body = await api(
        session, balancer, "PUT", f"/api/backends/{bid(backends[0])}/weight", {"weight": 3}
    )
    assert (status, body["weight"]) == (200, 3.0)
    names = await send(session, balancer, 50)
    # smooth weighted round robin: exact 3:1:1 over whole cycles
    assert names.count("b0") == 30
    assert names.count("b1") == names.count("b2") == 10
    _, state = await api(session, balancer, "GET", "/api/state")
    assert state["backends"][0]["weight"] == 3.0


async def test_algorithm_switch_under_load(
    balancer: Balancer, session: aiohttp.ClientSession
) -> None:
    host, port = balancer.address
    failures: list[str] = []
    stop = asyncio.Event()

    async def client() -> int:
        done = 0
        for _ in range(2000):  # bounded; normally ended by `stop`
            if stop.is_set():
                break
            try:
                async with session.get(f"http://{host}:{port}/") as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures.append(str(resp.status))
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            done += 1
        return done

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    for name in ("least-connections", "source-hash", "round-robin", "least-connections"):
        await asyncio.sleep(0.1)
        status, body = await api(session, balancer, "PUT", "/api/algorithm", {"algorithm": name})
        assert (status, body) == (200, {"algorithm": name})
    stop.set()
    counts = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert sum(counts) > 0
    assert failures == []
    _, state = await api(session, balancer, "GET", "/api/state")
    assert state["algorithm"] == "least-connections"
    newest = next(e for e in state["events"] if e["kind"] == "algorithm")
    assert newest["detail"] == "least-connections"


async def test_mutations_need_the_token(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    path = f"/api/backends/{bid(backends[0])}/drain"
    status, body = await api(session, balancer, "POST", path, headers={})
    assert (status, body) == (401, {"error": "missing bearer token"})
    status, body = await api(
        session, balancer, "POST", path, headers={"Authorization": "Bearer nope"}
    )
    assert (status, body) == (401, {"error": "wrong bearer token"})
    status, body = await api(
        session, balancer, "PUT", "/api/algorithm", {"algorithm": "source-hash"}, headers={}
    )
    assert status == 401
    assert balancer.cluster.algorithm == "round-robin"
    assert balancer.cluster.backends[bid(backends[0])].admin_state == "enabled"
    # reads stay open
    status, _ = await api(session, balancer, "GET", "/api/state", headers={})
    assert status == 200


async def test_bad_input_and_unknown_things(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    weight = f"/api/backends/{bid(backends[0])}/weight"
    status, body = await api(session, balancer, "PUT", weight, data=b"{not json")
    assert (status, body) == (400, {"error": "body is not valid JSON"})
    for bad in ({"weight": 0}, {"weight": 1001}, {"weight": "2"}, {"weight": True}, {}, [1]):
        status, body = await api(session, balancer, "PUT", weight, bad)
        assert status == 400, bad
        assert "weight" in body["error"]
    status, body = await api(session, balancer, "PUT", weight, data=b" " * 10_000)
    assert status == 413
    assert "error" in body
    status, body = await api(session, balancer, "PUT", weight, {"weight": 1000})
    assert status == 200
    status, body = await api(session, balancer, "PUT", "/api/algorithm", {"algorithm": "random"})
    assert status == 400
    assert "unknown algorithm" in body["error"]
    status, body = await api(session, balancer, "POST", "/api/backends/10.9.9.9:1/drain")
    assert status == 404
    assert "unknown backend" in body["error"]
    status, body = await api(session, balancer, "GET", "/api/nothing-here")
    assert status == 404
    assert "error" in body
    status, body = await api(session, balancer, "GET", "/api/backends/x/drain")
    assert status == 405
    assert "error" in body
    status, body = await api(session, balancer, "GET", "/static/..%2Fadmin.py")
    assert status == 404


async def test_reload_without_a_source_is_501(
    balancer: Balancer, session: aiohttp.ClientSession
) -> None:
    status, body = await api(session, balancer, "POST", "/api/reload")
    assert (status, body) == (501, {"error": "reload is not available (no configuration source)"})
    status, _ = await api(session, balancer, "POST", "/api/reload", headers={})
    assert status == 401


async def test_reload_reports_applied_restart_needed_and_refused(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    token_file: str,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    path = tmp_path / "lb.toml"
    access_log = tmp_path / "access.log"
    addrs = ", ".join(f'"{bid(b)}"' for b in backends)
    top = f'listen = "127.0.0.1:0"\nbackends = [{addrs}]\n'
    tables = (
        "[health_check]\nenabled = false\n"
        f'[admin]\nlisten = "127.0.0.1:0"\ntoken_file = "{token_file}"\n'
    )
    path.write_text(top + tables)

    def load() -> Config:
        return from_args(["--config", str(path)], warn=lambda _: None)

    bal = await start_balancer([], cfg=load(), load_config=load)
    status, body = await api(session, bal, "POST", "/api/reload")
    assert (status, body) == (200, {"applied": [], "restart_needed": [], "refused": None})

    # live settings take effect at once; restart-only ones are named, not silently dropped
    path.write_text(
        top.replace("127.0.0.1:0", "127.0.0.1:1")
        + f'access_log = "{access_log}"\nalgorithm = "least-connections"\n'
        + tables
        + "[retries]\nbudget_ratio = 0.5\n[outlier]\nmax_ejection = 30\n"
    )
    status, body = await api(session, bal, "POST", "/api/reload")
    assert status == 200
    assert body == {
        "applied": ["algorithm", "access_log", "retries.budget_ratio"],
        "restart_needed": ["listen", "outlier.max_ejection"],
        "refused": None,
    }
    assert bal.cluster.algorithm == "least-connections" and bal.cluster.budget.ratio == 0.5
    assert bal.cfg.listen == "127.0.0.1:0"  # the running value, so the next reload owes it too
    assert bal.events[-1].kind == "reload"
    assert bal.events[-1].detail == (
        "applied algorithm, access_log, retries.budget_ratio; "
        "restart needed for listen, outlier.max_ejection"
    )
    await send(session, bal, 1)
    assert json.loads(access_log.read_text().splitlines()[0])["status"] == 200

    # a bad file is refused as a whole: 422 with the one-line reason, nothing changes
    path.write_text(top + tables + "[outlier]\nmax_ejection = 1\n")
    status, body = await api(session, bal, "POST", "/api/reload")
    reason = "outlier.max_ejection must be >= outlier.base_ejection (5), got 1"
    assert status == 422
    assert body == {
        "applied": [],
        "restart_needed": [],
        "refused": reason,
        "error": f"reload refused: {reason}",
    }
    assert bal.cluster.algorithm == "least-connections"
    assert (bal.events[-1].kind, bal.events[-1].detail) == ("reload-refused", reason)


async def test_reload_applies_log_level_and_attempts_live(
    start_balancer: Callable[..., Awaitable[Balancer]], backends: list[RunningBackend]
) -> None:
    bal = await start_balancer([_spec(b) for b in backends])
    root = logging.getLogger()
    level = root.level
    try:
        new = replace(bal.cfg, log_level="error", retries=replace(bal.cfg.retries, attempts=1))
        result = bal.apply(new)
        assert (result.applied, result.restart_needed) == (["log_level", "retries.attempts"], [])
        assert root.level == logging.ERROR and bal.ctx.attempts == 1
    finally:
        root.setLevel(level)


async def test_dashboard_and_metrics_are_served(
    balancer: Balancer, session: aiohttp.ClientSession
) -> None:
    async with session.get(balancer.admin.url + "/") as resp:
        html = await resp.text()
        assert resp.status == 200
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert '<script src="/static/app.js"' in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing from elsewhere
    for name in ("app.js", "style.css"):
        async with session.get(f"{balancer.admin.url}/static/{name}") as resp:
            assert resp.status == 200
            assert len(await resp.read()) > 100
    async with session.get(balancer.admin.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")


async def _next_sse(reader: aiohttp.StreamReader) -> tuple[str, dict[str, Any]]:
    kind, data = "", ""
    for _ in range(100):  # lines of one message; bounded
        line = (await asyncio.wait_for(reader.readline(), 5)).decode()
        if line == "\n":
            return kind, json.loads(data)
        field, _, value = line.rstrip("\n").partition(": ")
        if field == "event":
            kind = value
        elif field == "data":
            data += value
    raise AssertionError("SSE message too long")


async def test_sse_pushes_state_and_events(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    async with session.get(balancer.admin.url + "/api/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        kind, state = await _next_sse(resp.content)
        assert kind == "state"
        assert len(state["backends"]) == 3
        status, _ = await api(session, balancer, "POST", f"/api/backends/{bid(backends[1])}/drain")
        assert status == 200
        seen: list[tuple[str, dict[str, Any]]] = []
        for _ in range(10):  # the event arrives before the next 1 s tick or just after
            seen.append(await _next_sse(resp.content))
            if seen[-1][0] == "event" and seen[-1][1]["kind"] == "drain":
                break
        events = [data for kind, data in seen if kind == "event"]
        assert (events[-1]["kind"], events[-1]["backend"]) == ("drain", bid(backends[1]))
        for _ in range(5):  # and the periodic state follows
            kind, state = await _next_sse(resp.content)
            if kind == "state":
                break
        assert kind == "state"
        assert state["backends"][1]["state"] == "drained"
    # the client is forgotten once it went away
    for _ in range(100):
        if not balancer.admin.clients:
            break
        await asyncio.sleep(0.02)
    assert not balancer.admin.clients


async def test_sse_slow_client_is_cut_off_and_stop_ends_streams(
    balancer: Balancer, session: aiohttp.ClientSession
) -> None:
    async def open_stream() -> aiohttp.ClientResponse:
        resp = await session.get(balancer.admin.url + "/api/events")
        assert (await _next_sse(resp.content))[0] == "state"
        return resp

    slow = await open_stream()
    (client,) = balancer.admin.clients
    for _ in range(client.queue.maxsize + 1):  # what a client that stopped reading builds up
        client.offer("state", "{}")
    assert client.dropped
    with pytest.raises((aiohttp.ClientError, asyncio.IncompleteReadError, ValueError)):
        for _ in range(client.queue.maxsize + 2):  # bounded: the stream must end
            line = await asyncio.wait_for(slow.content.readline(), 5)
            if not line:
                raise ValueError("EOF")
    slow.release()

    other = await open_stream()
    await asyncio.wait_for(balancer.stop(), 10)  # SIGTERM must not hang on open streams
    assert not balancer.admin.clients
    other.release()


async def test_without_token_only_loopback_may_mutate(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    session: aiohttp.ClientSession,
) -> None:
    bal = await start_balancer(
        [_spec(b) for b in backends], admin=AdminSettings(listen="127.0.0.1:0")
    )
    status, _ = await api(
        session, bal, "PUT", "/api/algorithm", {"algorithm": "source-hash"}, headers={}
    )
    assert status == 200
    assert bal.cluster.algorithm == "source-hash"


async def test_mtls_client_certificate_authorizes(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("operator@example.test")
    cert, key, ca_file = tmp_path / "admin.pem", tmp_path / "admin.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    bal = await start_balancer(
        [_spec(b) for b in backends],
        admin=AdminSettings(
            listen="127.0.0.1:0", cert=str(cert), key=str(key), client_ca=str(ca_file)
        ),
    )
    assert bal.admin.url.startswith("https://127.0.0.1:")
    anonymous = ssl.create_default_context(cafile=str(ca_file))
    with_cert = ssl.create_default_context(cafile=str(ca_file))
    client.configure_cert(with_cert)
    body = {"algorithm": "least-connections"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(bal.admin.url + "/api/state", ssl=anonymous) as resp:
            assert resp.status == 200  # reads need no certificate
        async with s.put(bal.admin.url + "/api/algorithm", json=body, ssl=anonymous) as resp:
            assert resp.status == 401
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.put(bal.admin.url + "/api/algorithm", json=body, ssl=with_cert) as resp,
    ):
        assert resp.status == 200
    assert bal.cluster.algorithm == "least-connections"


# pure cores ---------------------------------------------------------------------------------
def test_authorize_policies() -> None:
    open_policy = AuthPolicy(token=None, token_error=None, mtls=False)
    authorize(open_policy, None, False, "127.0.0.1")
    authorize(open_policy, None, False, "::1")
    authorize(open_policy, None, False, "::ffff:127.0.0.1")
    with pytest.raises(AdminError) as err:
        authorize(open_policy, None, False, "10.0.0.2")
    assert err.value.status == 403
    token = AuthPolicy(token="t", token_error=None, mtls=False)
    authorize(token, "Bearer t", False, "10.0.0.2")
    authorize(token, "bearer  t ", False, "10.0.0.2")
    for header in (None, "", "Bearer", "Basic t", "Bearer tt"):
        with pytest.raises(AdminError) as err:
            authorize(token, header, False, "127.0.0.1")
        assert err.value.status == 401
    broken = AuthPolicy(token=None, token_error="admin token file is empty", mtls=False)
    with pytest.raises(AdminError) as err:
        authorize(broken, "Bearer ", False, "127.0.0.1")
    assert err.value.status == 503  # a broken token file fails closed, even for loopback
    mtls = AuthPolicy(token=None, token_error=None, mtls=True)
    authorize(mtls, None, True, "10.0.0.2")
    with pytest.raises(AdminError):
        authorize(mtls, None, False, "127.0.0.1")
    assert not is_loopback(None)
    assert not is_loopback("not-an-ip")


async def test_sse_client_is_dropped_when_its_queue_is_full() -> None:
    client = SSEClient()
    for i in range(client.queue.maxsize):
        client.offer("state", str(i))
    assert not client.dropped
    client.offer("state", "one too many")
    assert client.dropped
    assert client.queue.get_nowait() is None  # the handler sees the end marker next
    client.offer("state", "ignored")
    assert client.queue.empty()


async def test_history_is_open_and_ends_with_the_counters_now(
    balancer: Balancer, backends: list[RunningBackend], session: aiohttp.ClientSession
) -> None:
    await send(session, balancer, 6)
    status, history = await api(session, balancer, "GET", "/api/history", headers={})
    assert status == 200
    assert (history["window_s"], history["step_s"]) == (600.0, 1.0)
    last = history["samples"][-1]
    assert last["requests"] == {bid(b): 2 for b in backends}
    times = [s["t"] for s in history["samples"]]
    assert times == sorted(set(times))


async def test_start_up_shows_backends_found_and_checks_passing(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    session: aiohttp.ClientSession,
) -> None:
    bal = await start_balancer(
        [_spec(b) for b in backends],
        admin=AdminSettings(listen="127.0.0.1:0"),
        health_check={"enabled": True, "interval": 0.1, "fast_interval": 0.1},
    )
    ids = {bid(b) for b in backends}
    for _ in range(100):  # bounded: until every backend has had its first check
        if all(b.last_check is not None for b in bal.cluster.backends.values()):
            break
        await asyncio.sleep(0.05)
    status, state = await api(session, bal, "GET", "/api/state", headers={})
    assert status == 200
    seen = {(e["kind"], e["backend"], e["detail"]) for e in state["events"]}
    assert {("added", i, "configured") for i in ids} <= seen
    assert {("up", i, "first check passed (HTTP 200)") for i in ids} <= seen
