"""wrk command line and output parsing (pure: no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# wrk prints durations with these suffixes (see wrk's units.c).
_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}

_VALUE_RE = r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)"
_PCT_RE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+" + _VALUE_RE + r"\s*$", re.MULTILINE)
_REQS_RE = re.compile(r"^\s*([0-9]+) requests in " + _VALUE_RE, re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9]+(?:\.[0-9]+)?)\s*$", re.MULTILINE)
_SOCK_RE = re.compile(
    r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)"
)
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")


class WrkParseError(ValueError):
    """wrk output did not contain the summary we need."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx_3xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx_3xx


def duration_to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Parse `wrk --latency` stdout into a WrkResult."""
    reqs = _REQS_RE.search(output)
    if reqs is None:
        raise WrkParseError("no 'N requests in T' line in wrk output")
    requests = int(reqs.group(1))
    duration_s = duration_to_ms(reqs.group(2), reqs.group(3)) / 1000.0

    pcts = {m.group(1): duration_to_ms(m.group(2), m.group(3)) for m in _PCT_RE.finditer(output)}
    if "50" not in pcts or "99" not in pcts:
        raise WrkParseError("no latency distribution in wrk output (was --latency passed?)")

    rps_m = _RPS_RE.search(output)
    if rps_m is not None:
        rps = float(rps_m.group(1))
    elif duration_s > 0:
        rps = requests / duration_s
    else:
        raise WrkParseError("no Requests/sec line and zero duration in wrk output")

    sock = _SOCK_RE.search(output)
    socket_errors = sum(int(g) for g in sock.groups()) if sock else 0
    non = _NON2XX_RE.search(output)
    non_2xx_3xx = int(non.group(1)) if non else 0

    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        rps=rps,
        p50_ms=pcts["50"],
        p99_ms=pcts["99"],
        socket_errors=socket_errors,
        non_2xx_3xx=non_2xx_3xx,
    )


def wrk_command(
    url: str,
    *,
    duration_s: int,
    connections: int,
    threads: int = 1,
    close_connections: bool = False,
    cpu: str | None = "0",
) -> list[str]:
    """Build the wrk argv, optionally pinned with taskset."""
    cmd: list[str] = []
    if cpu is not None:
        cmd += ["taskset", "-c", cpu]
    cmd += ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    if close_connections:
        # One request per connection: with TLS this measures full handshakes.
        cmd += ["-H", "Connection: close"]
    cmd.append(url)
    return cmd
