"""`python -m balancer`: run one balancer until SIGTERM/SIGINT; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from balancer.config import Config, ConfigError, from_args

GC_GEN0_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


async def _serve(cfg: Config, argv: list[str]) -> int:
    from balancer.app import Balancer
    from balancer.tls.store import TLSConfigError

    def load() -> Config:
        # deprecation warnings go to the log on a reload (they went to stderr at start)
        return from_args(argv, warn=logging.getLogger("balancer").warning)

    try:
        balancer = Balancer(cfg, load_config=load)  # loads TLS files: a bad one is a user error
    except TLSConfigError as exc:
        print(f"balancer: cannot start: {exc}", file=sys.stderr)
        return 2
    from balancer.workers.count import resolve_here

    workers = resolve_here(cfg.workers)
    if workers > 1:  # this process supervises; the workers serve the data path
        from balancer.workers.supervisor import WorkerPool

        balancer.workers = WorkerPool(balancer, argv, workers)
    try:
        await balancer.start()
    except OSError as exc:
        print(f"balancer: cannot start: {exc}", file=sys.stderr)
        await balancer.stop()
        return 2
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def reload() -> None:
        balancer.reload()  # logs its result in one line and emits it as an event

    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if balancer.listening:
        # the first listener keeps the line tools wait for; the others follow it
        for i, (scheme, host, port) in enumerate(balancer.bound()):
            also = "also " if i else ""
            print(f"balancer: {also}listening on {scheme}://{host}:{port}", flush=True)
    if balancer.admin is not None:
        print(f"balancer: admin on {balancer.admin.url}", flush=True)
    if balancer.workers is not None:
        pids = " ".join(str(r["pid"]) for r in balancer.workers.rows())
        print(f"balancer: {workers} workers (pids {pids})", flush=True)
    tune_gc()
    await done.wait()
    await balancer.stop()
    return 0


def tune_gc() -> None:
    """Stop the cyclic GC from rescanning what start-up built, and from running so often.

    A proxied request leaves no reference cycles (its objects are freed by refcount), so
    collections triggered by its allocations find nothing, yet they rescanned every module,
    config and aiohttp object the process holds: about 10 % of a request's CPU here. Cycles
    still get collected (a closed connection and its parser form one), only less often.
    """
    gc.collect()
    gc.freeze()  # start-up objects move to a permanent generation no collection scans
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = from_args(argv)
    except ConfigError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _install_uvloop()
    worker = os.environ.get("LB_WORKER")
    if worker:  # started by a supervisor (balancer.workers.supervisor)
        from balancer.app import Balancer
        from balancer.workers.worker import serve_worker

        def load() -> Config:
            return from_args(argv, warn=logging.getLogger("balancer").warning)

        def make() -> Balancer:
            return Balancer(cfg, load_config=load)  # in the worker's running loop

        return asyncio.run(serve_worker(make, cfg, worker, tune_gc))
    return asyncio.run(_serve(cfg, argv))


if __name__ == "__main__":
    sys.exit(main())
