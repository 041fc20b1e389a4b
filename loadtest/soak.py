"""`make soak`: the local stack at a fixed rate for N minutes; watch errors, RSS, FDs, latency.

With --chaos (`make soak CHAOS=1`) a LocalStack pair over TLS takes steady load while a
schedule (seeded, printed at the start) breaks and restores its parts: backends killed,
stopped, paused, delayed (netem), the active balancer stopped and killed, the certificate
renewed, the configuration reloaded. The report says, per event, what was lost against the
documented window (`loadtest/chaos.py`), plus latency, RSS and FDs over the run.

The balancer's RSS and open file descriptors are sampled from /proc after every
window. RSS growth is measured from the end of the warm-up (the first window,
when pools and caches fill) to the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from harness.procs import proc_fds, proc_rss_kib
from harness.stack import LocalStack, StackError
from harness.traffic import percentile, run_traffic


def summarise(windows: list[dict[str, Any]], warmup_windows: int = 1) -> dict[str, Any]:
    """Targets: 0 errors, RSS growth <= 10 % after warm-up, FDs stable."""
    if not windows:
        raise ValueError("no windows to summarise")
    base = windows[min(warmup_windows, len(windows)) - 1]
    last = windows[-1]
    growth = (last["rss_kib"] - base["rss_kib"]) / base["rss_kib"] * 100 if base["rss_kib"] else 0
    fds = [w["fds"] for w in windows[warmup_windows - 1 :]] or [last["fds"]]
    return {
        "requests": sum(w["requests"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
        "rss_kib_after_warmup": base["rss_kib"],
        "rss_kib_end": last["rss_kib"],
        "rss_growth_pct": round(growth, 2),
        "fds_after_warmup": base["fds"],
        "fds_end": last["fds"],
        "fds_min": min(fds),
        "fds_max": max(fds),
        "p50_ms_max": max(w["p50_ms"] for w in windows),
        "p99_ms_max": max(w["p99_ms"] for w in windows),
        "targets": {
            "errors_zero": sum(w["errors"] for w in windows) == 0,
            "rss_growth_le_10pct": growth <= 10.0,
        },
    }


async def soak(
    stack: LocalStack, minutes: float, rate: float, window: float
) -> list[dict[str, Any]]:
    pid = stack.balancers[0].pid
    assert pid is not None
    windows: list[dict[str, Any]] = []
    deadline = time.monotonic() + minutes * 60
    start = time.monotonic()
    while time.monotonic() < deadline:
        span = min(window, max(1.0, deadline - time.monotonic()))
        outcomes = await run_traffic(stack.service_url, rate, span, ca_file=stack.ca_file)
        lat = sorted(o.latency * 1000 for o in outcomes if o.latency is not None and o.ok)
        w = {
            "t_s": round(time.monotonic() - start, 1),
            "requests": len(outcomes),
            "errors": sum(1 for o in outcomes if not o.ok),
            "p50_ms": round(percentile(lat, 50) or 0.0, 3),
            "p99_ms": round(percentile(lat, 99) or 0.0, 3),
            "rss_kib": proc_rss_kib(pid),
            "fds": proc_fds(pid),
        }
        windows.append(w)
        print(
            f"soak t={w['t_s']:>6}s req={w['requests']} err={w['errors']} "
            f"p50={w['p50_ms']}ms p99={w['p99_ms']}ms rss={w['rss_kib']}KiB fds={w['fds']}",
            file=sys.stderr,
            flush=True,
        )
    return windows


def plot(windows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [w["t_s"] for w in windows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [w["p50_ms"] for w in windows], label="p50")
    axes[0].plot(t, [w["p99_ms"] for w in windows], label="p99")
    axes[0].set_ylabel("latency ms")
    axes[0].legend()
    axes[1].plot(t, [w["rss_kib"] / 1024 for w in windows], color="tab:purple")
    axes[1].set_ylabel("balancer RSS MiB")
    ax2 = axes[1].twinx()
    ax2.plot(t, [w["fds"] for w in windows], color="tab:gray", linestyle="--")
    ax2.set_ylabel("open fds")
    axes[2].bar(t, [w["errors"] for w in windows], color="tab:red", width=2)
    axes[2].set_ylabel("errors")
    axes[2].set_xlabel("seconds")
    fig.suptitle("lb-testbed soak")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def chaos_main(args: argparse.Namespace) -> int:
    from loadtest import chaos
    from loadtest.chaos_run import make_stack, netns_usable, run_chaos

    kinds = [k.strip() for k in args.events.split(",") if k.strip()] or list(chaos.ALL_KINDS)
    duration = args.minutes * 60
    try:
        planned = chaos.plan(duration, args.seed, kinds)
    except chaos.ScheduleError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print(chaos.describe_plan(planned, args.seed), file=sys.stderr, flush=True)
    no_netns = netns_usable() if "delay-backend" in kinds else "not needed"
    if no_netns and "delay-backend" in kinds:
        print(f"soak: delay-backend will be skipped: {no_netns}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="lb-chaos-"))
    stack = make_stack(workdir, netns=no_netns is None)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        stack.start()
        pids = " ".join(f"{c.name}={c.pid}" for c in stack.procs)
        print(f"soak: stack up ({pids}), workdir {workdir}", file=sys.stderr, flush=True)
        rec = asyncio.run(
            run_chaos(
                stack,
                planned,
                workdir / "balancer.toml",
                rate=args.rate,
                duration=duration,
                window=args.window,
            )
        )
    except StackError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("soak: interrupted; stack stopped", file=sys.stderr)
        return 130
    finally:
        stack.stop(keep_logs=True)
    report = chaos.compose(
        planned=planned,
        seed=args.seed,
        rate=args.rate,
        duration=duration,
        window=args.window,
        outcomes=rec.outcomes,
        events=rec.events,
        samples=rec.samples,
        procs=rec.procs,
        done={i: d.__dict__ for i, d in rec.done.items()},
    )
    # the logs (and the run's CA) stay when something failed, for the post-mortem
    report["logs"] = None if report["summary"]["ok"] else str(workdir / "logs")
    if report["summary"]["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    out = args.json or Path("out/chaos.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.md:
        args.md.write_text(chaos.to_markdown(report))
    if args.plot:
        chaos.plot(report, str(args.plot))
    print(json.dumps(report["summary"], indent=2))
    return 0 if report["summary"]["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, help="requests per second (default 200; chaos 100)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--json", type=Path, help="default out/soak.json (chaos: out/chaos.json)")
    p.add_argument("--md", type=Path, help="chaos: also a Markdown report")
    p.add_argument("--plot", type=Path)
    p.add_argument("--chaos", action="store_true", help="mix the drills into the load")
    p.add_argument("--seed", type=int, default=1, help="chaos: the schedule's seed")
    p.add_argument("--events", default="", help="chaos: comma-separated event kinds (default: all)")
    args = p.parse_args(argv)
    if args.rate is None:
        args.rate = 100.0 if args.chaos else 200.0
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 5000 or args.window < 1:
        print("soak: --minutes (0, 1440], --rate (0, 5000] and --window >= 1", file=sys.stderr)
        return 2
    if args.chaos:
        return chaos_main(args)
    if args.json is None:
        args.json = Path("out/soak.json")
    stack = LocalStack.ephemeral()
    try:
        stack.start()
        windows = asyncio.run(soak(stack, args.minutes, args.rate, args.window))
    except StackError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        stack.stop()
    report = {
        "minutes": args.minutes,
        "rate": args.rate,
        "window_s": args.window,
        "summary": summarise(windows),
        "windows": windows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(windows, args.plot)
    print(json.dumps(report["summary"], indent=2))
    return 0 if report["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
