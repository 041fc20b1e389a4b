"""One harness for tests, bench and `python -m loadtest.local`: demo backends, balancer
processes (standalone or a pair) and bounded load, with readiness checks that fail loudly,
proof that the process answering is the one just started, logs kept for failures and a
teardown that leaves no process behind.

    with Harness() as h:                      # or the `harness` pytest fixture
        a = h.backend("a")                    # python -m backends, ready, X-Backend: a
        lb = h.balancer("--listen", "127.0.0.1:0", "--backend", a.address,
                        "--admin", "127.0.0.1:0")
        lb.get("/").status, lb.state()["backends"]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.backends import BackendProc, RunningBackend, run_backend
from harness.balancers import BalancerProc, pair_args
from harness.load import LoadLoop, cpu_load
from harness.procs import (
    HOST,
    REPO,
    Child,
    StartError,
    free_port,
    free_ports,
    pinned,
    tail,
    wait_until,
)
from harness.stack import LocalStack, StackError, wait_gone

__all__ = [
    "HOST",
    "REPO",
    "BackendProc",
    "BalancerProc",
    "Child",
    "Harness",
    "LoadLoop",
    "LocalStack",
    "RunningBackend",
    "StackError",
    "StartError",
    "cpu_load",
    "free_port",
    "free_ports",
    "pair_args",
    "pinned",
    "run_backend",
    "tail",
    "wait_gone",
    "wait_until",
]


class Harness:
    """Owns a work directory (logs) and every child it started; `close()` stops them all.

    With no `workdir` it makes a temporary one and removes it on a clean close; after an
    exception (or with `keep=True`) the logs stay and `close()` says where.
    """

    def __init__(self, workdir: Path | None = None, *, keep: bool = False) -> None:
        self._own = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lb-harness-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.children: list[Child] = []
        self.stacks: list[LocalStack] = []

    def _log(self, name: str) -> Path:
        # a name used twice (a restarted node, two "lb"s) gets its own file
        path, n = self.workdir / f"{name}.log", 1
        while path.exists() or any(c.log == path for c in self.children):
            n += 1
            path = self.workdir / f"{name}-{n}.log"
        return path

    def backend(self, name: str, **kwargs: Any) -> BackendProc:
        """A ready `python -m backends --name NAME` (keywords: see BackendProc)."""
        proc = BackendProc(name, self._log(f"backend-{name}"), **kwargs)
        self.children.append(proc)
        return proc.start()

    def balancer(
        self,
        *args: str,
        name: str = "lb",
        admin: bool | None = None,
        listens: bool = True,
        start_timeout: float | None = None,
    ) -> BalancerProc:
        """A ready `python -m balancer ARGS` (see BalancerProc for what ready means)."""
        kw: dict[str, Any] = {} if start_timeout is None else {"start_timeout": start_timeout}
        proc = BalancerProc(name, args, self._log(name), admin=admin, listens=listens, **kw)
        self.children.append(proc)
        return proc.start()

    def child(self, name: str, argv: Sequence[str], **kwargs: Any) -> Child:
        """Any other child (nginx, HAProxy, a proxy under test), started, not waited for:
        follow with `wait_listening(port, timeout)` or `wait_ready(check, timeout)`."""
        proc = Child(name, argv, self._log(name), **kwargs)
        self.children.append(proc)
        return proc.start()

    def stack(self, **kwargs: Any) -> LocalStack:
        """A started `LocalStack.ephemeral(**kwargs)` with its logs in this workdir."""
        kwargs.setdefault("workdir", self.workdir / f"stack-{len(self.stacks) + 1}")
        stack = LocalStack.ephemeral(**kwargs)
        self.stacks.append(stack)
        stack.start()
        return stack

    def logs(self, lines: int = 20) -> str:
        """The tail of every child's log, for a failure report."""
        parts = []
        for c in [*self.children, *(p for s in self.stacks for p in s.procs)]:
            parts.append(f"---- {c.describe()}\n{tail(c.log, lines)}")
        return "\n".join(parts)

    def close(self, failed: bool = False) -> list[int]:
        """Stop everything (newest first); returns the pids that survived, which should be
        none. Removes the workdir it made unless something failed or `keep` is set."""
        pids = [c.pid for c in self.children if c.popen is not None]
        for stack in reversed(self.stacks):
            pids += [p.pid for p in stack.procs if p.popen is not None]
            stack.stop()
        for child in reversed(self.children):
            child.stop()
        left = wait_gone(pids, 5.0)
        if self._own and not (failed or self.keep or left):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return left

    def __enter__(self) -> Harness:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        left = self.close(failed=exc is not None)
        if exc is not None:
            print(f"harness: logs kept in {self.workdir}", file=sys.stderr)
        if left and exc is None:
            raise RuntimeError(f"harness: processes survived the teardown: {left}")
