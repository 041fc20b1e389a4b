"""Proxy benchmark: the balancer vs HAProxy vs a naive aiohttp proxy, same nginx backends.

    python -m bench.run [--duration 10] [--connections 64]
        [--modes http-keepalive,https-keepalive,https-handshakes]
        [--proxies balancer,haproxy,naive-aiohttp] [--json bench/results/proxy.json]

nginx and wrk are pinned to the first CPU, each proxy to the second, so proxy CPU time
per request (from /proc/PID/stat) is comparable across proxies. Prints a table and
writes a JSON document with the rows and run metadata.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import configs, cpu, h2load, handshake_load, report, wrk
from harness import Child, Harness, StartError, free_ports, pinned, tail

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "proxy.json"
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
APT_PACKAGES = {
    "nginx": "nginx-light",
    "wrk": "wrk",
    "haproxy": "haproxy",
    "taskset": "util-linux",
    "h2load": "nghttp2-client",
}
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Mode:
    name: str
    tls: bool
    close: bool  # one request per connection
    loadgen: str = "wrk"  # or "handshake": bench.handshake_load, never resumes TLS sessions
    # or "h2load": HTTP/2 over TLS (ALPN h2), h2load.STREAMS streams per connection
    tcp: bool = False  # the proxy balances connections (layer 4) and relays bytes


MODES = {
    m.name: m
    for m in (
        Mode("http-keepalive", tls=False, close=False),
        Mode("https-keepalive", tls=True, close=False),
        Mode("https-handshakes", tls=True, close=True, loadgen="handshake"),
        # wrk resumes TLS sessions on reconnect, so this is the abbreviated handshake.
        Mode("https-resumptions", tls=True, close=True),
        # the same keep-alive HTTP load through the balancer's TCP mode and HAProxy mode tcp
        Mode("tcp-keepalive", tls=False, close=False, tcp=True),
        Mode("h2-tls", tls=True, close=False, loadgen="h2load"),
    )
}
DEFAULT_MODES = [
    "http-keepalive",
    "https-keepalive",
    "https-handshakes",
    "tcp-keepalive",
    "h2-tls",
]
# proxies that have no TCP mode sit the tcp rows out
TCP_PROXIES = ("balancer", "haproxy")
PROXIES = ("balancer", "balancer-w2", "haproxy", "naive-aiohttp")
H2_PROXIES = ("balancer", "haproxy")  # the naive proxy speaks HTTP/1.1 only
# the balancer with `--workers 2`: CPU summed over the supervisor and both workers (all
# pinned to the proxy CPU, so the figure compares with one worker's), and the spread of
# requests over the workers, read from its /api/state
WORKER_PROXIES = {"balancer-w2": 2}


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # leaf + chain
    key: Path
    combined: Path  # key + chain, the form HAProxy wants
    ca_file: Path
    ca_pem: str


@dataclass(frozen=True)
class Pins:
    load: str | None  # wrk + nginx
    proxy: str | None


class BenchError(Exception):
    """A setup problem that stops the whole run (one line for stderr)."""


# ---------------------------------------------------------------- CLI


def _csv(allowed: Sequence[str], what: str) -> Any:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or '(none)'}; choose from {','.join(allowed)}"
            )
        return list(dict.fromkeys(items))

    return parse


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=_positive, default=10, help="measured seconds per row")
    p.add_argument(
        "--rounds", type=_positive, default=3, help="interleaved rounds; rows report the median"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each row")
    p.add_argument("--connections", type=_positive, default=64)
    p.add_argument(
        "--h2-connections",
        type=_positive,
        default=16,
        help="h2-tls: h2load clients, each with 10 streams (default 16: 160 in flight)",
    )
    p.add_argument("--modes", type=_csv(list(MODES), "mode"), default=DEFAULT_MODES)
    p.add_argument("--proxies", type=_csv(PROXIES, "proxy"), default=list(PROXIES))
    p.add_argument("--backends", type=int, choices=(2, 3), default=2)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ---------------------------------------------------------------- environment


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_PATH])
    return shutil.which(name, path=path)


def ensure_tools(proxies: Sequence[str], modes: Sequence[str] = ()) -> dict[str, str]:
    """Resolve tool paths, apt-installing missing ones when root."""
    needed = ["nginx", "wrk", "taskset", *(["haproxy"] if "haproxy" in proxies else [])]
    needed += ["h2load"] if any(MODES[m].loadgen == "h2load" for m in modes) else []
    missing = [t for t in needed if _which(t) is None]
    if missing:
        pkgs = sorted({APT_PACKAGES[t] for t in missing})
        if os.geteuid() != 0:
            raise BenchError(
                f"missing {', '.join(missing)}; run as root or: apt-get install -y {' '.join(pkgs)}"
            )
        print(f"installing {' '.join(pkgs)} with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *pkgs]):
            if subprocess.run(cmd, env=env, timeout=900, check=False).returncode != 0:
                raise BenchError(f"'{' '.join(cmd)}' failed")
        still = [t for t in needed if _which(t) is None]
        if still:
            raise BenchError(f"still missing after apt-get: {', '.join(still)}")
    return {t: str(_which(t)) for t in needed}


def choose_pins() -> Pins:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return Pins(load=None, proxy=None)  # nothing to separate on one CPU
    return Pins(load=str(allowed[0]), proxy=str(allowed[1]))


def _first_line(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def metadata(args: argparse.Namespace, tools: dict[str, str], pins: Pins) -> dict[str, Any]:
    import aiohttp

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "h2_connections": args.h2_connections,
        "wrk_threads": 1,
        "backends": args.backends,
        "modes": args.modes,
        "proxies": args.proxies,
        "load_generators": {
            m: (
                "bench.handshake_load (full handshakes, no session resumption)"
                if MODES[m].loadgen == "handshake"
                else f"h2load -t1 -m{h2load.STREAMS} (ALPN h2)"
                if MODES[m].loadgen == "h2load"
                else f"wrk -t1{' -H Connection: close' if MODES[m].close else ''}"
            )
            for m in args.modes
        },
        "pinning": {"load_and_backends_cpu": pins.load, "proxy_cpu": pins.proxy},
        "clk_tck": cpu.CLK_TCK,
        "versions": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "haproxy": _first_line([tools["haproxy"], "-v"]) if "haproxy" in tools else None,
            "nginx": _first_line([tools["nginx"], "-v"]),
            "wrk": _first_line([tools["wrk"], "-v"]),
            "openssl": _first_line(["openssl", "version"]),
            "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        },
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
    }


def make_tls(workdir: Path) -> TlsFiles:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(
        cert=workdir / "server.crt",
        key=workdir / "server.key",
        combined=workdir / "server-combined.pem",
        ca_file=workdir / "ca.pem",
        ca_pem=ca.cert_pem.bytes().decode(),
    )
    files.ca_file.write_text(files.ca_pem)
    files.cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files.combined))
    return files


# ---------------------------------------------------------------- one row


def validate(url: str, ca_pem: str | None, attempts: int = 4) -> str | None:
    """None if url answers 200 'ok' `attempts` times (covers the rotation), else why not."""
    # Verification stays on: the bench CA signed the proxies' certificate.
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else None
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                status, body = resp.status, resp.read(100)
        except urllib.error.HTTPError as exc:
            return f"validation request got HTTP {exc.code}"
        except (OSError, ssl.SSLError) as exc:
            return f"validation request failed: {exc}"
        if status != 200 or body != b"ok\n":
            return f"validation got {status} {body[:40]!r}, expected 200 b'ok\\n'"
    return None


def validate_h2(port: int, tls: TlsFiles, attempts: int = 4) -> str | None:
    """None if HTTP/2 over TLS (ALPN h2, our CA verified) answers 200 'ok' on every stream."""
    from harness.h2 import H2Conn

    try:
        with H2Conn("127.0.0.1", port, ca_file=str(tls.ca_file)) as conn:
            replies = conn.get(["/"] * attempts)
    except (OSError, ConnectionError) as exc:
        return f"HTTP/2 validation failed: {exc}"
    bad = [r for r in replies if r.status != 200 or r.body != b"ok\n"]
    return f"HTTP/2 validation got {bad[0].status} {bad[0].body[:40]!r}" if bad else None


def proxy_argv(
    proxy: str,
    port: int,
    backends: Sequence[int],
    tls: TlsFiles | None,
    workdir: Path,
    tcp: bool = False,
    h2: bool = False,
    admin_port: int = 0,
) -> list[str]:
    listen = f"127.0.0.1:{port}"
    backend_flags = [x for b in backends for x in ("--backend", f"127.0.0.1:{b}")]
    tls_flags = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if tls else []
    if proxy in WORKER_PROXIES:
        admin = f"127.0.0.1:{admin_port}"
        workers = str(WORKER_PROXIES[proxy])
        argv = proxy_argv("balancer", port, backends, tls, workdir, tcp)
        return [*argv, "--workers", workers, "--admin", admin]
    if proxy == "balancer":
        return [
            sys.executable,
            "-m",
            "balancer",
            "--listen",
            listen,
            *backend_flags,
            "--algorithm",
            "round-robin",
            *(["--mode", "tcp"] if tcp else []),
            *tls_flags,
        ]
    if proxy == "naive-aiohttp":
        return [
            sys.executable,
            "-m",
            "bench.naive_proxy",
            "--listen",
            listen,
            *backend_flags,
            *tls_flags,
        ]
    if proxy == "haproxy":
        cfg = workdir / f"haproxy-{port}.cfg"
        alpn = "h2,http/1.1" if h2 else "http/1.1"
        cfg.write_text(
            configs.haproxy_config(
                port, backends, tls.combined if tls else None, alpn=alpn, tcp=tcp
            )
        )
        return [_which("haproxy") or "haproxy", "-db", "-f", str(cfg)]
    raise ValueError(f"unknown proxy {proxy}")


def run_load(
    url: str,
    duration: int,
    args: argparse.Namespace,
    mode: Mode,
    pins: Pins,
    tls: TlsFiles | None,
) -> wrk.WrkResult:
    """Run the mode's load generator on the load CPU and parse its summary."""
    if mode.loadgen == "h2load":
        name = "h2load"
        cmd = h2load.h2load_command(
            url, duration_s=duration, connections=args.h2_connections, cpu=pins.load
        )
    elif mode.loadgen == "handshake":
        if tls is None:
            raise BenchError(f"mode {mode.name} needs TLS files")
        name = "handshake_load"
        cmd = pinned(
            pins.load,
            [sys.executable, "-m", "bench.handshake_load", "--url", url,
             "--cafile", str(tls.ca_file), "--connections", str(args.connections),
             "--duration", str(duration)],
        )  # fmt: skip
    else:
        name = "wrk"
        cmd = wrk.wrk_command(
            url,
            duration_s=duration,
            connections=args.connections,
            close_connections=mode.close,
            cpu=pins.load,
        )
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 30, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name} did not finish within {duration + 30}s") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise BenchError(f"{name} exited {out.returncode}: {msg[-1] if msg else ''}")
    if mode.loadgen == "handshake":
        return handshake_load.parse_summary(out.stdout)
    if mode.loadgen == "h2load":
        return h2load.parse_h2load(out.stdout)
    return wrk.parse_wrk(out.stdout)


def bench_one(
    proxy: str,
    mode: Mode,
    args: argparse.Namespace,
    backends: Sequence[int],
    tls: TlsFiles | None,
    h: Harness,
    pins: Pins,
) -> report.Row:
    # HAProxy and the naive proxy cannot report a port they chose
    port, admin_port = free_ports(2)
    scheme = "https" if mode.tls else "http"
    url = f"{scheme}://127.0.0.1:{port}/"
    h2 = mode.loadgen == "h2load"
    argv = pinned(
        pins.proxy,
        proxy_argv(proxy, port, backends, tls, h.workdir, mode.tcp, h2=h2, admin_port=admin_port),
    )
    child = h.child(f"{proxy}-{mode.name}", argv)
    try:
        try:
            child.wait_listening(port, START_TIMEOUT_S)
        except StartError:
            return report.Row.failed(proxy, mode.name, child.last_words())
        problem = validate(url, tls.ca_pem if tls else None)
        if problem is None and h2 and tls is not None:
            problem = validate_h2(port, tls)
        if problem:
            return report.Row.failed(proxy, mode.name, problem)
        if args.warmup:
            run_load(url, args.warmup, args, mode, pins, tls)
        served_before = worker_requests(admin_port) if proxy in WORKER_PROXIES else []
        before = cpu.read_tree_ticks(child.pid)
        system_before = cpu.read_system_ticks()
        result = run_load(url, args.duration, args, mode, pins, tls)
        after = cpu.read_tree_ticks(child.pid)
        steal = cpu.steal_percent(system_before, cpu.read_system_ticks())
        spread = None
        if proxy in WORKER_PROXIES:
            served = worker_requests(admin_port)
            spread = report.spread_pct([a - b for a, b in zip(served, served_before, strict=True)])
        if not child.alive:
            return report.Row.failed(proxy, mode.name, child.last_words())
        per_req = (
            cpu.cpu_us_per_req(before, after, result.requests, cpu.CLK_TCK)
            if result.requests
            else None
        )
        return report.Row(
            proxy=proxy,
            mode=mode.name,
            rps=round(result.rps, 1),
            cpu_us_per_req=None if per_req is None else round(per_req, 2),
            p50_ms=round(result.p50_ms, 3),
            p99_ms=None if result.p99_ms != result.p99_ms else round(result.p99_ms, 3),  # NaN
            errors=result.errors,
            requests=result.requests,
            steal_pct=round(steal, 2),
            worker_spread_pct=spread,
        )
    except (BenchError, wrk.WrkParseError, ProcessLookupError, ValueError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, ProcessLookupError):
            reason = child.last_words()
        return report.Row.failed(proxy, mode.name, reason)
    finally:
        child.stop()


def worker_requests(admin_port: int) -> list[int]:
    """Requests served so far by each worker, from the balancer's /api/state."""
    url = f"http://127.0.0.1:{admin_port}/api/state"
    time.sleep(0.3)  # the workers report every 0.1 s: read after their latest requests
    with urllib.request.urlopen(url, timeout=5) as resp:  # plain HTTP on loopback
        state = json.load(resp)
    return [int(w["requests"]) for w in state["workers"]]


# ---------------------------------------------------------------- whole run


def start_backends(
    h: Harness, tools: dict[str, str], count: int, pins: Pins
) -> tuple[Child, list[int]]:
    ports = free_ports(count)
    workdir = h.workdir
    conf = workdir / "nginx.conf"
    conf.write_text(configs.nginx_config(workdir, ports))
    argv = [tools["nginx"], "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx.err")]
    nginx = h.child("nginx", pinned(pins.load, argv), cwd=None)
    for port in ports:
        try:
            nginx.wait_listening(port, START_TIMEOUT_S)
        except StartError:
            reason = nginx.last_words() + " " + tail(workdir / "nginx.err", lines=5)
            raise BenchError(f"backend did not start: {reason.strip()}") from None
        problem = validate(f"http://127.0.0.1:{port}/", None, attempts=1)
        if problem:
            nginx.stop()
            raise BenchError(f"backend on port {port}: {problem}")
    return nginx, ports


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    tools = ensure_tools(args.proxies, args.modes)
    pins = choose_pins()
    meta = metadata(args, tools, pins)
    samples: list[report.Row] = []
    with Harness() as h:  # every child stopped on the way out, even on Ctrl-C
        tls = make_tls(h.workdir) if any(MODES[m].tls for m in args.modes) else None
        nginx, backends = start_backends(h, tools, args.backends, pins)
        for mode_name in args.modes:
            mode = MODES[mode_name]
            # rounds interleave the proxies, so slow drift hits them all alike
            for rnd in range(1, args.rounds + 1):
                for proxy in args.proxies:
                    if mode.tcp and proxy not in TCP_PROXIES:
                        continue
                    if mode.loadgen == "h2load" and proxy not in H2_PROXIES:
                        continue
                    print(
                        f"-- {proxy} / {mode.name} (round {rnd}/{args.rounds}) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    started = time.monotonic()
                    samples.append(
                        bench_one(
                            proxy,
                            mode,
                            args,
                            backends,
                            tls if mode.tls else None,
                            h,
                            pins,
                        )
                    )
                    print(
                        f"   done in {time.monotonic() - started:.1f}s: "
                        f"{report.describe_sample(samples[-1])}",
                        file=sys.stderr,
                    )
                    if not nginx.alive:
                        raise BenchError(f"backend died: {nginx.last_words()}")
    rows = report.median_rows(samples)

    ratios = {
        "balancer/haproxy cpu_us_per_req": report.cpu_ratio(rows, "balancer", "haproxy"),
        "naive-aiohttp/haproxy cpu_us_per_req": report.cpu_ratio(rows, "naive-aiohttp", "haproxy"),
        "balancer-w2/balancer cpu_us_per_req": report.cpu_ratio(rows, "balancer-w2", "balancer"),
    }
    print(report.format_table(rows))
    for name, per_mode in ratios.items():
        shown = ", ".join(f"{m}={'-' if v is None else v}" for m, v in per_mode.items())
        print(f"{name}: {shown}")
    try:
        write_json(args.json, report.build_document(rows, meta, ratios))
    except OSError as exc:
        raise BenchError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    print(f"wrote {args.json}")
    return 1 if rows and all(r.status == "error" for r in rows) else 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every child.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
