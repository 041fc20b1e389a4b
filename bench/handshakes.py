"""Public key versus symmetric: what a TLS handshake costs per key type, the balancer beside
HAProxy on the same certificates, in the same run.

    python -m bench.handshakes [--key-types ec256,ec384,rsa2048,rsa3072,rsa4096]
        [--proxies balancer,haproxy] [--duration 5] [--rounds 1]
        [--json bench/results/handshakes.json]

For each key type (a leaf issued by our CA, `python -m ca issue --key-type`), three rows per
proxy: full handshakes (bench.handshake_load: a new connection and no session offered, so the
server signs with its private key every time), resumed handshakes (wrk with Connection:
close: it offers its session ticket, so no certificate and no signature, only symmetric keys
and an ECDHE exchange), and keep-alive requests (https-keepalive: one handshake, then only
symmetric cryptography per request). CPU is the proxy's, from /proc, per handshake or request.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report
from bench.run import (
    MODES,
    BenchError,
    TlsFiles,
    _csv,
    _positive,
    _terminate,
    bench_one,
    choose_pins,
    ensure_tools,
    metadata,
    start_backends,
    write_json,
)
from ca.core import KEY_TYPES, init_ca
from harness import REPO, Harness

DEFAULT_JSON = REPO / "bench" / "results" / "handshakes.json"
ROW_MODES = ("https-handshakes", "https-resumptions", "https-keepalive")
PROXIES = ("balancer", "haproxy")
COLUMNS = (  # (mode, what its rps and cpu_us_per_req mean)
    ("https-handshakes", "full hs/s", "us/full"),
    ("https-resumptions", "resumed/s", "us/resumed"),
    ("https-keepalive", "keep-alive req/s", "us/req"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.handshakes", description=__doc__.split("\n")[0]
    )
    p.add_argument("--key-types", type=_csv(KEY_TYPES, "key type"), default=list(KEY_TYPES))
    p.add_argument("--proxies", type=_csv(PROXIES, "proxy"), default=list(PROXIES))
    p.add_argument("--modes", type=_csv(ROW_MODES, "mode"), default=list(ROW_MODES))
    p.add_argument("--duration", type=_positive, default=5, help="measured seconds per row")
    p.add_argument("--rounds", type=_positive, default=1, help="rows report the median")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds before each row")
    p.add_argument("--connections", type=_positive, default=64)
    p.add_argument("--backends", type=int, choices=(2, 3), default=2)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def tls_for(workdir: Path, key_type: str) -> TlsFiles:
    """A leaf of `key_type` for 127.0.0.1 and localhost, from one CA for the whole run."""
    ca = init_ca(workdir / "ca")
    crt, key = ca.issue(
        f"lb-{key_type}", dns=["localhost"], ips=["127.0.0.1"], key_type=key_type, overwrite=True
    )
    combined = workdir / f"lb-{key_type}-combined.pem"  # the form HAProxy wants
    combined.write_bytes(key.read_bytes() + crt.read_bytes())
    ca_file = ca.directory / "ca.crt"
    return TlsFiles(crt, key, combined, ca_file, ca_file.read_text())


def table(rows: Mapping[str, Sequence[report.Row]]) -> list[dict[str, Any]]:
    """One line per (key type, proxy): each mode's rate and CPU microseconds per unit."""
    out: list[dict[str, Any]] = []
    for key_type, krows in rows.items():
        for proxy in dict.fromkeys(r.proxy for r in krows):
            line: dict[str, Any] = {"key_type": key_type, "proxy": proxy}
            for mode, _, _ in COLUMNS:
                r = next((r for r in krows if r.proxy == proxy and r.mode == mode), None)
                ok = r is not None and r.status == "ok"
                line[mode] = {
                    "rate": r.rps if ok and r is not None else None,
                    "cpu_us": r.cpu_us_per_req if ok and r is not None else None,
                    "error": r.reason if r is not None and not ok else None,
                }
            full, keep = line["https-handshakes"]["cpu_us"], line["https-keepalive"]["cpu_us"]
            # how many keep-alive requests one full handshake costs, in CPU
            line["full_over_request"] = round(full / keep, 1) if full and keep else None
            out.append(line)
    return out


def format_table(lines: Sequence[Mapping[str, Any]]) -> str:
    header = ["key", "proxy"]
    for _, rate, cpu in COLUMNS:
        header += [rate, cpu]
    header.append("full/req")
    body = []
    for ln in lines:
        cells = [ln["key_type"], ln["proxy"]]
        for mode, _, _ in COLUMNS:
            m = ln[mode]
            cells += [report._fmt(m["rate"], ".0f"), report._fmt(m["cpu_us"], ".1f")]
        cells.append(report._fmt(ln["full_over_request"], ".1f"))
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *body])


def run(args: argparse.Namespace) -> int:
    tools = ensure_tools(args.proxies)
    pins = choose_pins()
    meta = metadata(args, tools, pins)
    meta["note"] = (
        "full: bench.handshake_load, no session offered; resumed: wrk -H 'Connection: close' "
        "(it offers its session ticket); keep-alive: wrk, one handshake per connection"
    )
    rows: dict[str, list[report.Row]] = {}
    with Harness() as h:
        _, backends = start_backends(h, tools, args.backends, pins)
        for key_type in args.key_types:
            tls = tls_for(h.workdir, key_type)
            samples: list[report.Row] = []
            for mode_name in args.modes:
                for rnd in range(1, args.rounds + 1):
                    for proxy in args.proxies:
                        print(
                            f"-- {key_type} / {proxy} / {mode_name} ({rnd}/{args.rounds}) ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        started = time.monotonic()
                        samples.append(
                            bench_one(proxy, MODES[mode_name], args, backends, tls, h, pins)
                        )
                        print(
                            f"   done in {time.monotonic() - started:.1f}s: "
                            f"{report.describe_sample(samples[-1])}",
                            file=sys.stderr,
                        )
            rows[key_type] = report.median_rows(samples)
    lines = table(rows)
    print(format_table(lines))
    doc = {
        "meta": meta,
        "table": lines,
        "rows": {k: [asdict(r) for r in v] for k, v in rows.items()},
    }
    try:
        write_json(args.json, doc)
    except OSError as exc:
        raise BenchError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    print(f"wrote {args.json}")
    ok = [r for v in rows.values() for r in v if r.status == "ok"]
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench.handshakes: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.handshakes: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
