"""`make soak`: the local stack at a fixed rate for N minutes; watch errors, RSS, FDs, latency.

The balancer's RSS and open file descriptors are sampled from /proc after every
window. RSS growth is measured from the end of the warm-up (the first window,
when pools and caches fill) to the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--window", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 5000 or args.window < 1:
        print("soak: --minutes (0, 1440], --rate (0, 5000] and --window >= 1", file=sys.stderr)
        return 2
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
