"""`python -m loadtest.local` (`make local`): three backends and a balancer on loopback.

The stack itself is `harness.LocalStack` (drills, soak and tests use it too). Every process
runs in its own session, so the terminal's Ctrl-C reaches only this runner, which then
stops them in order; on Linux the kernel SIGTERMs them if the runner dies without cleaning
up (PR_SET_PDEATHSIG), so no orphans survive even a SIGKILLed runner.

A testbed exists to be broken: when a child dies (`kill -9` of a backend, or of the active
balancer of a pair) the runner reports it and keeps the rest running. The runner listens on
a Unix socket in its work directory (`out/local/control.sock`), and

    python -m loadtest.local status           # name, pid, alive or dead
    python -m loadtest.local restart b2       # start b2 again, on its port; waits for ready

talk to it. A command rather than a key in the terminal: it works from any other shell or
script (and from tests), does not fight `make` for the terminal, and answers with the
result (the new pid, or why the restart failed). The restart runs in the runner itself,
which must start every child (so that its children die with it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from balancer.lb.algorithms import ALGORITHMS
from harness.procs import REPO, Child, StartError
from harness.stack import (
    ADMIN_PORTS,
    BACKEND_PORTS,
    ELECTION_PORTS,
    LISTEN_PORT,
    LocalStack,
    PortInUse,
    StackError,
)

PROG = "python -m loadtest.local"
DEFAULT_WORKDIR = REPO / "out" / "local"
PAIR_ADMIN_PORTS = (9001, 9002)  # what the compose stack publishes for balancer-a / -b
TCP_PORT = 8081  # make local MODE=tcp: the TCP-mode listener beside the HTTP one
CONTROL = "control.sock"
CONTROL_TIMEOUT_S = 60.0  # a restart waits for readiness (at most ~20 s)
POLL_S = 0.5

# ---- the runner ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Stop(signal.Signals(signum).name)


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} loadtest.local: {text}", file=sys.stderr, flush=True)


def _python() -> str:
    """How to run this Python from the repo (the venv's, as `make local` uses)."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def _ctl_cmd(workdir: Path, *words: str) -> str:
    extra = [] if workdir == DEFAULT_WORKDIR else ["--workdir", str(workdir)]
    return " ".join([_python(), "-m", "loadtest.local", *words, *map(shlex.quote, extra)])


def _proc_lines(stack: LocalStack, workdir: Path) -> list[str]:
    rows = [f"  {'name':<5} {'pid':>7}  {'kill':<16} restart"]
    for p in stack.procs:
        pid = str(p.pid) if p.alive else "-"
        kill = f"kill -9 {p.pid}" if p.alive else "(dead)"
        rows.append(f"  {p.name:<5} {pid:>7}  {kill:<16} {_ctl_cmd(workdir, 'restart', p.name)}")
    return rows


def _usage_lines(stack: LocalStack, workdir: Path) -> list[str]:
    url = stack.service_url
    ca = f"--cacert {stack.ca_file} " if stack.ca_file else ""
    hdr = "-o /dev/null -w '%{http_code} %header{x-backend}\\n'"
    lines = [
        f"service        {url}/",
        *(
            [f"tcp mode       {stack.tcp_address} (a TCP-mode listener, same backends)"]
            if stack.tcp_address
            else []
        ),
        *(
            f"admin ({n})      {u}/   (dashboard; state at {u}/api/state)"
            for n, u in stack.admin_urls.items()
        ),
        *(f"backend {n}     {u}/" for n, u in stack.backend_urls.items()),
        f"logs           {stack.workdir / 'logs'}",
        "",
        "processes (kill one: the rest keeps running; restart it with the command shown):",
        *_proc_lines(stack, workdir),
        f"  status: {_ctl_cmd(workdir, 'status')}",
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
    if stack.tcp_address is not None and not stack.tls:
        each = "-o /dev/null -w '%header{x-backend} '"
        lines += [
            "layer 7 vs layer 4: six requests on one keep-alive connection each",
            f"  curl -s {each} '{url}/?[1-6]'; echo                  # HTTP mode: spread",
            f"  curl -s {each} 'http://{stack.tcp_address}/?[1-6]'; echo   # TCP mode: one backend",
        ]
    lines += [
        "other schedulers (each its own run): make local ALGORITHM=least-connections",
        "                                     make local ALGORITHM=source-hash   (key: X-User)",
        "a drill: make drill SCENARIO=kill-backend LOCAL=1",
        "Ctrl-C stops everything.",
    ]
    return lines


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from None
    if not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"ports are 1..65535: {text!r}")
    return ports


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run 3 backends and a balancer (or a pair) on loopback until Ctrl-C. "
        f"`{PROG} status` and `{PROG} restart NAME` talk to a running one.",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, default="round-robin")
    p.add_argument("--hash-key", help="source-hash key (default header:X-User with source-hash)")
    p.add_argument("--tls", action="store_true", help="serve HTTPS with a cert from ./pki")
    p.add_argument("--pki", default="pki", help="CA directory for --tls (default ./pki)")
    p.add_argument("--pair", action="store_true", help="two balancers a/b sharing the service")
    p.add_argument(
        "--mode",
        choices=("http", "tcp"),
        default="http",
        help="tcp: a TCP-mode listener beside the HTTP one (--tcp-port), same backends",
    )
    p.add_argument("--tcp-port", type=int, default=TCP_PORT, help="with --mode tcp (8081)")
    p.add_argument("--listen-port", type=int, default=LISTEN_PORT)
    p.add_argument(
        "--admin-ports",
        type=_ports,
        help=f"admin (dashboard) port of a[,b] (default {ADMIN_PORTS[0]}; "
        f"with --pair {PAIR_ADMIN_PORTS[0]},{PAIR_ADMIN_PORTS[1]}, as the compose stack)",
    )
    p.add_argument(
        "--backend-ports",
        type=_ports,
        default=BACKEND_PORTS,
        help=f"ports of b1,b2,b3 (default {','.join(map(str, BACKEND_PORTS))})",
    )
    p.add_argument(
        "--election-ports",
        type=_ports,
        default=ELECTION_PORTS,
        help="UDP election ports of a,b with --pair "
        f"(default {ELECTION_PORTS[0]},{ELECTION_PORTS[1]})",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="logs and the control socket (default out/local in the repo)",
    )
    p.add_argument("--duration", type=float, help="stop by itself after S seconds")
    return p


def build_control_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Talk to a running `make local`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="each process: name, pid, alive")
    s.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("restart", help="start NAME (b1, b2, b3, a, b) again on its ports")
    r.add_argument("name")
    r.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    return p


_HINTS = {
    "service": "--listen-port (make local LISTEN_PORT=...)",
    "admin": "--admin-ports (make local ADMIN_PORTS=...)",
    "backend": "--backend-ports (make local BACKEND_PORTS=...)",
    "election": "--election-ports (make local ELECTION_PORTS=...)",
}


def _port_message(exc: PortInUse) -> str:
    hint = _HINTS[exc.role.split()[0]]
    return f"{exc}: stop what holds it (ss -lnp | grep :{exc.port}) or change {hint}"


# ---- the control socket -------------------------------------------------------------------


def _socket_path(workdir: Path) -> Path:
    return workdir.resolve() / CONTROL


def request(workdir: Path, command: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
    """Send one command to the runner using `workdir`; its JSON answer. Raises OSError when
    no runner listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(_socket_path(workdir)))
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data or b"{}")
    return answer


def _status(stack: LocalStack) -> dict[str, Any]:
    return {
        "ok": True,
        "procs": [
            {"name": p.name, "pid": p.pid, "alive": p.alive, "log": str(p.log)} for p in stack.procs
        ],
    }


def _restart(stack: LocalStack, name: str) -> dict[str, Any]:
    names = [p.name for p in stack.procs]
    if name not in names:
        return {"ok": False, "error": f"no process named {name!r}; choose {', '.join(names)}"}
    try:
        if name in (b.name for b in stack.balancers):
            stack.restart_balancer(name, wait=True)
            proc: Child = stack.balancer(name)
        else:
            i = [b.name for b in stack.backends].index(name)
            stack.restart_backend(i, wait=True)
            proc = stack.backends[i]
    except StartError as exc:
        first = str(exc).splitlines()[0]
        _say(f"restart of {name} failed: {first}")
        return {"ok": False, "error": first}
    _say(f"{name} restarted (pid {proc.pid}); kill it again: kill -9 {proc.pid}")
    return {"ok": True, "name": name, "pid": proc.pid}


def _serve_one(server: socket.socket, stack: LocalStack) -> None:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5.0)
        try:
            line = conn.makefile("rb").readline(1024).decode(errors="replace").split()
        except OSError:
            return
        if line == ["status"]:
            answer = _status(stack)
        elif len(line) == 2 and line[0] == "restart":
            answer = _restart(stack, line[1])
        else:
            answer = {"ok": False, "error": f"unknown command {' '.join(line)!r}"}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(answer).encode() + b"\n")


def _claim_workdir(workdir: Path) -> socket.socket:
    """Bind the control socket; refuse when another runner already uses this workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = _socket_path(workdir)
    if len(str(path)) > 100:
        raise StackError(f"work dir path too long for a Unix socket: {workdir}")
    if path.exists():
        try:
            request(workdir, "status", timeout=2.0)
        except (OSError, ValueError):
            path.unlink()  # left by a runner that was killed
        else:
            raise StackError(
                f"another `make local` is running with work dir {workdir}: stop it "
                "(Ctrl-C in its terminal) or pass --workdir"
            )
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    return server


# ---- entry points -------------------------------------------------------------------------


def control_main(argv: list[str]) -> int:
    args = build_control_parser().parse_args(argv)
    command = "status" if args.command == "status" else f"restart {args.name}"
    try:
        answer = request(args.workdir, command)
    except (OSError, ValueError) as exc:
        where = _socket_path(args.workdir)
        print(
            f"{PROG}: error: no running `make local` answers on {where} ({exc}); "
            "start one, or pass the --workdir it uses",
            file=sys.stderr,
        )
        return 1
    if not answer.get("ok"):
        print(f"{PROG}: error: {answer.get('error', 'no answer')}", file=sys.stderr)
        return 1
    if args.command == "restart":
        print(f"{answer['name']} restarted: pid {answer['pid']}")
    elif args.json:
        print(json.dumps(answer["procs"], indent=2))
    else:
        for p in answer["procs"]:
            state = "alive" if p["alive"] else "DEAD"
            print(f"{p['name']:<5} {p['pid']:>7}  {state:<5}  {p['log']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("status", "restart"):
        return control_main(argv)
    args = build_parser().parse_args(argv)
    hash_key = args.hash_key or ("header:X-User" if args.algorithm == "source-hash" else None)
    if args.duration is not None and args.duration <= 0:
        print(f"{PROG}: error: --duration must be > 0", file=sys.stderr)
        return 2
    if len(args.backend_ports) != len(BACKEND_PORTS):
        print(f"{PROG}: error: --backend-ports takes {len(BACKEND_PORTS)} ports", file=sys.stderr)
        return 2
    admin = args.admin_ports or (PAIR_ADMIN_PORTS if args.pair else ADMIN_PORTS[:1])
    if len(admin) != (2 if args.pair else 1):
        print(f"{PROG}: error: --admin-ports takes {2 if args.pair else 1}", file=sys.stderr)
        return 2
    if len(args.election_ports) != 2:
        print(f"{PROG}: error: --election-ports takes 2 ports", file=sys.stderr)
        return 2
    workdir: Path = args.workdir
    try:
        server = _claim_workdir(workdir)
    except (StackError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for old in (workdir / "logs").glob("*.log"):
        old.unlink()  # this run's logs only (a restart appends to its own)
    stack = LocalStack(
        algorithm=args.algorithm,
        hash_key=hash_key,
        tls=args.tls,
        pair=args.pair,
        listen_port=args.listen_port,
        admin_ports=(admin[0], admin[-1]),
        election_ports=(args.election_ports[0], args.election_ports[1]),
        backend_ports=args.backend_ports,
        pki_dir=Path(args.pki),
        workdir=workdir,
        tcp_port=args.tcp_port if args.mode == "tcp" else None,
    )
    old_handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        stack.start()
        print("\n".join(_usage_lines(stack, workdir)), flush=True)
        _run(stack, server, workdir, args.duration)
    except _Stop as stop:
        print(f"\nloadtest.local: {stop}: stopping", file=sys.stderr)
    except PortInUse as exc:
        print(f"{PROG}: error: {_port_message(exc)}", file=sys.stderr)
        status = 1
    except StackError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(f"{PROG}: logs kept in {workdir / 'logs'}", file=sys.stderr)
        status = 1
    finally:
        for s in old_handlers:  # a second Ctrl-C must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        stack.stop()
        server.close()
        for leftover in (_socket_path(workdir), workdir / "pair.secret"):  # logs stay
            with contextlib.suppress(OSError):
                leftover.unlink()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    return status


def _death(proc: Child) -> str:
    code = proc.returncode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _run(stack: LocalStack, server: socket.socket, workdir: Path, duration: float | None) -> None:
    """Until the deadline (or a signal): report each death once, serve control commands.
    Children are started and restarted from this (the main) thread only."""
    deadline = time.monotonic() + duration if duration else None
    reported: set[int] = set()
    while deadline is None or time.monotonic() < deadline:
        for p in stack.procs:
            if p.popen is not None and not p.alive and p.pid not in reported:
                reported.add(p.pid)
                _say(
                    f"{p.name} (pid {p.pid}) died: {_death(p)}; the rest keeps running. "
                    f"Restart it: {_ctl_cmd(workdir, 'restart', p.name)}  (log {p.log})"
                )
        ready, _, _ = select.select([server], [], [], POLL_S)
        if ready:
            _serve_one(server, stack)


if __name__ == "__main__":
    sys.exit(main())
