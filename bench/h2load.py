"""h2load command line and output parsing for the h2-tls rows (pure: no I/O).

h2load prints min/max/mean/sd of request times, no percentiles: the rows carry the mean in
`p50_ms` and leave `p99_ms` empty rather than pass a maximum off as a percentile.
"""

from __future__ import annotations

import re

from bench.wrk import WrkParseError, WrkResult

STREAMS = 10  # concurrent streams per connection (the h2load setting)

_FINISHED_RE = re.compile(r"^finished in ([0-9.]+)(ms|s), ([0-9.]+) req/s", re.MULTILINE)
_REQUESTS_RE = re.compile(
    r"^requests: ([0-9]+) total, ([0-9]+) started, ([0-9]+) done, ([0-9]+) succeeded, "
    r"([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout",
    re.MULTILINE,
)
_STATUS_RE = re.compile(
    r"^status codes: ([0-9]+) 2xx, ([0-9]+) 3xx, ([0-9]+) 4xx, ([0-9]+) 5xx", re.M
)
_MEAN_RE = re.compile(r"^time for request:\s+\S+\s+\S+\s+([0-9.]+)(us|ms|s)\s", re.MULTILINE)
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def h2load_command(
    url: str, *, duration_s: int, connections: int, cpu: str | None = "0"
) -> list[str]:
    cmd: list[str] = ["taskset", "-c", cpu] if cpu is not None else []
    return cmd + [
        "h2load",
        "-t1",
        f"-c{connections}",
        f"-m{STREAMS}",
        f"-D{duration_s}",
        url,
    ]


def parse_h2load(output: str) -> WrkResult:
    """The summary of an h2load run, as the rows' common result."""
    fin = _FINISHED_RE.search(output)
    req = _REQUESTS_RE.search(output)
    if fin is None or req is None:
        raise WrkParseError("no 'finished in' / 'requests:' lines in h2load output")
    duration_s = float(fin.group(1)) * (0.001 if fin.group(2) == "ms" else 1.0)
    done = int(req.group(3))
    failed, errored, timeout = int(req.group(5)), int(req.group(6)), int(req.group(7))
    status = _STATUS_RE.search(output)
    non_2xx = sum(int(g) for g in status.groups()[1:]) if status else 0
    mean = _MEAN_RE.search(output)
    mean_ms = float(mean.group(1)) * _UNITS_MS[mean.group(2)] if mean else 0.0
    return WrkResult(
        requests=done,
        duration_s=duration_s,
        rps=float(fin.group(3)),
        p50_ms=mean_ms,
        p99_ms=float("nan"),
        socket_errors=failed + errored + timeout,
        non_2xx_3xx=non_2xx,
    )
