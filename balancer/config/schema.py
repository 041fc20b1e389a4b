"""The settings model: one tree of frozen dataclasses, read by every layer.

Each setting's field metadata says whether a reload applies it to a running process
(`live`) or it needs a restart, and which command-line flag sets it. The reload report
and the error messages are derived from that metadata, so there is no list to keep in sync.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from balancer.lb.algorithms import ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "LISTENER_MODES",
    "LOG_LEVELS",
    "PROXY_VERSIONS",
    "AdminSettings",
    "BackendSpec",
    "Config",
    "ConfigError",
    "HealthCheckSettings",
    "Limits",
    "ListenerSettings",
    "OutlierSettings",
    "PairSettings",
    "RetrySettings",
    "TLSSettings",
    "Timeouts",
    "flag_of",
    "is_live",
    "setting",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LISTENER_MODES = ("http", "tcp")  # layer 7 (requests) or layer 4 (connections)
PROXY_VERSIONS = ("v1", "v2")  # the PROXY protocol header sent to backends
# live=False marks what a running process cannot change: sockets, TLS contexts, check tasks,
# the election and the outlier detector are built from those settings at start


class ConfigError(ValueError):
    """A setting is invalid; the message is one line meant for the user as-is."""


def setting(default: Any = None, *, live: bool, flag: str | None = None) -> Any:
    """A dataclass field carrying its reload behaviour and its flag (see the module doc)."""
    return field(default=default, metadata={"live": live, "flag": flag})


@dataclass(frozen=True)
class BackendSpec:
    host: str
    port: int
    weight: float = 1.0
    backup: bool = False
    # what users see everywhere (API, dashboard, metrics, access log, events, URLs);
    # None: the backend is known by its address
    name: str | None = None
    # TCP mode: the ClientHello server names this backend takes (exact, or "*.suffix");
    # None: a default backend, taking what no named backend matches
    sni: tuple[str, ...] | None = None
    # send a PROXY protocol header ("v1" or "v2") first; None: the global proxy_protocol
    proxy_protocol: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def id(self) -> str:
        """The backend's one name: `name` when given, else `host:port`."""
        return self.name if self.name is not None else self.address


@dataclass(frozen=True)
class Timeouts:
    connect: float = setting(1.0, live=True, flag="--timeout-connect")
    # first byte of a request head -> end of head
    client_header: float = setting(10.0, live=True, flag="--timeout-client-header")
    # inactivity while reading a request body
    client_body: float = setting(30.0, live=True, flag="--timeout-client-body")
    # client keep-alive between requests
    idle_keepalive: float = setting(30.0, live=True, flag="--timeout-idle-keepalive")
    # request sent -> response head
    backend_response: float = setting(15.0, live=True, flag="--timeout-backend-response")
    tunnel_idle: float = setting(300.0, live=True, flag="--timeout-tunnel-idle")  # Upgrade
    # TCP mode: a relayed connection with no byte either way for this long is closed
    tcp_idle: float = setting(300.0, live=True, flag="--timeout-tcp-idle")
    # TCP mode: the PROXY header and the ClientHello must arrive within this
    client_hello: float = setting(5.0, live=True, flag="--timeout-client-hello")
    # pooled backend connection; below the backends' 75 s keep-alive
    backend_idle: float = setting(15.0, live=True, flag="--timeout-backend-idle")
    # waiting for a backend connection slot
    queue: float = setting(2.0, live=True, flag="--timeout-queue")
    shutdown_grace: float = setting(10.0, live=True, flag="--timeout-shutdown-grace")


@dataclass(frozen=True)
class Limits:
    max_request_line: int = setting(8192, live=True)
    max_header_bytes: int = setting(32768, live=True)
    max_headers: int = setting(100, live=True)
    max_client_connections: int = setting(20000, live=True)
    backend_max_connections: int = setting(512, live=True)  # connections per backend
    backend_max_idle: int = setting(128, live=True)  # idle pooled connections per backend
    queue_size: int = setting(1024, live=True)  # requests waiting for a connection slot
    max_request_body: int = setting(0, live=True)  # 0 = unlimited (streamed, never held)


@dataclass(frozen=True)
class HealthCheckSettings:
    """Active checks. `fast_interval` is used while a backend is changing state (after a
    result opposite to its state), capped at `interval`. The defaults notice a backend that
    refuses connections within 1 s: the next check comes at most 0.5 s after it died, and the
    confirming one 0.2 s later."""

    path: str = setting("/healthz", live=False, flag="--check-path")
    # "http": GET `path`, 2xx/3xx is up; "tcp": a connect is up (backends that do not
    # speak plain HTTP, e.g. behind TLS passthrough)
    type: str = setting("http", live=False, flag="--check-type")
    interval: float = setting(0.5, live=False, flag="--check-interval")
    fast_interval: float = setting(0.2, live=False)
    timeout: float = setting(0.5, live=False, flag="--check-timeout")
    rise: int = setting(2, live=False, flag="--check-rise")
    fall: int = setting(2, live=False, flag="--check-fall")
    enabled: bool = setting(True, live=False, flag="--no-checks")


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_failures: int = setting(3, live=False)
    consecutive_5xx: int = setting(5, live=False)
    base_ejection: float = setting(5.0, live=False)
    max_ejection: float = setting(60.0, live=False)
    max_ejection_percent: int = setting(50, live=False)


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = setting(3, live=True, flag="--attempts")  # total tries, first included
    budget_ratio: float = setting(0.2, live=True)
    budget_min_per_second: float = setting(5.0, live=True)
    # TCP mode: the pause before trying the same backend again (when no other is left)
    interval: float = setting(0.15, live=True, flag="--retry-interval")


@dataclass(frozen=True)
class TLSSettings:
    # (cert, key) pairs; the first is the default
    certs: tuple[tuple[str, str], ...] = setting((), live=False, flag="--tls-cert")
    client_ca: str | None = setting(live=False, flag="--tls-client-ca")  # mTLS, public side
    # H:P of a plain listener that redirects with 308
    redirect_http: str | None = setting(live=False, flag="--redirect-http")
    hsts: str | None = setting("max-age=31536000", live=False)
    # re-encrypt to backends and verify against this CA
    backend_ca: str | None = setting(live=False, flag="--backend-ca")
    backend_cert: str | None = setting(live=False)  # client certificate towards backends
    backend_key: str | None = setting(live=False)
    backend_server_name: str | None = setting(live=False)


@dataclass(frozen=True)
class AdminSettings:
    listen: str | None = setting(live=False, flag="--admin")  # H:P
    token_file: str | None = setting(live=True, flag="--admin-token-file")  # re-read per request
    # the TLS context verifies client certificates against it from start-up
    client_ca: str | None = setting(live=False, flag="--admin-client-ca")
    cert: str | None = setting(live=False, flag="--admin-cert")
    key: str | None = setting(live=False, flag="--admin-key")


@dataclass(frozen=True)
class PairSettings:
    peer: str | None = setting(live=False, flag="--peer")  # H:P of the peer's election port
    bind: str | None = setting(live=False, flag="--bind-election")  # H:P of our own
    priority: int = setting(100, live=False, flag="--priority")
    advert_interval: float = setting(0.2, live=False, flag="--advert-interval")
    preempt: bool = setting(True, live=False, flag="--preempt")
    secret_file: str | None = setting(live=False, flag="--secret-file")
    vip: str | None = setting(live=False, flag="--vip")  # ADDR/PREFIX (container mode)
    vip_interface: str | None = setting(live=False, flag="--vip-interface")


@dataclass(frozen=True)
class ListenerSettings:
    """One public listener: a TOML `[[listener]]` table. The first listener is also the
    top-level `listen`/`mode`/`accept_proxy`/`http2` (and their flags). TLS is top-level:
    it applies to every HTTP listener."""

    listen: str = "127.0.0.1:8080"
    mode: str = "http"  # LISTENER_MODES
    # CIDRs a PROXY v1/v2 header is accepted from (and then required); () accepts none
    accept_proxy: tuple[str, ...] = ()
    # HTTP/2 beside HTTP/1.1 (HTTP listeners): ALPN h2 with TLS, prior knowledge without
    http2: bool = True


@dataclass(frozen=True)
class Config:
    listen: str = setting("127.0.0.1:8080", live=False, flag="--listen")
    mode: str = setting("http", live=False, flag="--mode")  # of the first listener
    accept_proxy: tuple[str, ...] = setting((), live=False, flag="--accept-proxy")
    # the listeners after the first (TOML [[listener]] tables 2..n)
    more_listeners: tuple[ListenerSettings, ...] = setting((), live=False, flag="--listener")
    # default PROXY protocol header to backends ("v1"/"v2"); a backend's own wins
    proxy_protocol: str | None = setting(live=True, flag="--proxy-protocol")
    backends: tuple[BackendSpec, ...] = setting((), live=True, flag="--backend")
    discover: tuple[str, ...] = setting((), live=True, flag="--discover")  # NAME:PORT
    discover_interval: float = setting(2.0, live=True)
    algorithm: str = setting("round-robin", live=True, flag="--algorithm")
    hash_key: str = setting("source", live=True, flag="--hash-key")
    slow_start: float = setting(0.0, live=False, flag="--slow-start")
    access_log: str | None = setting(live=True, flag="--access-log")  # path or "-" (stdout)
    log_level: str = setting("info", live=True, flag="--log-level")
    # worker processes serving the data path: "1" (no extra process), N, or "auto" (one per
    # available core: CPU affinity and cgroup quota); resolved once at start
    workers: str = setting("1", live=False, flag="--workers")
    forwarded: bool = setting(False, live=True, flag="--forwarded")
    tls_facts: bool = setting(False, live=True, flag="--tls-facts")
    # of the first listener: HTTP/2 beside HTTP/1.1 (see ListenerSettings.http2)
    http2: bool = setting(True, live=False, flag="--http2")
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    retries: RetrySettings = field(default_factory=RetrySettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    pair: PairSettings = field(default_factory=PairSettings)
    # the TOML file this came from, for reloads; not a setting
    source: str | None = field(default=None, compare=False)

    @property
    def listeners(self) -> tuple[ListenerSettings, ...]:
        """Every public listener, the first one built from `listen`/`mode`/`accept_proxy`."""
        first = ListenerSettings(self.listen, self.mode, self.accept_proxy, self.http2)
        return (first, *self.more_listeners)

    def backend_proxy(self, spec: BackendSpec) -> str | None:
        """The PROXY protocol version sent to this backend, or None."""
        return spec.proxy_protocol or self.proxy_protocol


# the TOML tables: the fields whose default is a settings dataclass
SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(Config)
    if f.default_factory is not MISSING and is_dataclass(f.default_factory)
}


def _leaf(key: str) -> Any:
    """The dataclass field for a dotted key such as "outlier.max_ejection"."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS[section] if section else Config
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(key)


def is_live(key: str) -> bool:
    """Whether a reload applies `key` to the running process."""
    return bool(_leaf(key).metadata.get("live", False))


def flag_of(key: str) -> str | None:
    flag: str | None = _leaf(key).metadata.get("flag")
    return flag


def leaves(cfg: Config) -> dict[str, Any]:
    """Every setting by dotted key ("listen", "timeouts.connect", ...), `source` excluded."""
    out: dict[str, Any] = {}
    for f in fields(Config):
        if f.name == "source":
            continue
        value = getattr(cfg, f.name)
        if f.name in SECTIONS:
            for sub in fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[f.name] = value
    return out
