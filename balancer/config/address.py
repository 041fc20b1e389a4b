"""HOST:PORT parsing, the one parser for every address setting."""

from __future__ import annotations

from balancer.config.schema import ConfigError


def split_hostport(value: str, what: str, *, wildcard: bool = True) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ConfigError naming `what` otherwise.

    An empty host means every interface (0.0.0.0) when `wildcard`, else it is refused
    (a peer must be somewhere).
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if not wildcard:
            raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
        host = "0.0.0.0"
    return host, int(port)
