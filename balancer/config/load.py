"""Filling the settings model: the TOML file first, then the flags (flags win).

Renamed flags and TOML keys keep working: they are rewritten to the new name here, with a
one-line deprecation warning, so nothing past this module knows the old names.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NoReturn

from balancer.config.address import split_hostport
from balancer.config.schema import (
    ALGORITHMS,
    LISTENER_MODES,
    LOG_LEVELS,
    PROXY_VERSIONS,
    SECTIONS,
    BackendSpec,
    Config,
    ConfigError,
    ListenerSettings,
    Timeouts,
    flag_of,
    leaves,
)
from balancer.config.validate import validate

Warn = Callable[[str], None]

# old flag -> new flag
DEPRECATED_FLAGS = {
    "--retries": "--attempts",
    "--timeout-upstream-idle": "--timeout-backend-idle",
}
# old TOML table -> new table, and (table, old key) -> new key
DEPRECATED_TABLES = {"health": "health_check"}
DEPRECATED_KEYS = {("timeouts", "upstream_idle"): "backend_idle"}


def warn_stderr(message: str) -> None:
    print(f"balancer: warning: {message}", file=sys.stderr)


def parse_backend(value: str) -> BackendSpec:
    """`H:P[,weight=W][,backup][,name=N][,sni=NAME]...[,proxy_protocol=v1|v2]` as on the
    command line; `sni=` may be repeated."""
    first, *opts = value.split(",")
    host, port = split_hostport(first, "backend")
    if port == 0:
        raise ConfigError(f"backend: port 0 is not valid in {value!r}")
    weight = 1.0
    backup = False
    name: str | None = None
    sni: list[str] = []
    proxy: str | None = None
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
        elif key == "name":
            name = val  # its rules are checked in validate(), as for the TOML `name`
        elif key == "sni":
            sni.append(val)  # checked in validate()
        elif key in ("proxy_protocol", "proxy-protocol"):
            proxy = val
        else:
            raise ConfigError(f"backend: unknown option {opt!r} in {value!r}")
    return BackendSpec(host, port, weight, backup, name, tuple(sni) if sni else None, proxy)


def parse_listener(value: str) -> ListenerSettings:
    """`H:P[,mode=http|tcp][,accept_proxy=CIDR]...[,http2=on|off]` as on the command line."""
    listen, *opts = value.split(",")
    mode = "http"
    cidrs: list[str] = []
    http2 = True
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "mode":
            mode = val  # checked in validate()
        elif key in ("accept_proxy", "accept-proxy"):
            cidrs.append(val)
        elif key == "http2":
            if val not in _SWITCH:
                raise ConfigError(f"listener: http2 must be on or off, got {val!r} in {value!r}")
            http2 = _SWITCH[val]
        else:
            raise ConfigError(f"listener: unknown option {opt!r} in {value!r}")
    return ListenerSettings(listen, mode, tuple(cidrs), http2)


_SWITCH = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}


# --- TOML ------------------------------------------------------------------------------------


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


def _renamed(data: dict[str, Any], old: str, new: str, where: str, warn: Warn, table: bool) -> None:
    """Move `data[old]` to `data[new]`, warning once; both given is ambiguous."""
    if old not in data:
        return
    shown_old, shown_new = (f"[{old}]", f"[{new}]") if table else (old, new)
    if new in data:
        raise ConfigError(f"{where}: give only {shown_new} ({shown_old} is its deprecated name)")
    warn(f"{where}: {shown_old} is deprecated, use {shown_new}")
    data[new] = data.pop(old)


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


def _backends(value: Any) -> tuple[BackendSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError("backends must be a list")
    specs = []
    for item in value:
        if isinstance(item, str):
            specs.append(parse_backend(item))
        elif isinstance(item, dict) and isinstance(item.get("address"), str):
            spec = parse_backend(item["address"])
            extra = {k: v for k, v in item.items() if k != "address"}
            if "sni" in extra:
                extra["sni"] = _strings("backends: sni", extra["sni"])
            for f in fields(BackendSpec):
                if f.name in extra and f.name != "sni":
                    _check_type("backends", f.name, extra[f.name], f.default)
            try:
                specs.append(replace(spec, **extra))
            except TypeError as exc:
                raise ConfigError(f"backends: {exc}") from None
        else:
            raise ConfigError(f"backends: invalid entry {item!r}")
    return tuple(specs)


_TOP = {f.name: f.default for f in fields(Config) if f.name not in SECTIONS}
_LISTENER = {f.name: f.default for f in fields(ListenerSettings)}


def _strings(what: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a string or a list of strings")
    return tuple(value)


def _listeners(value: Any) -> list[ListenerSettings]:
    """The `[[listener]]` tables."""
    if not isinstance(value, list) or not value:
        raise ConfigError("listener must be [[listener]] tables")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise ConfigError("listener must be [[listener]] tables")
        unknown = set(item) - set(_LISTENER)
        if unknown:
            raise ConfigError(f"[[listener]]: unknown setting(s) {', '.join(sorted(unknown))}")
        data = dict(item)
        if "accept_proxy" in data:
            data["accept_proxy"] = _strings("[[listener]]: accept_proxy", data["accept_proxy"])
        for key, default in _LISTENER.items():
            if key in data and key != "accept_proxy":
                _check_type("[[listener]]", key, data[key], default)
        out.append(ListenerSettings(**data))
    return out


def load_toml(path: str, warn: Warn = warn_stderr) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    for old, new in DEPRECATED_TABLES.items():
        _renamed(data, old, new, path, warn, table=True)
    for (table, old), new in DEPRECATED_KEYS.items():
        if isinstance(data.get(table), dict):
            _renamed(data[table], old, new, f"{path} [{table}]", warn, table=False)
    top: dict[str, Any] = {"source": path}
    for key, value in data.items():
        if key in SECTIONS:
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
            top[key] = _section(SECTIONS[key], value, key)
        elif key == "backends":
            top["backends"] = _backends(value)
        elif key == "discover":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError('discover must be a list of "NAME:PORT" strings')
            top["discover"] = tuple(value)
        elif key == "listener":
            if any(k in data for k in ("listen", "mode", "accept_proxy", "http2")):
                raise ConfigError(
                    f"{path}: give [[listener]] tables or listen/mode/accept_proxy/http2, not both"
                )
            first, *more = _listeners(value)
            top.update(
                listen=first.listen,
                mode=first.mode,
                accept_proxy=first.accept_proxy,
                http2=first.http2,
            )
            top["more_listeners"] = tuple(more)
        elif key == "accept_proxy":
            top["accept_proxy"] = _strings("accept_proxy", value)
        elif key == "workers" and isinstance(value, int) and not isinstance(value, bool):
            top["workers"] = str(value)  # `workers = 2` and `workers = "auto"` both work
        elif key in _TOP and key not in ("source", "more_listeners"):
            _check_type(path, key, value, _TOP[key])
            top[key] = value
        else:
            raise ConfigError(f"unknown setting {key!r} in {path}")
    try:
        return Config(**top)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# --- flags -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line and exit 2 like every other bad value, not argparse's usage block
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m balancer",
        description="lb-testbed balancer: an asyncio HTTP/1.1 reverse proxy.",
    )
    p.add_argument("--config", help="TOML file with the same settings (flags win)")
    p.add_argument("--listen", help="H:P of the public listener (default 127.0.0.1:8080)")
    p.add_argument(
        "--mode",
        choices=LISTENER_MODES,
        help="the listener balances requests (http, default) or connections (tcp)",
    )
    p.add_argument(
        "--listener",
        action="append",
        default=[],
        metavar="H:P[,mode=tcp][,accept_proxy=CIDR]...[,http2=off]",
        help="another listener after --listen; repeat for more (TOML: [[listener]] tables)",
    )
    p.add_argument(
        "--accept-proxy",
        metavar="CIDR[,CIDR]",
        help="accept a PROXY v1/v2 header from these sources only (and require it)",
    )
    p.add_argument(
        "--proxy-protocol",
        choices=PROXY_VERSIONS,
        help="send the client's address to backends in a PROXY header (default: none)",
    )
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="H:P[,weight=W][,backup][,name=N]",
        help="a backend; repeat for more. name=N is what the API, dashboard, metrics, "
        "access log and /api/backends/N/... use (default: H:P)",
    )
    p.add_argument(
        "--discover",
        action="append",
        default=[],
        metavar="NAME:PORT",
        help="a DNS name re-resolved periodically; every address is a backend",
    )
    p.add_argument("--algorithm", choices=tuple(ALGORITHMS))
    p.add_argument(
        "--hash-key",
        help="source-hash key: source, sni (TCP mode), header:NAME or cookie:NAME (default source)",
    )
    p.add_argument("--slow-start", type=float, help="seconds a recovered backend ramps up over")
    p.add_argument("--access-log", help="file for JSON access log lines, or - for stdout")
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument(
        "--workers",
        metavar="N|auto",
        help="worker processes for the data path (default 1; auto: one per available core)",
    )
    p.add_argument("--forwarded", action="store_true", default=None, help="add RFC 7239 Forwarded")
    p.add_argument("--tls-facts", action="store_true", default=None, help="add TLS version/cipher")
    p.add_argument(
        "--http2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the first listener serves HTTP/2 too: ALPN h2 with TLS, prior knowledge without "
        "(default on; others: --listener ...,http2=off)",
    )
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
    p.add_argument("--attempts", type=int, help="total attempts per request, first included (3)")
    p.add_argument(
        "--retry-interval",
        type=float,
        help="TCP mode: seconds before connecting to the same backend again (0.15)",
    )
    p.add_argument("--check-path", help="active check path (default /healthz)")
    p.add_argument(
        "--check-type",
        choices=("http", "tcp"),
        help="http: GET the check path (default); tcp: a connect is enough",
    )
    p.add_argument("--check-interval", type=float)
    p.add_argument("--check-timeout", type=float)
    p.add_argument("--check-rise", type=int)
    p.add_argument("--check-fall", type=int)
    p.add_argument("--no-checks", action="store_true", default=None, help="disable active checks")
    return p


def _rewrite_deprecated(argv: list[str], warn: Warn) -> list[str]:
    out = []
    for arg in argv:
        if arg == "--":
            break  # nothing after it is a flag
        name, eq, value = arg.partition("=")
        new = DEPRECATED_FLAGS.get(name)
        if new is not None:
            warn(f"{name} is deprecated, use {new}")
            arg = new + eq + value
        out.append(arg)
    return out + argv[len(out) :]


# flags that do more than set one field to the value given; from_args handles them by hand
_BY_HAND = {
    "--backend",
    "--listener",
    "--discover",
    "--tls-cert",
    "--no-checks",
    "--forwarded",
    "--tls-facts",
    "--accept-proxy",
}


def _flag_targets() -> dict[str, tuple[str, str]]:
    """argparse dest -> (section or "", field), from the schema's `flag` metadata."""
    out = {}
    for key in leaves(Config()):
        flag = flag_of(key)
        if flag is not None and flag not in _BY_HAND:
            section, _, name = key.rpartition(".")
            out[flag[2:].replace("-", "_")] = (section, name)
    return out


_FLAG_TARGETS = _flag_targets()


def from_args(argv: list[str] | None = None, warn: Warn = warn_stderr) -> Config:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_rewrite_deprecated(argv, warn))
    cfg = load_toml(args.config, warn) if args.config else Config()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for dest, (section, name) in _FLAG_TARGETS.items():
        val = getattr(args, dest)
        if val is not None:
            (sections.setdefault(section, {}) if section else top)[name] = val
    if args.forwarded:  # store_true flags cannot turn a file's true off
        top["forwarded"] = True
    if args.tls_facts:
        top["tls_facts"] = True
    if args.no_checks:
        sections.setdefault("health_check", {})["enabled"] = False
    if args.backend:
        top["backends"] = tuple(parse_backend(b) for b in args.backend)
    if args.discover:
        top["discover"] = tuple(args.discover)
    if args.listener:
        top["more_listeners"] = tuple(parse_listener(v) for v in args.listener)
    if args.accept_proxy is not None:
        top["accept_proxy"] = tuple(c.strip() for c in args.accept_proxy.split(",") if c.strip())
    if len(args.tls_cert) != len(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key must be given in pairs")
    if args.tls_cert:
        sections.setdefault("tls", {})["certs"] = tuple(
            zip(args.tls_cert, args.tls_key, strict=True)
        )
    for section, changes in sections.items():
        # a flag replaces one field; the file's other fields in that section survive
        top[section] = replace(getattr(cfg, section), **changes)
    cfg = replace(cfg, **top)
    validate(cfg)
    return cfg
