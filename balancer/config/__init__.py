"""Balancer configuration: one dataclass tree, filled from a TOML file and then from flags.

Every limit and timeout is explicit here (no hidden library defaults), and
`validate()` refuses inconsistent settings with one clear sentence.
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ALGORITHMS = ("round-robin", "least-connections", "source-hash")


class ConfigError(ValueError):
    """A setting is invalid; the message is meant for the user as-is."""


@dataclass(frozen=True)
class BackendSpec:
    host: str
    port: int
    weight: float = 1.0
    backup: bool = False

    @property
    def id(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 1.0
    client_header: float = 10.0  # first byte of a request head -> end of head
    client_body: float = 30.0  # inactivity while reading a request body
    idle_keepalive: float = 30.0  # client keep-alive between requests
    backend_response: float = 15.0  # request sent -> response head
    tunnel_idle: float = 300.0  # Upgrade tunnels
    upstream_idle: float = 15.0  # pooled backend connection; below backends' 75 s keep-alive
    queue: float = 2.0  # waiting for a backend connection slot
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class Limits:
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_client_connections: int = 20000
    backend_max_connections: int = 512  # connections per backend
    backend_max_idle: int = 128  # idle pooled connections kept per backend
    queue_size: int = 1024  # requests waiting for a backend connection slot
    max_request_body: int = 0  # 0 = unlimited (streamed, never held)


@dataclass(frozen=True)
class HealthSettings:
    path: str = "/healthz"
    interval: float = 0.5
    fast_interval: float = 0.2
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    enabled: bool = True


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_failures: int = 3
    consecutive_5xx: int = 5
    base_ejection: float = 5.0
    max_ejection: float = 60.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 3  # total tries, first one included
    budget_ratio: float = 0.2
    budget_min_per_second: float = 5.0


@dataclass(frozen=True)
class TLSSettings:
    certs: tuple[tuple[str, str], ...] = ()  # (cert, key) pairs; first is the default
    client_ca: str | None = None  # mTLS on the public listener
    redirect_http: str | None = None  # H:P of a plain listener that redirects with 308
    hsts: str | None = "max-age=31536000"
    backend_ca: str | None = None  # re-encrypt to backends and verify against this CA
    backend_cert: str | None = None  # client certificate towards backends
    backend_key: str | None = None
    backend_server_name: str | None = None


@dataclass(frozen=True)
class AdminSettings:
    listen: str | None = None  # H:P
    token_file: str | None = None
    client_ca: str | None = None  # mTLS for mutations
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class PairSettings:
    peer: str | None = None  # H:P of the peer's election port
    bind: str | None = None  # H:P for our election port
    priority: int = 100
    advert_interval: float = 0.2
    preempt: bool = True
    secret_file: str | None = None
    vip: str | None = None  # ADDR/PREFIX (container mode)
    vip_interface: str | None = None


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:8080"
    backends: tuple[BackendSpec, ...] = ()
    discover: tuple[str, ...] = ()  # DNS name:port, re-resolved
    discover_interval: float = 2.0
    algorithm: str = "round-robin"
    hash_key: str = "source"
    slow_start: float = 0.0
    access_log: str | None = None  # path or "-" for stdout
    log_level: str = "info"
    forwarded: bool = False
    tls_facts: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    health: HealthSettings = field(default_factory=HealthSettings)
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    retries: RetrySettings = field(default_factory=RetrySettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    pair: PairSettings = field(default_factory=PairSettings)
    source: str | None = None  # the TOML file this came from, for reloads


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_backend(value: str) -> BackendSpec:
    """`H:P[,weight=W][,backup]` as on the command line."""
    first, *opts = value.split(",")
    host, port = split_hostport(first, "backend")
    if port == 0:
        raise ConfigError(f"backend: port 0 is not valid in {value!r}")
    weight = 1.0
    backup = False
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "weight":
            try:
                weight = float(val)
            except ValueError:
                raise ConfigError(f"backend: weight must be a number in {value!r}") from None
            if not 0 < weight <= 1000:
                raise ConfigError(f"backend: weight must be in (0, 1000] in {value!r}")
        elif key == "backup" and not val:
            backup = True
        else:
            raise ConfigError(f"backend: unknown option {opt!r} in {value!r}")
    return BackendSpec(host, port, weight, backup)


def _check_type(where: str, key: str, value: Any, default: Any) -> None:
    """A TOML value must have the type of the setting's default (an int is fine for a float);
    otherwise validation would fail later with a traceback instead of this message."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, float):
        ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, str) or default is None:
        ok, kind = isinstance(value, str), "a string"
    else:
        return  # tuples are checked where they are built
    if not ok:
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")


def _section(cls: type[Any], data: dict[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"[{name}]: unknown setting(s) {', '.join(sorted(unknown))}")
    for f in fields(cls):
        if f.name in data:
            _check_type(f"[{name}]", f.name, data[f.name], f.default)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"[{name}]: {exc}") from None


_SECTIONS = {
    "timeouts": Timeouts,
    "limits": Limits,
    "health": HealthSettings,
    "outlier": OutlierSettings,
    "retries": RetrySettings,
    "tls": TLSSettings,
    "admin": AdminSettings,
    "pair": PairSettings,
}


_TOP = {f.name: f.default for f in fields(Config)}
LOG_LEVELS = ("debug", "info", "warning", "error")


def load_toml(path: str) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    top: dict[str, Any] = {"source": path}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table")
            if key == "tls" and "certs" in value:
                certs = value["certs"]
                if not isinstance(certs, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                    for p in certs
                ):
                    raise ConfigError('[tls]: certs must be a list of ["cert.pem", "key.pem"]')
                value = dict(value, certs=tuple(tuple(p) for p in certs))
            top[key] = _section(_SECTIONS[key], value, key)
        elif key == "backends":
            if not isinstance(value, list):
                raise ConfigError("backends must be a list")
            specs = []
            for item in value:
                if isinstance(item, str):
                    specs.append(parse_backend(item))
                elif isinstance(item, dict) and isinstance(item.get("address"), str):
                    spec = parse_backend(item["address"])
                    extra = {k: v for k, v in item.items() if k != "address"}
                    for f in fields(BackendSpec):
                        if f.name in extra:
                            _check_type("backends", f.name, extra[f.name], f.default)
                    try:
                        specs.append(replace(spec, **extra))
                    except TypeError as exc:
                        raise ConfigError(f"backends: {exc}") from None
                else:
                    raise ConfigError(f"backends: invalid entry {item!r}")
            top["backends"] = tuple(specs)
        elif key == "discover":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError('discover must be a list of "NAME:PORT" strings')
            top["discover"] = tuple(value)
        elif key in _TOP and key != "source":
            _check_type(path, key, value, _TOP[key])
            top[key] = value
        else:
            raise ConfigError(f"unknown setting {key!r} in {path}")
    try:
        return Config(**top)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m balancer",
        description="lb-testbed balancer: an asyncio HTTP/1.1 reverse proxy.",
    )
    p.add_argument("--config", help="TOML file with the same settings (flags win)")
    p.add_argument("--listen", help="H:P of the public listener (default 127.0.0.1:8080)")
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="H:P[,weight=W][,backup]",
        help="a backend; repeat for more",
    )
    p.add_argument(
        "--discover",
        action="append",
        default=[],
        metavar="NAME:PORT",
        help="a DNS name re-resolved periodically; every address is a backend",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS)
    p.add_argument(
        "--hash-key", help="source-hash key: source, header:NAME or cookie:NAME (default source)"
    )
    p.add_argument("--slow-start", type=float, help="seconds a recovered backend ramps up over")
    p.add_argument("--access-log", help="file for JSON access log lines, or - for stdout")
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--forwarded", action="store_true", default=None, help="add RFC 7239 Forwarded")
    p.add_argument("--tls-facts", action="store_true", default=None, help="add TLS version/cipher")
    p.add_argument("--tls-cert", action="append", default=[], help="certificate chain (PEM)")
    p.add_argument("--tls-key", action="append", default=[], help="private key for --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates from this CA (mTLS)")
    p.add_argument("--redirect-http", metavar="H:P", help="plain listener that redirects (308)")
    p.add_argument("--backend-ca", help="speak TLS to backends and verify them against this CA")
    p.add_argument("--admin", metavar="H:P", help="admin API, dashboard and metrics listener")
    p.add_argument("--admin-token-file", help="bearer token required for admin mutations")
    p.add_argument("--admin-client-ca", help="accept admin mutations from certs of this CA")
    p.add_argument("--admin-cert", help="serve the admin listener over TLS with this cert")
    p.add_argument("--admin-key", help="key for --admin-cert")
    p.add_argument("--peer", metavar="H:P", help="the other balancer's election address")
    p.add_argument("--bind-election", metavar="H:P", help="our election address")
    p.add_argument("--priority", type=int, help="election priority 1-254 (default 100)")
    p.add_argument("--advert-interval", type=float, help="seconds between adverts (default 0.2)")
    p.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--secret-file", help="shared secret for authenticated adverts")
    p.add_argument("--vip", metavar="ADDR/PREFIX", help="service address held by the active")
    p.add_argument("--vip-interface", metavar="IF", help="interface for --vip")
    for name in fields(Timeouts):
        p.add_argument(
            f"--timeout-{name.name.replace('_', '-')}",
            type=float,
            dest=f"timeout_{name.name}",
            help=f"seconds (default {name.default})",
        )
    p.add_argument("--retries", type=int, help="total attempts per request (default 3)")
    p.add_argument("--check-path", help="active check path (default /healthz)")
    p.add_argument("--check-interval", type=float)
    p.add_argument("--check-timeout", type=float)
    p.add_argument("--check-rise", type=int)
    p.add_argument("--check-fall", type=int)
    p.add_argument("--no-checks", action="store_true", default=None, help="disable active checks")
    return p


def from_args(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    cfg = load_toml(args.config) if args.config else Config()
    top: dict[str, Any] = {}
    for key in ("listen", "algorithm", "hash_key", "slow_start", "access_log", "log_level"):
        val = getattr(args, key)
        if val is not None:
            top[key] = val
    if args.forwarded:
        top["forwarded"] = True
    if args.tls_facts:
        top["tls_facts"] = True
    if args.backend:
        top["backends"] = tuple(parse_backend(b) for b in args.backend)
    if args.discover:
        top["discover"] = tuple(args.discover)
    to = {f.name: getattr(args, f"timeout_{f.name}") for f in fields(Timeouts)}
    to = {k: v for k, v in to.items() if v is not None}
    if to:
        top["timeouts"] = replace(cfg.timeouts, **to)
    if args.retries is not None:
        top["retries"] = replace(cfg.retries, attempts=args.retries)
    hc: dict[str, Any] = {}
    for key in ("path", "interval", "timeout", "rise", "fall"):
        val = getattr(args, f"check_{key}")
        if val is not None:
            hc[key] = val
    if args.no_checks:
        hc["enabled"] = False
    if hc:
        top["health"] = replace(cfg.health, **hc)
    if len(args.tls_cert) != len(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key must be given in pairs")
    tls: dict[str, Any] = {}
    if args.tls_cert:
        tls["certs"] = tuple(zip(args.tls_cert, args.tls_key, strict=True))
    for key, attr in (
        ("client_ca", "tls_client_ca"),
        ("redirect_http", "redirect_http"),
        ("backend_ca", "backend_ca"),
    ):
        if getattr(args, attr) is not None:
            tls[key] = getattr(args, attr)
    if tls:
        top["tls"] = replace(cfg.tls, **tls)
    adm: dict[str, Any] = {}
    for key, attr in (
        ("listen", "admin"),
        ("token_file", "admin_token_file"),
        ("client_ca", "admin_client_ca"),
        ("cert", "admin_cert"),
        ("key", "admin_key"),
    ):
        if getattr(args, attr) is not None:
            adm[key] = getattr(args, attr)
    if adm:
        top["admin"] = replace(cfg.admin, **adm)
    pair: dict[str, Any] = {}
    for key, attr in (
        ("peer", "peer"),
        ("bind", "bind_election"),
        ("priority", "priority"),
        ("advert_interval", "advert_interval"),
        ("preempt", "preempt"),
        ("secret_file", "secret_file"),
        ("vip", "vip"),
        ("vip_interface", "vip_interface"),
    ):
        if getattr(args, attr) is not None:
            pair[key] = getattr(args, attr)
    if pair:
        top["pair"] = replace(cfg.pair, **pair)
    cfg = replace(cfg, **top)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    split_hostport(cfg.listen, "listen")
    if not cfg.backends and not cfg.discover:
        raise ConfigError("no backends: give --backend H:P (or --discover NAME:PORT)")
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg.algorithm!r}; choose {', '.join(ALGORITHMS)}")
    kind, _, name = cfg.hash_key.partition(":")
    if not (cfg.hash_key == "source" or (kind in ("header", "cookie") and name)):
        raise ConfigError(
            f"invalid hash key {cfg.hash_key!r}: use source, header:NAME, cookie:NAME"
        )
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"unknown log level {cfg.log_level!r}; choose {', '.join(LOG_LEVELS)}")
    for b in cfg.backends:
        if not 0 < b.weight <= 1000:
            raise ConfigError(f"backend {b.id}: weight must be in (0, 1000]")
    ids = [b.id for b in cfg.backends]
    if len(set(ids)) != len(ids):
        raise ConfigError("the same backend is listed twice")
    for spec in cfg.discover:
        split_hostport(spec, "discover")
    if not cfg.discover_interval > 0:
        raise ConfigError("discover_interval must be > 0")
    if not cfg.slow_start >= 0:
        raise ConfigError("slow start must be >= 0 seconds")
    for f in fields(Timeouts):
        if not getattr(cfg.timeouts, f.name) > 0:  # also refuses nan
            raise ConfigError(f"timeout {f.name} must be > 0")
    if cfg.timeouts.upstream_idle >= 75:
        raise ConfigError("upstream_idle must stay below the backends' keep-alive (75 s)")
    for f in fields(Limits):
        if getattr(cfg.limits, f.name) < 0:
            raise ConfigError(f"limit {f.name} must be >= 0")
    if cfg.retries.attempts < 1:
        raise ConfigError("retries (total attempts) must be >= 1")
    h = cfg.health
    if h.interval <= 0 or h.timeout <= 0 or h.rise < 1 or h.fall < 1:
        raise ConfigError("health check interval/timeout must be > 0 and rise/fall >= 1")
    if not h.path.startswith("/"):
        raise ConfigError("health check path must start with /")
    if cfg.admin.listen:
        split_hostport(cfg.admin.listen, "admin")
    if bool(cfg.admin.cert) != bool(cfg.admin.key):
        raise ConfigError("--admin-cert and --admin-key go together")
    if cfg.tls.redirect_http:
        if not cfg.tls.certs:
            raise ConfigError("--redirect-http needs an HTTPS listener (--tls-cert/--tls-key)")
        split_hostport(cfg.tls.redirect_http, "redirect-http")
    for cert, key in cfg.tls.certs:
        for path in (cert, key):
            if not Path(path).is_file():
                raise ConfigError(f"TLS file not found: {path}")
    pair = cfg.pair
    if pair.peer:
        split_hostport(pair.peer, "peer")
        if not 1 <= pair.priority <= 254:
            raise ConfigError("priority must be between 1 and 254")
        if pair.advert_interval <= 0:
            raise ConfigError("advert interval must be > 0")
        if not pair.secret_file:
            raise ConfigError("a pair needs --secret-file (adverts are authenticated)")
        if not Path(pair.secret_file).is_file():
            raise ConfigError(f"secret file not found: {pair.secret_file}")
        if not pair.bind:
            raise ConfigError("a pair needs --bind-election H:P for our own election port")
        if pair.bind == pair.peer:
            raise ConfigError("--peer and --bind-election are the same address")
    if pair.vip:
        try:
            ipaddress.ip_interface(pair.vip)
        except ValueError:
            raise ConfigError(f"invalid --vip {pair.vip!r}: expected ADDR/PREFIX") from None
        if "/" not in pair.vip:
            raise ConfigError(f"invalid --vip {pair.vip!r}: expected ADDR/PREFIX")
        if not pair.vip_interface:
            raise ConfigError("--vip needs --vip-interface")
