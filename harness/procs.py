"""Child processes: free ports, one launcher, readiness that fails loudly, group teardown.

Every child runs in its own session (so one killpg reaches its helpers) and, on Linux, gets
SIGTERM from the kernel if the process that started it dies without cleaning up
(PR_SET_PDEATHSIG): no orphan survives even a SIGKILLed test run. Start children from the
main thread: the death signal follows the thread that forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 5.0  # SIGTERM -> SIGKILL


class StartError(RuntimeError):
    """A child did not become ready; the message names it, says why and quotes its log."""


def free_port(host: str = HOST, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago. Prefer port 0 where the child reports its port."""
    return free_ports(1, host, kind)[0]


def free_ports(
    count: int, host: str = HOST, kind: socket.SocketKind = socket.SOCK_STREAM
) -> list[int]:
    """Distinct free ports (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def pinned(cpu: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` under `taskset -c CPU` (taskset execs, so the pid stays the child's)."""
    return [*(["taskset", "-c", cpu] if cpu is not None else []), *argv]


def wait_until(pred: Callable[[], object], timeout: float, step: float = 0.05) -> bool:
    """Poll `pred` until truthy or `timeout`; returns its last truth value (for `assert`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def tail(path: Path, lines: int = 15, max_chars: int = 3000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(kept)[-max_chars:]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `python -m` children: this checkout first on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Child:
    """One child process; stdout and stderr go to `log` (appended: restarts keep history)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = REPO,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.cwd = cwd
        self.env = python_env() if env is None else env
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this incarnation's output starts in `log`

    def start(self) -> Child:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self._log_offset = out.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def output(self) -> str:
        """What this incarnation has written so far (stdout and stderr interleaved)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_output(self, text: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: text in self.output(), timeout)

    def describe(self) -> str:
        code = self.returncode
        state = "still running" if code is None else f"exited with status {code}"
        return f"{self.name} (pid {self.popen.pid if self.popen else '-'}) {state}; log {self.log}"

    def last_words(self) -> str:
        """One line: its state and the last line it logged (HAProxy's ALERT, a traceback's
        exception, argparse's complaint)."""
        code = self.returncode
        state = "still running" if code is None else f"exited with status {code}"
        last = tail(self.log, lines=1)
        return f"{self.name} {state}" + (f": {last}" if last else "")

    def fail(self, why: str) -> StartError:
        """Stop the child and build the error a failed readiness check raises."""
        self.stop(grace=2.0)
        return StartError(f"{self.name}: {why}; {self.describe()}:\n{tail(self.log)}")

    def wait_ready(
        self, check: Callable[[], str | None], timeout: float, step: float = 0.05
    ) -> None:
        """Poll `check()` (None = ready, else why not) until ready; raise StartError when the
        child exits or `timeout` passes. The child is stopped before the error is raised."""
        deadline = time.monotonic() + timeout
        why = "no answer yet"
        while True:
            if not self.alive:
                raise self.fail("exited before it was ready")
            problem = check()
            if problem is None:
                return
            why = problem
            if time.monotonic() >= deadline:
                raise self.fail(f"not ready after {timeout:g} s ({why})")
            time.sleep(step)

    def wait_listening(self, port: int, timeout: float) -> None:
        """For children that print nothing useful (nginx, HAProxy): ready once `port`
        accepts and every socket listening on it is this child's."""

        def check() -> str | None:
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    pass
            except OSError as exc:
                return f"port {port}: {exc}"
            return listener_problem(self, port)

        self.wait_ready(check, timeout)

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the child leads its own session)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.wait(timeout)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (plus SIGCONT in case it is paused), bounded wait, then SIGKILL; the group
        is killed in any case so helpers of an exited leader go too. Safe to call twice."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"<Child {self.describe()}>"


# ---------------------------------------------------------------- /proc facts


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- who listens on a port


def _listening_inodes(pid: int, port: int) -> set[str] | None:
    """Inodes of TCP sockets listening on `port` in `pid`'s network namespace (Linux only)."""
    found: set[str] = set()
    seen_table = False
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        seen_table = True
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                found.add(fields[9])
    return found if seen_table else None


def _session_pids(sid: int) -> list[int]:
    """The pids in session `sid` (a child and whatever it forked, e.g. nginx workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # field 6 (session) of /proc/PID/stat
            pids.append(int(entry.name))
    return pids


def _socket_inodes(pid: int) -> set[str] | None:
    """The socket inodes `pid` holds; None when its fds cannot be read (another user)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return set()  # exited in the meantime: holds nothing
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def listener_problem(child: Child, port: int) -> str | None:
    """None if every socket listening on `port` belongs to `child` (or what it forked);
    otherwise why not. This is what proves the answering process is the one just started,
    not a leftover that holds the port. Where /proc cannot tell, it trusts the probe."""
    listening = _listening_inodes(child.pid, port)
    if listening is None:
        return None  # no /proc/PID/net: not Linux
    if not listening:
        return f"nothing listens on port {port}"
    ours: set[str] = set()
    for pid in _session_pids(child.pid) or [child.pid]:
        held = _socket_inodes(pid)
        if held is None:
            return None  # cannot read its fds: trust the probe
        ours |= held
    strangers = listening - ours
    if strangers == listening:
        return f"port {port} is held by another process, not by {child.name}"
    if strangers:
        return f"port {port} is also held by another process (socket inodes {sorted(strangers)})"
    return None
