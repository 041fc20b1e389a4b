"""One demo backend and one balancer as child processes, for the measurement scripts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loadtest.local import free_port

HOST = "127.0.0.1"


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout} s")


@dataclass(frozen=True)
class Stack:
    backend_port: int
    listen_port: int
    balancer: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listen_port}/"


@contextmanager
def backend_and_balancer(balancer_args: list[str]) -> Iterator[Stack]:
    """`python -m backends` and `python -m balancer --no-checks ARGS` in front of it."""
    bport, lport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "backends", "--host", HOST, "--port", str(bport)]
                + ["--name", "b1"],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_port(HOST, bport, 15)
        lb = subprocess.Popen(
            [sys.executable, "-m", "balancer", "--listen", f"{HOST}:{lport}"]
            + ["--backend", f"{HOST}:{bport}", "--no-checks", *balancer_args],
            stdout=subprocess.DEVNULL,
        )
        procs.append(lb)
        wait_port(HOST, lport, 15)
        yield Stack(bport, lport, lb)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
