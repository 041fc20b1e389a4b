"""LocalStack and a short local drill: real balancer and backend processes on loopback."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import LocalStack, wait_gone
from harness.procs import free_port
from loadtest import drill


def _stack(tmp_path: Path, **kw: object) -> LocalStack:
    return LocalStack.ephemeral(workdir=tmp_path / "run", **kw)


def test_stack_serves_reports_state_and_stops_clean(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    with stack:
        names = set()
        for _ in range(6):
            with urllib.request.urlopen(stack.service_url + "/", timeout=5) as resp:
                assert resp.status == 200
                names.add(resp.headers["X-Backend"])
        assert names == {"b1", "b2", "b3"}  # round-robin reaches every backend
        with urllib.request.urlopen(stack.admin_urls["a"] + "/api/state", timeout=5) as resp:
            state = json.load(resp)
        assert sorted(b["id"] for b in state["backends"]) == sorted(
            stack.backend_id(i) for i in range(3)
        )
        old_pid, old_id = stack.backends[1].pid, stack.backend_id(1)
        stack.kill_backend(1, signal.SIGKILL)
        assert wait_gone([old_pid]) == []
        stack.restart_backend(1)  # on the same port, which the balancer still lists
        assert stack.backends[1].alive and stack.backends[1].pid != old_pid
        assert stack.backend_id(1) == old_id
        pids = [p.pid for p in stack.procs]
    assert len(pids) == 4
    assert all(p.returncode is not None for p in stack.procs)
    assert wait_gone(pids) == []


def _one_connection(address: str, n: int) -> list[str]:
    """X-Backend of `n` requests sent on one keep-alive connection."""
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        seen = []
        for _ in range(n):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            seen.append(resp.headers["X-Backend"])
        return seen
    finally:
        conn.close()


def test_tcp_mode_listener_pins_a_connection_http_spreads_it(tmp_path: Path) -> None:
    # what `make local MODE=tcp` runs: a TCP-mode listener beside the HTTP one
    stack = _stack(tmp_path, tcp_port=free_port(), admin=False)
    with stack:
        assert stack.tcp_address is not None
        assert len(set(_one_connection(stack.tcp_address, 6))) == 1
        http_address = stack.service_url.removeprefix("http://")
        assert set(_one_connection(http_address, 6)) == {"b1", "b2", "b3"}


def test_pair_with_a_tcp_listener_fails_over(tmp_path: Path) -> None:
    # the TCP-mode listener is bound by the active only, and moves with the role
    stack = _stack(tmp_path, pair=True, tcp_port=free_port())
    with stack:
        assert stack.tcp_address is not None
        assert len(_one_connection(stack.tcp_address, 2)) == 2
        a_pid = stack.balancer("a").pid
        stack.kill_balancer("a", signal.SIGKILL)
        assert wait_gone([a_pid]) == []
        served: list[str] = []
        for _ in range(100):  # bounded: b takes over within about a second
            try:
                served = _one_connection(stack.tcp_address, 2)
                break
            except OSError:
                time.sleep(0.1)
        assert len(served) == 2 and stack.balancer("b").role() == "active"


def test_tls_stack_is_verified_against_its_ca(tmp_path: Path) -> None:
    stack = _stack(tmp_path, tls=True, pki_dir=tmp_path / "pki", admin=False)
    with stack:
        assert stack.service_url.startswith("https://") and stack.ca_file
        ctx = ssl.create_default_context(cafile=stack.ca_file)
        with urllib.request.urlopen(stack.service_url + "/", timeout=5, context=ctx) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(stack.service_url + "/", timeout=5)


def test_children_die_with_a_killed_runner(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from harness import LocalStack\n"
        f"s = LocalStack.ephemeral(admin=False, workdir=Path({str(tmp_path)!r}))\n"
        "s.start()\n"
        "print(' '.join(str(p.pid) for p in s.procs), flush=True)\n"
        "time.sleep(60)\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout is not None
        line = runner.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4, line
    finally:
        runner.kill()  # no cleanup code runs: PR_SET_PDEATHSIG has to do it
        runner.wait(10)
    assert wait_gone(pids) == []


def test_bad_drill_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        drill.main(["no-such-scenario", "--json", "/tmp/x.json"])
    assert exc.value.code == 2
    assert drill.main(["kill-backend", "--local", "--json", "x.json", "--rate", "0"]) == 2
    assert drill.main(["disconnect-backend", "--local", "--json", "x.json"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "--rate must be" in err and "docker target" in err
    assert "Traceback" not in err


def test_kill_backend_drill_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "kb.json"
    argv = ["kill-backend", "--local", "--json", str(out), "--md", str(tmp_path / "kb.md")]
    argv += ["--rate", "50", "--duration", "6", "--fault-at", "1.5", "--restore-at", "3"]
    assert drill.main([*argv, "--quiet", "--no-expect"]) == 0
    r = json.loads(out.read_text())
    assert r["scenario"] == "kill-backend" and r["faulted"] == "b2"
    assert r["counts"]["sent"] == 300
    assert r["detect_s"] is not None and r["detect_s"] >= 0
    assert r["per_backend_by_phase"]["before"].keys() == {"b1", "b2", "b3"}
    assert [e["kind"] for e in r["events"]] == ["kill", "restart"]
    assert (tmp_path / "kb.md").read_text().startswith("# Drill `kill-backend`")
