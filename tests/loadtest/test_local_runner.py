"""`python -m loadtest.local` as a user runs it: kill a child, the rest keeps serving, restart
it through the control socket; a taken port is one line naming the port and what to change."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, free_ports, wait_gone, wait_until
from harness.procs import python_env
from loadtest import local

START_S = 60.0


class Runner:
    def __init__(self, tmp_path: Path, *, pair: bool = False) -> None:
        self.listen, admin_a, admin_b, *self.backends = free_ports(6)
        self.admin = f"{admin_a},{admin_b}" if pair else str(admin_a)
        self.workdir = tmp_path / "run"
        self.out = tmp_path / "runner.out"
        argv = [sys.executable, "-m", "loadtest.local", "--workdir", str(self.workdir)]
        argv += ["--listen-port", str(self.listen), "--admin-ports", self.admin]
        argv += ["--backend-ports", ",".join(map(str, self.backends))]
        if pair:
            election = free_ports(2, kind=socket.SOCK_DGRAM)
            argv += ["--pair", "--election-ports", ",".join(map(str, election))]
        with open(self.out, "wb") as out:
            self.popen = subprocess.Popen(
                argv, cwd=REPO, env=python_env(), stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def status(self) -> dict[str, dict[str, Any]] | None:
        try:
            answer = local.request(self.workdir, "status", timeout=5.0)
        except (OSError, ValueError):
            return None
        return {p["name"]: p for p in answer["procs"]}

    def ready(self) -> bool:
        return "Ctrl-C stops everything" in self.text()

    def get(self, url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.headers.get("X-Backend", "")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                return self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(10)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path)
    try:
        assert wait_until(lambda: r.ready() or r.popen.poll() is not None, START_S), r.text()
        assert r.ready(), r.text()
        yield r
    finally:
        r.stop()


def test_kill_one_backend_the_rest_serves_and_restart_brings_it_back(runner: Runner) -> None:
    out = runner.text()
    before = runner.status()
    assert before is not None and set(before) == {"b1", "b2", "b3", "a"}
    b2_pid = before["b2"]["pid"]
    # the banner names each process with its pid and the commands to kill / restart it
    assert f"kill -9 {b2_pid}" in out
    assert "-m loadtest.local restart b2 --workdir" in out

    os.kill(b2_pid, signal.SIGKILL)
    assert wait_gone([b2_pid]) == []
    assert wait_until(lambda: f"b2 (pid {b2_pid}) died: killed by SIGKILL" in runner.text(), 10)
    service = f"http://127.0.0.1:{runner.listen}/"
    # the balancer's checks take b2 out; from then on every request is served by b1 or b3
    assert wait_until(lambda: runner.get(service)[0] == 200, 15)
    answers = [runner.get(service) for _ in range(6)]
    assert all(code == 200 for code, _ in answers), answers
    assert runner.popen.poll() is None  # the runner and the other children keep running
    after = runner.status()
    assert after is not None
    assert not after["b2"]["alive"]
    assert all(after[n]["alive"] and after[n]["pid"] == before[n]["pid"] for n in ("b1", "b3", "a"))

    res = subprocess.run(
        [sys.executable, "-m", "loadtest.local", "restart", "b2", "--workdir", str(runner.workdir)],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    again = runner.status()
    assert again is not None and again["b2"]["alive"]
    assert again["b2"]["pid"] != b2_pid and f"pid {again['b2']['pid']}" in res.stdout
    b2 = f"http://127.0.0.1:{runner.backends[1]}/healthz"
    assert runner.get(b2) == (200, "b2")  # on its old port, where the balancer expects it
    assert wait_until(lambda: "b2" in {runner.get(service)[1] for _ in range(3)}, 15)
    assert runner.stop() == 0


def test_control_command_errors_are_one_line(runner: Runner, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "loadtest.local"]
    cases = [
        (["restart", "b9", "--workdir", str(runner.workdir)], "no process named 'b9'"),
        (["status", "--workdir", str(tmp_path / "nothing")], "no running `make local`"),
    ]
    for argv, needle in cases:
        res = subprocess.run(
            [*base, *argv], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 1
        assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr
    # a second runner on the same work dir is refused before it touches anything
    second = subprocess.run(
        [*base, "--workdir", str(runner.workdir), "--duration", "5"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "another `make local` is running" in second.stderr
    assert runner.status() is not None  # the first one still answers


def test_taken_port_is_one_line_naming_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        admin, *backends = free_ports(4)
        argv = [sys.executable, "-m", "loadtest.local", "--workdir", str(tmp_path / "run")]
        argv += ["--listen-port", str(port), "--admin-ports", str(admin), "--duration", "5"]
        argv += ["--backend-ports", ",".join(map(str, backends))]
        res = subprocess.run(
            argv, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60
        )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"port {port} (service) is already in use" in lines[0]
    assert "LISTEN_PORT=" in lines[0] and "--listen-port" in lines[0]
    assert (tmp_path / "run").is_dir()


def test_pair_kill_the_active_balancer_the_passive_serves_and_a_comes_back(
    tmp_path: Path,
) -> None:
    runner = Runner(tmp_path, pair=True)
    try:
        assert wait_until(lambda: runner.ready() or runner.popen.poll() is not None, START_S)
        assert runner.ready(), runner.text()
        before = runner.status()
        assert before is not None and set(before) == {"b1", "b2", "b3", "a", "b"}
        a_pid = before["a"]["pid"]
        os.kill(a_pid, signal.SIGKILL)
        assert wait_gone([a_pid]) == []
        assert wait_until(lambda: f"a (pid {a_pid}) died: killed by SIGKILL" in runner.text(), 10)
        service = f"http://127.0.0.1:{runner.listen}/"
        assert wait_until(lambda: runner.get(service)[0] == 200, 20)  # b took over
        after = runner.status()
        assert after is not None and after["b"]["alive"] and after["b"]["pid"] == before["b"]["pid"]
        answer = local.request(runner.workdir, "restart a")
        assert answer["ok"] and answer["pid"] != a_pid, answer
        assert runner.get(service)[0] == 200
        assert runner.popen.poll() is None
    finally:
        assert runner.stop() == 0
