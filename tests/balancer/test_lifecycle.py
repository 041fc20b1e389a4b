"""The balancer's life cycle through real signals to a real process: SIGTERM drains in-flight
requests and exits 0; SIGHUP (and POST /api/reload) re-reads the TOML config under load; an
invalid new config is refused while the old one keeps serving.

Every balancer and backend is a child process on free loopback ports, killed at teardown.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import BackendProc, BalancerProc, LoadLoop, wait_until
from harness.http import IO_TIMEOUT

# ---------------------------------------------------------------- processes


def plain_get(port: int, path: str, timeout: float = IO_TIMEOUT) -> tuple[int, str | None]:
    """(status, X-Backend) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers["X-Backend"]
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def backend_load(port: int, duration: float) -> LoadLoop[str | None]:
    """One request per fresh connection until `duration` is over; records X-Backend."""
    return LoadLoop(lambda: plain_get(port, "/"), duration)


def write_config(path: Path, body: str) -> None:
    """Replace the TOML file atomically (a reload never reads half a file)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(body)
    os.replace(tmp, path)


def toml(algorithm: str, backends: list[str]) -> str:
    return (
        'listen = "127.0.0.1:0"\n'
        f'algorithm = "{algorithm}"\n'
        f"backends = [{', '.join(backends)}]\n"
        "[admin]\n"
        'listen = "127.0.0.1:0"\n'
    )


def addr(b: BackendProc) -> str:
    return f"127.0.0.1:{b.port}"


# ---------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_in_flight_refuses_new_and_exits_0(
    signum: signal.Signals,
    backend: Callable[..., BackendProc],
    balancer: Callable[..., BalancerProc],
) -> None:
    a = backend("a")
    lb = balancer("--listen", "127.0.0.1:0", "--backend", addr(a), "--admin", "127.0.0.1:0")
    result: list[tuple[int, str | None] | BaseException] = []

    def slow() -> None:
        try:
            result.append(plain_get(lb.port, "/delay?ms=1500", timeout=10.0))
        except BaseException as exc:  # reported by the assertion below
            result.append(exc)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: lb.backends()[addr(a)]["in_flight"] == 1, 5.0)
        lb.signal(signum)
        assert wait_until(lambda: refused(lb.port), 3.0)
        assert lb.alive  # still draining the slow request
    finally:
        t.join(15.0)
    assert result == [(200, "a")]
    assert lb.wait(timeout=10.0) == 0


def test_sigterm_with_a_request_longer_than_the_grace_exits_after_the_grace(
    backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    a = backend("a")
    lb = balancer(
        "--listen",
        "127.0.0.1:0",
        "--backend",
        addr(a),
        "--admin",
        "127.0.0.1:0",
        "--timeout-shutdown-grace",
        "1",
    )
    result: list[tuple[int, str | None] | BaseException] = []

    def slow() -> None:
        try:
            result.append(plain_get(lb.port, "/delay?ms=8000", timeout=10.0))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: lb.backends()[addr(a)]["in_flight"] == 1, 5.0)
        lb.signal(signal.SIGTERM)
        assert lb.wait(timeout=15.0) == 0
    finally:
        t.join(15.0)
    # the grace (1 s), not the 8 s request, ended it: the cut-off client sees the connection
    # end, not a made-up success
    assert len(result) == 1 and isinstance(result[0], OSError | http.client.HTTPException)


# ---------------------------------------------------------------- SIGHUP / reload


def test_sighup_and_admin_reload_under_load(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    cfg = tmp_path / "lb.toml"
    write_config(cfg, toml("least-connections", [f'"{addr(a)}"']))
    lb = balancer("--config", str(cfg), admin=True)
    assert lb.state()["algorithm"] == "least-connections"

    with backend_load(lb.port, duration=3.0) as load:
        time.sleep(0.5)
        # new backend b, weighted round-robin, a's weight 1 -> 3
        write_config(
            cfg, toml("round-robin", [f'{{address = "{addr(a)}", weight = 3}}', f'"{addr(b)}"'])
        )
        mark = len(load.values)
        lb.signal(signal.SIGHUP)
        assert wait_until(lambda: lb.state()["algorithm"] == "round-robin", 5.0)
        assert wait_until(lambda: "b" in load.seen_since(mark), 5.0)
        load.wait()
    assert load.failures == []
    assert load.ok > 20
    backends = lb.backends()
    assert set(backends) == {addr(a), addr(b)}
    assert backends[addr(a)]["weight"] == 3
    assert "reload" in lb.event_kinds()
    after = load.values[mark:][-40:]  # well after the switch: a 3 times as often as b
    assert after.count("a") > 2 * after.count("b") > 0, after

    # the same through the admin API; this time `a` goes away (drained) and `c` joins
    with backend_load(lb.port, duration=3.0) as load:
        time.sleep(0.5)
        write_config(cfg, toml("round-robin", [f'"{addr(b)}"', f'"{addr(c)}"']))
        result = {"applied": ["backends"], "restart_needed": [], "refused": None}
        assert lb.post_reload() == (200, result)
        mark = len(load.values)
        assert wait_until(lambda: {"b", "c"} <= load.seen_since(mark), 5.0)
        load.wait()
    assert load.failures == []
    state = lb.state()
    assert state["algorithm"] == "round-robin"
    assert wait_until(lambda: set(lb.backends()) == {addr(b), addr(c)}, 5.0), lb.backends()
    assert {"draining", "removed"} <= set(lb.event_kinds())
    assert {plain_get(lb.port, "/")[1] for _ in range(6)} == {"b", "c"}


def test_invalid_new_config_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    a, b = backend("a"), backend("b")
    cfg = tmp_path / "lb.toml"
    good = toml("round-robin", [f'"{addr(a)}"', f'"{addr(b)}"'])
    write_config(cfg, good)
    lb = balancer("--config", str(cfg), admin=True)

    with backend_load(lb.port, duration=3.0) as load:
        time.sleep(0.3)
        write_config(cfg, good.replace("backends = [", "backends = [[[ oops"))  # bad TOML
        lb.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in lb.output(), 5.0), lb.output()
        assert "invalid TOML" in lb.output()
        assert wait_until(lambda: "reload-refused" in lb.event_kinds(), 5.0)

        write_config(cfg, good.replace("round-robin", "fastest-please"))  # unknown algorithm
        status, body = lb.post_reload()
        assert status == 422
        assert "reload refused" in body["error"] and "fastest-please" in body["refused"]
        mark = len(load.values)
        load.wait()
    assert load.failures == []
    assert load.seen_since(mark) == {"a", "b"}  # still both, still round-robin
    state = lb.state()
    assert state["algorithm"] == "round-robin"
    assert set(lb.backends()) == {addr(a), addr(b)}
    assert [e["kind"] for e in state["events"]].count("reload-refused") == 2
    assert lb.alive


def test_reload_says_which_changes_need_a_restart(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    a = backend("a")
    cfg = tmp_path / "lb.toml"
    base = toml("round-robin", [f'"{addr(a)}"'])
    write_config(cfg, base)
    lb = balancer("--config", str(cfg), admin=True)
    # a new health interval and listener address cannot be applied in place
    write_config(
        cfg,
        base.replace('listen = "127.0.0.1:0"\nalgorithm', 'listen = "127.0.0.1:1"\nalgorithm')
        + "[health_check]\ninterval = 1.0\n",
    )
    lb.signal(signal.SIGHUP)
    assert wait_until(lambda: "takes effect after a restart" in lb.output(), 5.0), lb.output()
    reloads = [e for e in lb.state()["events"] if e["kind"] == "reload"]
    assert reloads and reloads[0]["detail"].endswith(
        "restart needed for listen, health_check.interval"
    )
    assert "restart needed for listen, health_check.interval" in lb.output()  # SIGHUP logs it
    assert plain_get(lb.port, "/") == (200, "a")  # still on the port it was bound to


def test_tune_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    # in a child interpreter: freezing this test process's heap would leak into other tests
    code = (
        "import gc, balancer.__main__ as m\n"
        "before = gc.get_threshold()\n"
        "m.tune_gc()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold()[0] == m.GC_GEN0_THRESHOLD > before[0]\n"
        "assert gc.get_threshold()[1:] == before[1:] and gc.isenabled()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
