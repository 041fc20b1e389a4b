"""h2load's summary as the bench reads it (its real output, as printed by nghttp2 1.52)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

# bench/ is not an installed package; make the repo root importable for pytest's runner.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.h2load import STREAMS, h2load_command, parse_h2load
from bench.wrk import WrkParseError

OUTPUT = """starting benchmark...
spawning thread #0: 2 total client(s). 300 total requests
Application protocol: h2

finished in 111.19ms, 2698.08 req/s, 102.85KB/s
requests: 300 total, 300 started, 298 done, 297 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 296 2xx, 0 3xx, 1 4xx, 0 5xx
traffic: 11.44KB (11710) total, 1.92KB (1964) headers (space savings 95.29%), 4.10KB (4200) data
                     min         max         mean         sd        +/- sd
time for request:      772us     16.57ms      6.88ms      3.30ms    66.67%
time for connect:      236us       531us       383us       208us   100.00%
"""


def test_the_summary_is_read() -> None:
    r = parse_h2load(OUTPUT)
    assert r.requests == 298 and r.rps == 2698.08
    assert r.duration_s == pytest.approx(0.11119)
    assert r.socket_errors == 3 and r.non_2xx_3xx == 1 and r.errors == 4
    assert r.p50_ms == 6.88 and math.isnan(r.p99_ms)  # a mean, and no percentile


def test_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(WrkParseError):
        parse_h2load("h2load: connect failed\n")


def test_the_command_sends_ten_streams_per_connection() -> None:
    cmd = h2load_command("https://127.0.0.1:1/", duration_s=5, connections=64, cpu="0")
    assert cmd[:3] == ["taskset", "-c", "0"] and f"-m{STREAMS}" in cmd and STREAMS == 10
    assert "-c64" in cmd and "-D5" in cmd and cmd[-1] == "https://127.0.0.1:1/"
