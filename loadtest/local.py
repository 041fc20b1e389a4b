"""`python -m loadtest.local` (`make local`): three backends and a balancer on loopback.

The stack itself is `harness.LocalStack` (drills, soak and tests use it too). Every process
runs in its own session, so the terminal's Ctrl-C reaches only this runner, which then
stops them in order; on Linux the kernel SIGTERMs them if the runner dies without cleaning
up (PR_SET_PDEATHSIG), so no orphans survive even a SIGKILLed runner.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from balancer.lb.algorithms import ALGORITHMS
from harness.stack import LISTEN_PORT, LocalStack, StackError

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
    p.add_argument("--algorithm", choices=ALGORITHMS, default="round-robin")
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
