"""`python -m loadtest.local` (`make local`): three backends and a balancer on loopback.

`LocalStack` is the reusable part (drills and tests use it): every process runs in its own
session (its own process group, so the terminal's Ctrl-C reaches only the runner, which
then stops them in order) and, on Linux, gets SIGTERM from the kernel if the runner dies
without cleaning up (PR_SET_PDEATHSIG), so no orphans survive even a SIGKILLed runner.
Call `start()` from the main thread: the death signal follows the thread that forked.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

from balancer.lb.algorithms import ALGORITHMS

HOST = "127.0.0.1"
BACKEND_PORTS = (9101, 9102, 9103)
LISTEN_PORT = 8080
ADMIN_PORTS = (9000, 9001)
ELECTION_PORTS = (7946, 7947)
PRIORITIES = (150, 100)
STOP_GRACE_S = 5.0  # SIGTERM -> SIGKILL; balancers get a 3 s drain, backends 2 s
REPO = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """The stack could not be started; the message says which process and why."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (bind 0, read, close); tests use it."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    """One child process: its command line, log file and Popen handle."""

    name: str
    argv: list[str]
    log_path: Path
    port: int
    admin_port: int | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the child is its session leader)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (plus SIGCONT in case it is paused), bounded wait, then SIGKILL."""
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
        return self.popen.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LocalStack:
    """Backends b1..bN and one balancer (or a pair `a`/`b`) on loopback.

    Backends are addressed by 0-based index (b1 is 0). Balancer admin APIs are plain HTTP.
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
        workdir: Path | None = None,
        pki_dir: Path | None = None,
        check_interval: float | None = None,
        balancer_args: tuple[str, ...] = (),
        ready_timeout: float = 20.0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise StackError(f"unknown algorithm {algorithm!r}; choose {', '.join(ALGORITHMS)}")
        if pair and not admin:
            raise StackError("a pair needs the admin API (to tell the active from the passive)")
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
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lb-local-"))
        self.pki_dir = (pki_dir or Path("pki")).resolve()
        self.ca_file: str | None = str(self.pki_dir / "ca.crt") if tls else None
        self.backends: list[Proc] = []
        self.balancers: list[Proc] = []
        self._ssl: ssl.SSLContext | None = None

    # addresses --------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def service_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.listen_port}"

    @property
    def admin_urls(self) -> dict[str, str]:
        return {
            b.name: f"http://{self.host}:{b.admin_port}" for b in self.balancers if b.admin_port
        }

    @property
    def backend_urls(self) -> dict[str, str]:
        return {b.name: f"http://{self.host}:{b.port}" for b in self.backends}

    def backend_id(self, i: int) -> str:
        """The backend's id in the balancer's /api/state."""
        return f"{self.host}:{self.backends[i].port}"

    def balancer(self, name: str) -> Proc:
        for b in self.balancers:
            if b.name == name:
                return b
        raise KeyError(f"no balancer named {name!r}")

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
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        tls_args: list[str] = []
        if self.tls:
            cert, key = self._issue_certs()
            tls_args = ["--tls-cert", cert, "--tls-key", key]
            self._ssl = ssl.create_default_context(cafile=self.ca_file)
        for i, port in enumerate(self.backend_ports):
            name = f"b{i + 1}"
            argv = [sys.executable, "-m", "backends", "--host", self.host, "--port", str(port)]
            argv += ["--name", name, "--shutdown-timeout", "2"]
            self.backends.append(Proc(name, argv, self._log(name), port))
        for proc in self.backends:
            proc.start()
        deadline = time.monotonic() + self.ready_timeout
        for proc in self.backends:
            self._wait_http(proc, f"http://{self.host}:{proc.port}/healthz", deadline, None)
        common = [sys.executable, "-m", "balancer", "--listen", f"{self.host}:{self.listen_port}"]
        for port in self.backend_ports:
            common += ["--backend", f"{self.host}:{port}"]
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
            admin_port = self.admin_ports[0] if self.admin else None
            self.balancers.append(Proc("a", argv, self._log("a"), self.listen_port, admin_port))
        else:
            secret = self._write_secret()
            for me, name in enumerate(("a", "b")):
                argv = [*common, "--admin", f"{self.host}:{self.admin_ports[me]}"]
                argv += ["--bind-election", f"{self.host}:{self.election_ports[me]}"]
                argv += ["--peer", f"{self.host}:{self.election_ports[1 - me]}"]
                argv += ["--priority", str(PRIORITIES[me]), "--secret-file", secret]
                self.balancers.append(
                    Proc(name, argv, self._log(name), self.listen_port, self.admin_ports[me])
                )
        for proc in self.balancers:
            proc.start()
        deadline = time.monotonic() + self.ready_timeout
        for proc in self.balancers:
            if proc.admin_port is not None:
                url = f"http://{self.host}:{proc.admin_port}/api/state"
                self._wait_http(proc, url, deadline, None)
        # the service answers with 200 once the checks have marked a backend up
        self._wait_http(self.balancers[0], self.service_url + "/", deadline, self._ssl)

    def stop(self) -> None:
        """Stop balancers first (they drain), then backends. Safe to call twice."""
        for proc in [*self.balancers, *self.backends]:
            proc.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def procs(self) -> list[Proc]:
        return [*self.backends, *self.balancers]

    # drills -------------------------------------------------------------------------------
    def kill_backend(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.backends[i].signal(sig)

    def restart_backend(self, i: int, wait: bool = True) -> None:
        """Start backend i again (after a kill/stop) on the same port."""
        proc = self.backends[i]
        proc.stop(grace=2.0)
        proc.start()
        if wait:
            deadline = time.monotonic() + self.ready_timeout
            self._wait_http(proc, f"http://{self.host}:{proc.port}/healthz", deadline, None)

    def kill_balancer(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.balancer(name).signal(sig)

    def restart_balancer(self, name: str) -> None:
        proc = self.balancer(name)
        proc.stop(grace=2.0)
        proc.start()

    # helpers ------------------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _issue_certs(self) -> tuple[str, str]:
        run = [sys.executable, "-m", "ca"]
        d = str(self.pki_dir)
        for argv in (
            [*run, "init", "--dir", d],
            [
                *run,
                "issue",
                "--dir",
                d,
                "--name",
                "localhost",
                "--ip",
                self.host,
                "--dns",
                "localhost",
                "--force",
            ],
        ):
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise StackError(f"{' '.join(argv[1:4])} failed: {msg[-1] if msg else '?'}")
        return str(self.pki_dir / "localhost.crt"), str(self.pki_dir / "localhost.key")

    def _write_secret(self) -> str:
        path = self.workdir / "pair.secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return str(path)

    def _wait_http(self, proc: Proc, url: str, deadline: float, ctx: ssl.SSLContext | None) -> None:
        """Poll until `url` answers 200; fail fast when `proc` exits."""
        last = "no answer"
        while time.monotonic() < deadline:
            if not proc.alive:
                code = proc.popen.returncode if proc.popen else None
                raise StackError(
                    f"{proc.name} exited (status {code}) before it was ready; log "
                    f"{proc.log_path}:\n{proc.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=ctx) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                last = str(getattr(exc, "reason", exc))
            time.sleep(0.1)
        raise StackError(f"{proc.name}: {url} not ready in time ({last}); log {proc.log_path}")


# ---- the runner ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Stop(signal.Signals(signum).name)


def _usage_lines(stack: LocalStack) -> list[str]:
    url = stack.service_url
    ca = f"--cacert {stack.ca_file} " if stack.ca_file else ""
    hdr = "-o /dev/null -w '%{http_code} %header{x-backend}\\n'"
    lines = [
        f"service        {url}/",
        *(
            f"admin ({n})      {u}/   (dashboard; state at {u}/api/state)"
            for n, u in stack.admin_urls.items()
        ),
        *(f"backend {n}     {u}/" for n, u in stack.backend_urls.items()),
        f"logs           {stack.workdir / 'logs'}",
        "",
        f"try ({stack.algorithm}):",
        f"  for i in 1 2 3 4 5 6; do curl -s {ca}{hdr} {url}/; done",
    ]
    if stack.algorithm == "least-connections":
        lines.append(
            f"  for i in 1 2 3 4 5 6; do curl -s {ca}{hdr} '{url}/delay?ms=800' & done; wait"
        )
    if stack.algorithm == "source-hash":
        lines.append(
            f'  for u in alice bob carol; do curl -s {ca}-H "X-User: $u" {hdr} {url}/; done'
        )
    lines += [
        "other schedulers: python -m loadtest.local --algorithm least-connections",
        "                  python -m loadtest.local --algorithm source-hash   (key: X-User)",
        "a drill: python -m loadtest.drill kill-backend --local --json /tmp/kill.json",
        "Ctrl-C stops everything.",
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.local",
        description="Run 3 backends and a balancer (or a pair) on loopback until Ctrl-C.",
    )
    p.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="round-robin")
    p.add_argument("--hash-key", help="source-hash key (default header:X-User with source-hash)")
    p.add_argument("--tls", action="store_true", help="serve HTTPS with a cert from ./pki")
    p.add_argument("--pki", default="pki", help="CA directory for --tls (default ./pki)")
    p.add_argument("--pair", action="store_true", help="two balancers a/b sharing the service")
    p.add_argument("--listen-port", type=int, default=LISTEN_PORT)
    p.add_argument("--duration", type=float, help="stop by itself after S seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hash_key = args.hash_key or ("header:X-User" if args.algorithm == "source-hash" else None)
    if args.duration is not None and args.duration <= 0:
        print("loadtest.local: --duration must be > 0", file=sys.stderr)
        return 2
    stack = LocalStack(
        algorithm=args.algorithm,
        hash_key=hash_key,
        tls=args.tls,
        pair=args.pair,
        listen_port=args.listen_port,
        pki_dir=Path(args.pki),
    )
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        stack.start()
        print("\n".join(_usage_lines(stack)), flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            dead = [p.name for p in stack.procs if not p.alive]
            if dead:
                print(f"loadtest.local: exited unexpectedly: {', '.join(dead)}", file=sys.stderr)
                status = 1
                break
            time.sleep(0.5)
    except _Stop as stop:
        print(f"\nloadtest.local: {stop}: stopping", file=sys.stderr)
    except StackError as exc:
        print(f"loadtest.local: {exc}", file=sys.stderr)
        status = 1
    finally:
        for s in old:  # a second Ctrl-C must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        stack.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
