"""A hung backend's in-flight requests are retried elsewhere once it is declared down."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backends.testing import spawn_backend_process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["X-Backend"], time.monotonic() - t0


def test_requests_stuck_on_a_paused_backend_move_to_another(tmp_path: Path) -> None:
    good = spawn_backend_process("good", port=0)
    hung = spawn_backend_process("hung", port=0)
    listen, admin = _free_port(), _free_port()
    log = (tmp_path / "lb.log").open("w")
    lb = subprocess.Popen(
        [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{listen}"]
        + ["--backend", f"127.0.0.1:{good.port}", "--backend", f"127.0.0.1:{hung.port}"]
        + ["--admin", f"127.0.0.1:{admin}", "--timeout-backend-response", "30"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{listen}/"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                _get(base)
                break
            except OSError:
                time.sleep(0.1)
        os.kill(hung.pid, signal.SIGSTOP)
        # round robin sends about half of these to the paused backend
        with ThreadPoolExecutor(8) as workers:
            results = list(workers.map(lambda _: _get(base), range(8)))
        assert all(status == 200 for status, _, _ in results)
        assert {name for _, name, _ in results} == {"good"}
        # the stuck ones waited for detection, far less than the 30 s response timeout
        assert max(t for _, _, t in results) < 10
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/state", timeout=5) as r:
            state = json.load(r)
        kinds = [e["kind"] for e in state["events"]]
        assert "rescued" in kinds and "down" in kinds
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        for p in (lb, good, hung):
            p.terminate()
        for p in (lb, good, hung):
            p.wait(15)
        log.close()
