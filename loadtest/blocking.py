"""Blocking versus async, the seed's last lesson, measured: three demo backends behind the
balancer, one of them slow, under round robin and least connections.

    python -m loadtest.blocking [--slow-ms 20] [--rate 150] [--duration 8] [--json PATH]

The slow backend is slow in two ways, one run each: `--delay-ms` (async: it awaits, and
serves other requests meanwhile) and `--blocking-ms` (it blocks its event loop: every
request it holds waits, one at a time, so it serves at most 1000/ms requests a second).
Prints, per run: throughput, latency p50/p99, errors, and each backend's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import Harness, StartError
from harness.traffic import Outcome, percentile, run_traffic

ALGORITHMS = ("round-robin", "least-connections")
KINDS = ("async", "blocking")
NAMES = ("b1", "b2", "b3")  # b3 is the slow one


def summarise(outcomes: Sequence[Outcome], duration: float) -> dict[str, Any]:
    """Throughput, latency and each backend's share of the answered requests."""
    ok = [o for o in outcomes if o.ok]
    lat = sorted(o.latency * 1000 for o in ok if o.latency is not None)
    by = Counter(o.backend for o in ok if o.backend)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "throughput_rps": round(len(ok) / duration, 1) if duration > 0 else 0.0,
        "p50_ms": None if p50 is None else round(p50, 1),
        "p99_ms": None if p99 is None else round(p99, 1),
        "share": {n: round(by[n] / len(ok), 3) if ok else 0.0 for n in sorted(by)},
    }


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    head = ("slow b3", "algorithm", "ok/s", "p50 ms", "p99 ms", "errors", "b1", "b2", "b3")
    lines = [head]
    for r in rows:
        s = r["summary"]
        lines.append(
            (
                r["kind"],
                r["algorithm"],
                f"{s['throughput_rps']:.0f}",
                "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}",
                "-" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}",
                str(s["errors"]),
                *(f"{s['share'].get(n, 0.0):.0%}" for n in NAMES),
            )
        )
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(x, widths, strict=True)) for x in lines)


def run_one(h: Harness, kind: str, algorithm: str, args: argparse.Namespace) -> dict[str, Any]:
    slow = ["--delay-ms" if kind == "async" else "--blocking-ms", str(args.slow_ms)]
    backends = [
        h.backend(f"{kind}-{algorithm}-{n}", extra_args=slow if n == "b3" else ()) for n in NAMES
    ]
    specs = [x for b, n in zip(backends, NAMES, strict=True) for x in ("--backend",
             f"{b.address},name={n}")]  # fmt: skip
    lb = h.balancer("--listen", "127.0.0.1:0", *specs, "--algorithm", algorithm,
                    "--log-level", "warning", name=f"lb-{kind}-{algorithm}")  # fmt: skip
    try:
        outcomes = asyncio.run(
            run_traffic(f"http://{lb.host}:{lb.port}/", args.rate, args.duration, timeout=5.0)
        )
    finally:
        lb.stop()
        for b in backends:
            b.stop()
    # the backends answer with their harness names (KIND-ALGORITHM-bN): keep the bN
    named = [replace(o, backend=o.backend.rsplit("-", 1)[-1] if o.backend else None)
             for o in outcomes]  # fmt: skip
    return {"kind": kind, "algorithm": algorithm, "summary": summarise(named, args.duration)}


def _positive(kind: type[int] | type[float], hi: float) -> Any:
    def parse(raw: str) -> int | float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if not 0 < value <= hi:
            raise argparse.ArgumentTypeError(f"out of range (0, {hi}]: {raw}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.blocking", description=__doc__.split("\n")[0]
    )
    p.add_argument("--slow-ms", type=_positive(int, 1000), default=20, help="b3's delay or block")
    p.add_argument("--rate", type=_positive(float, 2000), default=150.0, help="requests/s")
    p.add_argument("--duration", type=_positive(float, 300), default=8.0, help="seconds per run")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    try:
        with Harness() as h:  # every child stopped on the way out, even on Ctrl-C
            for kind in KINDS:
                for algorithm in ALGORITHMS:
                    print(f"-- b3 {kind} {args.slow_ms} ms, {algorithm} ...", file=sys.stderr)
                    rows.append(run_one(h, kind, algorithm, args))
    except StartError as exc:
        print(f"loadtest.blocking: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest.blocking: interrupted", file=sys.stderr)
        return 130
    print(format_rows(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1) + "\n")  # fmt: skip
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
