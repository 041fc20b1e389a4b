"""Balancer child processes for the integration tests (`python -m balancer ...`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IO_TIMEOUT = 5.0  # every single socket operation
START_TIMEOUT = 15.0


class BalancerProc:
    """`python -m balancer ARGS` with stdout/stderr in files; `port`/`admin_url` once ready."""

    def __init__(self, tmp: Path, args: list[str], name: str = "lb") -> None:
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balancer", *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.port = 0
        self.admin_url = ""
        want_admin = "--admin" in args
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.out_path.read_text(errors="replace").splitlines():
                if "listening on " in line:
                    self.port = int(line.rsplit(":", 1)[1])
                if "admin on " in line:
                    self.admin_url = line.rsplit(" ", 1)[1]
            if self.port and (self.admin_url or not want_admin):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"balancer did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: text in self.stderr(), timeout)

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin_url}/api/state", timeout=IO_TIMEOUT) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def post_reload(self) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"{self.admin_url}/api/reload", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=IO_TIMEOUT) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def backends(self) -> dict[str, dict[str, Any]]:
        return {b["address"]: b for b in self.state()["backends"]}

    def event_kinds(self) -> list[str]:
        return [e["kind"] for e in self.state()["events"]]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
