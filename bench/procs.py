"""Process plumbing: free ports, pinned child processes, bounded waits, group kills."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pinned(cpu: str | None, argv: Sequence[str]) -> list[str]:
    return [*(["taskset", "-c", cpu] if cpu is not None else []), *argv]


def tail(path: Path, lines: int = 5, max_chars: int = 600) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(kept)[-max_chars:]


class Child:
    """A child process in its own session so the whole group can be killed."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def failure(self) -> str:
        code = self.proc.poll()
        state = "still running" if code is None else f"exited with code {code}"
        # The last line is the useful one: HAProxy's ALERT, a traceback's exception, argparse.
        last = tail(self.log, lines=1)
        return f"{self.name} {state}" + (f": {last}" if last else "")

    def wait_port(self, port: int, timeout_s: float = 15.0) -> bool:
        """True once 127.0.0.1:port accepts; False if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exited() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self, grace_s: float = 5.0) -> None:
        """TERM the process group, KILL it if it lingers; always close the log."""
        try:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=grace_s)
            # Grandchildren may outlive a leader that exited on its own.
            _signal_group(self.proc.pid, signal.SIGKILL)
        finally:
            self._log_file.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
