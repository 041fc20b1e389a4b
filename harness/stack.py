"""Backends b1..bN and one balancer (or a pair `a`/`b`) on loopback, as child processes.

`python -m loadtest.local` runs one on fixed ports; drills, soak and tests use
`LocalStack.ephemeral()`, which lets every process pick its own port where it can report
it, and takes free ports only where two processes must agree beforehand (a pair's shared
service port and election ports).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from balancer.lb.algorithms import ALGORITHMS
from harness.backends import BackendProc
from harness.balancers import BalancerProc, pair_args
from harness.http import probe
from harness.netns import NetNs
from harness.procs import (
    HOST,
    REPO,
    Child,
    StartError,
    free_port,
    free_ports,
    listener_problem,
)

BACKEND_PORTS = (9101, 9102, 9103)
LISTEN_PORT = 8080
ADMIN_PORTS = (9000, 9001)
ELECTION_PORTS = (7946, 7947)
PRIORITIES = (150, 100)


class StackError(StartError):
    """The stack could not be started; the message says which process and why."""


class PortInUse(StackError):
    """A fixed port is taken before anything started; `role` says what it was meant for."""

    def __init__(self, port: int, role: str, host: str, kind: str) -> None:
        self.port, self.role, self.host, self.kind = port, role, host, kind
        super().__init__(f"port {port} ({role}) is already in use on {host}")


def port_taken(host: str, port: int, kind: socket.SocketKind) -> bool:
    """True if binding `port` fails with "address in use" (as the child's bind would: TCP
    with SO_REUSEADDR, like asyncio's servers, so a TIME_WAIT leftover is not "taken")."""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            if kind == socket.SOCK_STREAM:
                s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class LocalStack:
    """Backends b1..bN and one balancer (or a pair `a`/`b`) on loopback.

    Backends are addressed by 0-based index (b1 is 0). Balancer admin APIs are plain HTTP.
    Port 0 means "the process picks one and reports it".
    """

    def __init__(
        self,
        *,
        algorithm: str = "round-robin",
        hash_key: str | None = None,
        tls: bool = False,
        pair: bool = False,
        admin: bool = True,
        host: str = HOST,
        backend_ports: tuple[int, ...] = BACKEND_PORTS,
        listen_port: int = LISTEN_PORT,
        admin_ports: tuple[int, int] = ADMIN_PORTS,
        election_ports: tuple[int, int] = ELECTION_PORTS,
        tcp_port: int | None = None,
        workdir: Path | None = None,
        pki_dir: Path | None = None,
        check_interval: float | None = None,
        balancer_args: tuple[str, ...] = (),
        ready_timeout: float = 20.0,
        netns_backends: tuple[int, ...] = (),
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise StackError(f"unknown algorithm {algorithm!r}; choose {', '.join(ALGORITHMS)}")
        if pair and not admin:
            raise StackError("a pair needs the admin API (to tell the active from the passive)")
        if pair and (listen_port == 0 or 0 in election_ports):
            raise StackError("a pair needs a fixed service port and election ports")
        self.algorithm = algorithm
        self.hash_key = hash_key
        self.tls = tls
        self.pair = pair
        self.admin = admin
        self.host = host
        self.backend_ports = backend_ports
        self.listen_port = listen_port
        self.admin_ports = admin_ports
        self.election_ports = election_ports
        self.check_interval = check_interval
        self.balancer_args = balancer_args
        self.ready_timeout = ready_timeout
        # a TCP-mode listener beside the HTTP one, on the same backends (None: none)
        self.tcp_port = tcp_port
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lb-local-"))
        self.pki_dir = (pki_dir or Path("pki")).resolve()
        self.ca_file: str | None = str(self.pki_dir / "ca.crt") if tls else None
        self.backends: list[BackendProc] = []
        self.balancers: list[BalancerProc] = []
        # backend index -> its own network namespace (harness.netns), for netem drills
        self.netns_backends = netns_backends
        self.namespaces: dict[int, NetNs] = {}
        self._ssl: ssl.SSLContext | None = None

    @classmethod
    def ephemeral(cls, *, pair: bool = False, **kwargs: Any) -> LocalStack:
        """A stack that cannot collide with `make local` or another run (see the module)."""
        kwargs.setdefault("backend_ports", (0, 0, 0))
        kwargs.setdefault("admin_ports", (0, 0))
        kwargs.setdefault("listen_port", free_port() if pair else 0)
        election = free_ports(2, kind=socket.SOCK_DGRAM)  # held together: they differ
        kwargs.setdefault("election_ports", (election[0], election[1]))
        return cls(pair=pair, **kwargs)

    # addresses --------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def service_port(self) -> int:
        """The service port (known once started when `listen_port` was 0)."""
        if self.listen_port == 0 and self.balancers:
            return self.balancers[0].port
        return self.listen_port

    @property
    def service_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.service_port}"

    @property
    def tcp_address(self) -> str | None:
        """host:port of the TCP-mode listener, when the stack has one."""
        return None if self.tcp_port is None else f"{self.host}:{self.tcp_port}"

    @property
    def admin_urls(self) -> dict[str, str]:
        return {b.name: b.admin_url for b in self.balancers if b.admin_url}

    @property
    def backend_urls(self) -> dict[str, str]:
        return {b.name: b.url for b in self.backends}

    def backend_id(self, i: int) -> str:
        """The backend's id in the balancer's /api/state: its name, as in X-Backend."""
        return self.backends[i].name

    def balancer(self, name: str) -> BalancerProc:
        for b in self.balancers:
            if b.name == name:
                return b
        raise KeyError(f"no balancer named {name!r}")

    @property
    def procs(self) -> list[Child]:
        return [*self.backends, *self.balancers]

    # life cycle -------------------------------------------------------------------------
    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start everything and wait (bounded) until each process answers; stop on failure."""
        try:
            self._start()
        except PortInUse:
            self.stop(keep_logs=True)
            raise
        except StartError as exc:
            self.stop(keep_logs=True)  # the error names a log file: it must still be there
            raise StackError(str(exc)) from None
        except BaseException:
            self.stop()
            raise

    def fixed_ports(self) -> list[tuple[int, str, socket.SocketKind]]:
        """(port, role, kind) of every port fixed beforehand (0 = picked by the child)."""
        tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
        ports = [(p, f"backend b{i + 1}", tcp) for i, p in enumerate(self.backend_ports)]
        ports.append((self.listen_port, "service", tcp))
        if self.tcp_port:
            ports.append((self.tcp_port, "TCP-mode service", tcp))
        names = ("a", "b") if self.pair else ("a",)
        if self.admin:
            ports += [
                (self.admin_ports[i], f"admin of balancer {n}", tcp) for i, n in enumerate(names)
            ]
        if self.pair:
            ports += [
                (self.election_ports[i], f"election of balancer {n}", udp)
                for i, n in enumerate(names)
            ]
        return [(p, role, kind) for p, role, kind in ports if p]

    def check_ports(self) -> None:
        """Raise PortInUse for the first fixed port another process holds: one clear line
        before any child starts, instead of a child's traceback."""
        for port, role, kind in self.fixed_ports():
            if port_taken(self.host, port, kind):
                raise PortInUse(
                    port, role, self.host, "udp" if kind == socket.SOCK_DGRAM else "tcp"
                )

    def _start(self) -> None:
        self.check_ports()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        tls_args: list[str] = []
        if self.tls:
            cert, key = self._issue_certs()
            tls_args = ["--tls-cert", cert, "--tls-key", key]
            self._ssl = ssl.create_default_context(cafile=self.ca_file)
        for i, port in enumerate(self.backend_ports):
            name = f"b{i + 1}"
            ns = None
            if i in self.netns_backends:
                ns = self.namespaces[i] = NetNs.create()  # NetNsError: one line, as StartError
            proc = BackendProc(
                name,
                logs / f"{name}.log",
                host=self.host if ns is None else ns.inner_ip,
                port=port,
                shutdown_timeout=2.0,
                start_timeout=self.ready_timeout,
            )
            if ns is not None:
                proc.argv = ns.wrap(proc.argv)  # `ip netns exec` execs: same pid
            self.backends.append(proc)
            proc.start_nowait()  # all three boot at once; readiness is checked below
        for proc in self.backends:
            proc.wait_until_ready()
        common = ["--listen", f"{self.host}:{self.listen_port}"]
        if self.tcp_port is not None:
            common += ["--listener", f"{self.host}:{self.tcp_port},mode=tcp"]
        for b in self.backends:
            # the balancer's name for it is the demo backend's own X-Backend name
            common += ["--backend", f"{b.address},name={b.name}"]
        common += ["--algorithm", self.algorithm, "--timeout-shutdown-grace", "3"]
        if self.hash_key:
            common += ["--hash-key", self.hash_key]
        if self.check_interval is not None:
            common += ["--check-interval", str(self.check_interval)]
        common += tls_args + list(self.balancer_args)
        if not self.pair:
            argv = list(common)
            if self.admin:
                argv += ["--admin", f"{self.host}:{self.admin_ports[0]}"]
            self.balancers.append(self._balancer("a", argv, listens=True))
        else:
            secret = self._write_secret()
            for me, name in enumerate(("a", "b")):
                argv = [*common, "--admin", f"{self.host}:{self.admin_ports[me]}"]
                argv += pair_args(
                    election=self.election_ports[me],
                    peer=self.election_ports[1 - me],
                    priority=PRIORITIES[me],
                    secret_file=secret,
                    host=self.host,
                )
                # a pair node starts passive: only the active binds the service
                self.balancers.append(self._balancer(name, argv, listens=False))
        for node in self.balancers:
            node.start_nowait()  # they boot together; each is checked below
        for node in self.balancers:
            node.wait_until_ready()
        # the service answers 200 once the checks have marked a backend up, and the
        # process answering must be ours (a is the active of a pair: higher priority)
        first = self.balancers[0]
        first.wait_ready(self._service_ready, self.ready_timeout, step=0.1)

    def _balancer(self, name: str, argv: list[str], *, listens: bool) -> BalancerProc:
        return BalancerProc(
            name,
            argv,
            self.workdir / "logs" / f"{name}.log",
            listens=listens,
            start_timeout=self.ready_timeout,
        )

    def _service_ready(self) -> str | None:
        problem = probe(self.host, self.service_port, "/", ctx=self._ssl)
        if problem is None:
            problem = listener_problem(self.balancers[0], self.service_port)
        return problem

    def stop(self, keep_logs: bool = False) -> None:
        """Stop balancers first (they drain), then backends. Safe to call twice."""
        for proc in [*self.balancers, *self.backends]:
            proc.stop()
        for ns in self.namespaces.values():
            ns.delete()  # its veth and any netem qdisc go with it
        if keep_logs:
            self._own_workdir = False  # a later stop() must not remove them either
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # drills -------------------------------------------------------------------------------
    def kill_backend(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.backends[i].signal(sig)

    def restart_backend(self, i: int, wait: bool = True) -> None:
        """Start backend i again (after a kill/stop) on the same port."""
        proc = self.backends[i]
        proc.stop(grace=2.0)
        if wait:
            proc.start()
        else:
            proc.start_nowait()

    def kill_balancer(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.balancer(name).signal(sig)

    def restart_balancer(self, name: str, wait: bool = False) -> None:
        """Start balancer `name` again (a drill times the recovery itself: no wait)."""
        proc = self.balancer(name)
        proc.stop(grace=2.0)
        if wait:
            proc.start()
        else:
            proc.start_nowait()

    def renew_cert(self) -> str:
        """`python -m ca renew` the balancers' certificate in place (their hot reload picks
        it up); returns the CLI's line (it names the new serial)."""
        argv = [sys.executable, "-m", "ca", "renew", "--dir", str(self.pki_dir), "localhost"]
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = (res.stdout if res.returncode == 0 else res.stderr or res.stdout).splitlines()
        if res.returncode != 0:
            raise StackError(f"ca renew failed: {lines[-1] if lines else res.returncode}")
        return lines[-1] if lines else ""

    # helpers ------------------------------------------------------------------------------
    def _issue_certs(self) -> tuple[str, str]:
        run = [sys.executable, "-m", "ca"]
        d = str(self.pki_dir)
        issue = [*run, "issue", "--dir", d, "--name", "localhost", "--ip", self.host]
        for argv in ([*run, "init", "--dir", d], [*issue, "--dns", "localhost", "--force"]):
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise StackError(f"{' '.join(argv[1:4])} failed: {msg[-1] if msg else '?'}")
        return str(self.pki_dir / "localhost.crt"), str(self.pki_dir / "localhost.key")

    def _write_secret(self) -> Path:
        path = self.workdir / "pair.secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return path


def wait_gone(pids: list[int], seconds: float = 15.0) -> list[int]:
    """The pids still running after up to `seconds` (zombies count as gone: a container's
    PID 1 may never reap them)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if not _gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")
