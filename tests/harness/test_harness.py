"""The harness itself: readiness fails loudly, a stranger on the port is caught, nothing
survives a teardown, load is bounded."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from harness import Child, Harness, LoadLoop, StartError, wait_gone
from harness.procs import listener_problem

SLEEPER = [sys.executable, "-c", "print('sleeper up', flush=True); import time; time.sleep(60)"]


def test_a_port_held_by_another_process_is_reported(harness: Harness) -> None:
    child = harness.child("sleeper", SLEEPER)
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        problem = listener_problem(child, port)
    assert problem == f"port {port} is held by another process, not by sleeper"


def test_a_port_held_by_the_child_passes(harness: Harness) -> None:
    b = harness.backend("a")
    assert listener_problem(b, b.port) is None
    assert b.output().startswith(f"backend a listening on {b.url}")


def test_a_backend_cannot_come_up_on_a_port_someone_else_holds(harness: Harness) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        with pytest.raises(StartError, match="exited before it was ready") as err:
            harness.backend("late", port=port)
    assert "cannot listen" in str(err.value)  # the log tail is in the message


def test_readiness_timeout_raises_with_the_log_and_stops_the_child(harness: Harness) -> None:
    child = harness.child("sleeper", SLEEPER)
    assert child.wait_output("sleeper up")
    with pytest.raises(StartError, match=r"not ready after 0.3 s \(still waiting\)") as err:
        child.wait_ready(lambda: "still waiting", 0.3)
    assert "sleeper up" in str(err.value)
    assert not child.alive


def test_a_balancer_that_exits_at_start_fails_loudly(harness: Harness) -> None:
    with pytest.raises(StartError, match="exited before it was ready") as err:
        harness.balancer("--listen", "127.0.0.1:0")  # no backend: a usage error
    assert "exited with status 2" in str(err.value)


def test_close_leaves_no_process_and_no_workdir() -> None:
    h = Harness()
    b = h.backend("a")
    sleeper = h.child("sleeper", SLEEPER)
    workdir = h.workdir
    assert h.close() == []
    assert wait_gone([b.pid, sleeper.pid], 1.0) == []
    assert not workdir.exists()


def test_a_failed_run_keeps_its_logs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ZeroDivisionError), Harness() as h:
        h.child("sleeper", SLEEPER)
        1 / 0  # noqa: B018 - the failure under test
    assert (h.workdir / "sleeper.log").exists()
    assert str(h.workdir) in capsys.readouterr().err
    for f in h.workdir.iterdir():
        f.unlink()
    h.workdir.rmdir()


def test_a_restarted_backend_comes_back_on_its_port(harness: Harness) -> None:
    b = harness.backend("a")
    port, pid = b.port, b.pid
    b.stop()
    b.start()
    assert (b.port, b.alive) == (port, True) and b.pid != pid


def test_load_is_bounded_by_count_and_collapses_repeats() -> None:
    answers = iter([(200, "a"), (200, "a"), (503, "x"), (200, "b"), (200, "a")] * 10)
    with LoadLoop(lambda: next(answers), duration=60.0, max_requests=5) as load:
        load.wait()
    assert load.ok == 4 and load.failures == ["HTTP 503"]
    assert load.values == ["a", "a", "b", "a"]
    assert load.changes() == ["a", "b", "a"]
    assert load.seen_since(2) == {"a", "b"}


def test_child_logs_go_to_the_harness_workdir(harness: Harness, tmp_path: Path) -> None:
    one, two = harness.child("twin", SLEEPER), harness.child("twin", SLEEPER)
    assert one.log != two.log  # the same name twice does not share a log
    assert {one.log.parent, two.log.parent} == {harness.workdir}
    assert harness.workdir.is_relative_to(tmp_path)
    assert isinstance(one, Child)


def test_a_stranger_sharing_the_port_is_reported(harness: Harness) -> None:
    # SO_REUSEPORT lets two processes listen on one port: a probe could reach either
    def reuseport_socket() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s

    with reuseport_socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        code = (
            "import socket, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('bound', flush=True)\n"
            "time.sleep(60)\n"
        )
        child = harness.child("sharer", [sys.executable, "-c", code])
        assert child.wait_output("bound")
        problem = listener_problem(child, port)
    assert problem is not None and problem.startswith(f"port {port} is also held by another")
    assert listener_problem(child, port) is None  # the stranger has gone


def test_a_restarted_balancer_keeps_its_ports(harness: Harness) -> None:
    b = harness.backend("a")
    lb = harness.balancer(
        "--listen", "127.0.0.1:0", "--backend", b.address, "--admin", "127.0.0.1:0"
    )
    url, admin_url, pid = lb.url, lb.admin_url, lb.pid
    lb.stop()
    lb.start()
    assert (lb.url, lb.admin_url) == (url, admin_url) and lb.pid != pid
    assert lb.get("/").headers["X-Backend"] == "a"


def test_a_taken_fixed_port_is_one_line_before_any_child_starts(tmp_path: Path) -> None:
    from harness.stack import LocalStack, PortInUse

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        taken = udp.getsockname()[1]
        stack = LocalStack.ephemeral(
            pair=True, election_ports=(taken, taken + 1), workdir=tmp_path / "run"
        )
        with pytest.raises(PortInUse) as info:
            stack.start()
    assert info.value.port == taken and info.value.kind == "udp"
    assert (
        str(info.value) == f"port {taken} (election of balancer a) is already in use on 127.0.0.1"
    )
    assert stack.procs == []  # nothing was started
