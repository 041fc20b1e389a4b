"""`validate()`: the one place settings are checked. Every layer trusts a validated Config.

Each fault raises ConfigError with one line that names the setting (its TOML key, and
its flag when it has one), so the CLI prints it and exits 2 instead of a later traceback.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from balancer.config.address import split_hostport
from balancer.config.schema import (
    ALGORITHMS,
    LISTENER_MODES,
    LOG_LEVELS,
    PROXY_VERSIONS,
    Config,
    ConfigError,
    Limits,
    Timeouts,
    flag_of,
)
from balancer.lb.names import NAME_RULE, valid_name

# the election's range: 0 means "resigning" on the wire, 255 is reserved
MIN_PRIORITY, MAX_PRIORITY = 1, 254
# backends close idle keep-alive connections after 75 s; reusing one that late races that
BACKEND_KEEPALIVE = 75.0
# limits where 0 is meaningful: no pooled idle connections, no queue, no body limit
ZERO_MEANS_NONE = ("backend_max_idle", "queue_size", "max_request_body")


def _name(key: str) -> str:
    if "[" in key:  # an entry of a list of tables, e.g. listener[2].mode: no flag
        return key
    flag = flag_of(key)
    return f"{key} ({flag})" if flag else key


def _fail(key: str, problem: str) -> NoReturn:
    raise ConfigError(f"{_name(key)} {problem}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):  # also refuses nan and inf
        _fail(key, f"must be a number > 0, got {value!r}")


def _not_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        _fail(key, f"must be a number >= 0, got {value!r}")


def _at_least_one(key: str, value: int) -> None:
    if value < 1:
        _fail(key, f"must be an integer >= 1, got {value!r}")


def _address(key: str, value: str, *, wildcard: bool = True) -> None:
    split_hostport(value, _name(key), wildcard=wildcard)


def _file(key: str, path: str) -> None:
    if not Path(path).is_file():
        _fail(key, f"names a file that is not there: {path}")


def _unique(key: str, what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            _fail(key, f"lists the {what} {value!r} twice")
        seen.add(value)


# a server name as SNI carries it: DNS labels, optionally "*." first (a suffix wildcard)
_SNI_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def valid_sni_pattern(name: str) -> bool:
    """`host.example` or `*.example` (lower case, as the ClientHello reader compares)."""
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    return 0 < len(name) <= 253 and bool(labels) and all(_SNI_LABEL.match(x) for x in labels)


def _validate_listeners(cfg: Config) -> None:
    seen: set[tuple[str, int]] = set()
    for i, listener in enumerate(cfg.listeners):
        key = "listen" if i == 0 else f"listener[{i + 1}].listen"
        host, port = split_hostport(listener.listen, _name(key) if i == 0 else key)
        if port and (host, port) in seen:
            _fail(key, f"binds {listener.listen} a second time")
        seen.add((host, port))
        mkey = "mode" if i == 0 else f"listener[{i + 1}].mode"
        if listener.mode not in LISTENER_MODES:
            _fail(mkey, f"{listener.mode!r} is unknown; choose {', '.join(LISTENER_MODES)}")
        akey = "accept_proxy" if i == 0 else f"listener[{i + 1}].accept_proxy"
        for cidr in listener.accept_proxy:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                _fail(akey, f"must be CIDRs such as 10.0.0.0/8, got {cidr!r}")
    wants_proxy = cfg.proxy_protocol is not None or any(b.proxy_protocol for b in cfg.backends)
    if wants_proxy and all(lst.mode != "tcp" for lst in cfg.listeners):
        # an HTTP listener pools backend connections across clients: it sends
        # X-Forwarded-For, never a PROXY header
        _fail("proxy_protocol", "needs a TCP-mode listener (--mode tcp)")
    if cfg.proxy_protocol is not None and cfg.proxy_protocol not in PROXY_VERSIONS:
        _fail("proxy_protocol", f"{cfg.proxy_protocol!r} is unknown; choose v1 or v2")
    for b in cfg.backends:
        if b.proxy_protocol is not None and b.proxy_protocol not in PROXY_VERSIONS:
            _fail("backends", f"{b.id}: proxy_protocol {b.proxy_protocol!r}: choose v1 or v2")
        for name in b.sni or ():
            if not valid_sni_pattern(name):
                _fail(
                    "backends",
                    f"{b.id}: sni {name!r} is invalid: a lower-case host name or *.suffix",
                )


def validate(cfg: Config) -> None:
    _validate_listeners(cfg)
    if not cfg.backends and not cfg.discover:
        raise ConfigError("no backends: give --backend H:P (or --discover NAME:PORT)")
    if cfg.algorithm not in ALGORITHMS:
        _fail("algorithm", f"{cfg.algorithm!r} is unknown; choose {', '.join(ALGORITHMS)}")
    kind, _, name = cfg.hash_key.partition(":")
    if not (cfg.hash_key in ("source", "sni") or (kind in ("header", "cookie") and name)):
        _fail(
            "hash_key",
            f"{cfg.hash_key!r} is invalid: use source, sni (TCP mode), header:NAME, cookie:NAME",
        )
    if cfg.log_level not in LOG_LEVELS:
        _fail("log_level", f"{cfg.log_level!r} is unknown; choose {', '.join(LOG_LEVELS)}")
    for b in cfg.backends:
        if not 0 < b.weight <= 1000:
            _fail("backends", f"{b.id}: weight must be in (0, 1000], got {b.weight!r}")
    for b in cfg.backends:
        if b.name is not None and not valid_name(b.name):
            _fail("backends", f"{b.address}: name {b.name!r} is invalid: use {NAME_RULE}")
    _unique("backends", "address", [b.address for b in cfg.backends])
    _unique("backends", "name", [b.name for b in cfg.backends if b.name is not None])
    for spec in cfg.discover:
        _address("discover", spec, wildcard=False)
    _positive("discover_interval", cfg.discover_interval)
    _not_negative("slow_start", cfg.slow_start)
    if cfg.workers != "auto" and not (cfg.workers.isdigit() and 1 <= int(cfg.workers) <= 64):
        _fail("workers", f"must be a number from 1 to 64 or auto, got {cfg.workers!r}")
    _validate_timeouts_limits(cfg)
    _validate_retries_checks_outlier(cfg)
    _validate_admin_tls(cfg)
    _validate_pair(cfg)


def _validate_timeouts_limits(cfg: Config) -> None:
    for f in fields(Timeouts):
        _positive(f"timeouts.{f.name}", getattr(cfg.timeouts, f.name))
    if cfg.timeouts.backend_idle >= BACKEND_KEEPALIVE:
        _fail(
            "timeouts.backend_idle",
            f"must stay below the backends' keep-alive ({BACKEND_KEEPALIVE:g} s), "
            f"got {cfg.timeouts.backend_idle!r}",
        )
    for f in fields(Limits):
        value = getattr(cfg.limits, f.name)
        if f.name in ZERO_MEANS_NONE:
            if value < 0:
                _fail(f"limits.{f.name}", f"must be >= 0, got {value!r}")
        elif value < 1:  # 0 would refuse every request
            _fail(f"limits.{f.name}", f"must be >= 1, got {value!r}")


def _validate_retries_checks_outlier(cfg: Config) -> None:
    r = cfg.retries
    _at_least_one("retries.attempts", r.attempts)
    _not_negative("retries.budget_ratio", r.budget_ratio)
    _not_negative("retries.budget_min_per_second", r.budget_min_per_second)
    _not_negative("retries.interval", r.interval)
    h = cfg.health_check
    if h.type not in ("http", "tcp"):
        _fail("health_check.type", f"{h.type!r} is unknown; choose http or tcp")
    if not h.path.startswith("/"):
        _fail("health_check.path", f"must start with /, got {h.path!r}")
    _positive("health_check.interval", h.interval)
    _positive("health_check.fast_interval", h.fast_interval)
    _positive("health_check.timeout", h.timeout)
    _at_least_one("health_check.rise", h.rise)
    _at_least_one("health_check.fall", h.fall)
    o = cfg.outlier
    _at_least_one("outlier.consecutive_failures", o.consecutive_failures)
    _at_least_one("outlier.consecutive_5xx", o.consecutive_5xx)
    _positive("outlier.base_ejection", o.base_ejection)
    _positive("outlier.max_ejection", o.max_ejection)
    if o.max_ejection < o.base_ejection:
        _fail(
            "outlier.max_ejection",
            f"must be >= outlier.base_ejection ({o.base_ejection:g}), got {o.max_ejection:g}",
        )
    if not 0 <= o.max_ejection_percent <= 100:
        _fail(
            "outlier.max_ejection_percent",
            f"must be between 0 and 100, got {o.max_ejection_percent!r}",
        )


def _validate_admin_tls(cfg: Config) -> None:
    a = cfg.admin
    if a.listen:
        _address("admin.listen", a.listen)
    if bool(a.cert) != bool(a.key):
        _fail("admin.cert", "and admin.key (--admin-key) go together")
    t = cfg.tls
    if t.redirect_http:
        if not t.certs:
            _fail("tls.redirect_http", "needs an HTTPS listener (--tls-cert/--tls-key)")
        _address("tls.redirect_http", t.redirect_http)
    for cert, key in t.certs:
        for path in (cert, key):
            _file("tls.certs", path)
    if bool(t.backend_cert) != bool(t.backend_key):
        _fail("tls.backend_cert", "and tls.backend_key go together")
    # the other TLS files are loaded (and their faults reported in one line) by balancer.tls


def _validate_pair(cfg: Config) -> None:
    pair = cfg.pair
    if not MIN_PRIORITY <= pair.priority <= MAX_PRIORITY:
        _fail(
            "pair.priority",
            f"must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {pair.priority!r}",
        )
    _positive("pair.advert_interval", pair.advert_interval)
    if pair.peer:
        _address("pair.peer", pair.peer, wildcard=False)
        if not pair.secret_file:
            _fail("pair.secret_file", "is required in a pair (adverts are authenticated)")
        _file("pair.secret_file", pair.secret_file)
        try:
            secret = Path(pair.secret_file).read_bytes().strip()
        except OSError as exc:
            _fail("pair.secret_file", f"is unreadable: {exc.strerror}")
        if not secret:
            _fail("pair.secret_file", f"is empty: {pair.secret_file}")
        if not pair.bind:
            _fail("pair.bind", "is required in a pair: our own election address H:P")
        _address("pair.bind", pair.bind, wildcard=False)  # the election binds a named host
        if _same_endpoint(pair.bind, pair.peer):
            _fail("pair.peer", f"is this node itself ({pair.peer} = pair.bind)")
    if pair.vip:
        try:
            ipaddress.ip_interface(pair.vip)
        except ValueError:
            _fail("pair.vip", f"must be ADDR/PREFIX, got {pair.vip!r}")
        if "/" not in pair.vip:
            _fail("pair.vip", f"must be ADDR/PREFIX, got {pair.vip!r}")
        if not pair.vip_interface:
            _fail("pair.vip_interface", "is required with --vip")


def _same_endpoint(a: str, b: str) -> bool:
    (ha, pa), (hb, pb) = split_hostport(a, "pair.bind"), split_hostport(b, "pair.peer")
    if pa != pb:
        return False
    try:
        return ipaddress.ip_address(ha) == ipaddress.ip_address(hb)
    except ValueError:
        return ha.lower() == hb.lower()
