"""Light tests of the bench helpers: wrk parsing, CPU accounting, reporting, configs, CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# bench/ is not an installed package; make the repo root importable for pytest's runner.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import configs, cpu, handshake_load, report, run, wrk

WRK_NON2XX = """\
Running 1s test @ http://127.0.0.1:18090/x
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   554.44us    1.34ms  15.76ms   91.49%
    Req/Sec    18.31k     5.94k   26.21k    60.00%
  Latency Distribution
     50%  124.00us
     75%  224.00us
     90%    1.51ms
     99%    7.22ms
  18297 requests in 1.01s, 1.45MB read
  Non-2xx or 3xx responses: 18297
Requests/sec:  18067.24
Transfer/sec:      1.43MB
"""

WRK_SOCKET_ERRORS = """\
Running 10s test @ https://127.0.0.1:4443/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.17ms   10.01ms 106.38ms   80.00%
    Req/Sec   295.00     40.00   400.00     70.00%
  Latency Distribution
     50%   15.17ms
     75%   20.00ms
     90%   40.00ms
     99%    1.06s
  2950 requests in 1.00m, 300.00KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
Requests/sec:    294.51
Transfer/sec:     29.95KB
"""


def test_parse_wrk_latency_units_and_non_2xx() -> None:
    r = wrk.parse_wrk(WRK_NON2XX)
    assert r.requests == 18297
    assert r.duration_s == pytest.approx(1.01)
    assert r.rps == pytest.approx(18067.24)
    assert r.p50_ms == pytest.approx(0.124)
    assert r.p99_ms == pytest.approx(7.22)
    assert (r.socket_errors, r.non_2xx_3xx, r.errors) == (0, 18297, 18297)


def test_parse_wrk_socket_errors_seconds_and_minutes() -> None:
    r = wrk.parse_wrk(WRK_SOCKET_ERRORS)
    assert r.p99_ms == pytest.approx(1060.0)
    assert r.duration_s == pytest.approx(60.0)
    assert r.socket_errors == 10
    assert r.errors == 10


def test_parse_wrk_computes_rps_when_line_missing() -> None:
    text = WRK_NON2XX.replace("Requests/sec:  18067.24\n", "")
    assert wrk.parse_wrk(text).rps == pytest.approx(18297 / 1.01)


@pytest.mark.parametrize(
    "text",
    ["", "unable to connect to 127.0.0.1:1 Connection refused", WRK_NON2XX.split("  Latency D")[0]],
)
def test_parse_wrk_rejects_incomplete_output(text: str) -> None:
    with pytest.raises(wrk.WrkParseError):
        wrk.parse_wrk(text)


def test_wrk_command_pins_and_closes() -> None:
    cmd = wrk.wrk_command("https://x/", duration_s=5, connections=32, close_connections=True)
    assert cmd[:3] == ["taskset", "-c", "0"]
    assert cmd[3:] == [
        "wrk",
        "-t1",
        "-c32",
        "-d5s",
        "--latency",
        "-H",
        "Connection: close",
        "https://x/",
    ]
    assert wrk.wrk_command("u", duration_s=1, connections=1, cpu=None)[0] == "wrk"


STAT_LINE = (
    "4242 (my (odd) proc) S 4000 4242 4242 0 -1 4194560 1000 0 0 0 "
    "250 75 7 3 20 0 4 0 12345 1000000 500 18446744073709551615"
)


def test_parse_proc_stat_handles_parens_and_spaces_in_comm() -> None:
    s = cpu.parse_proc_stat(STAT_LINE)
    assert (s.pid, s.ppid, s.utime_ticks, s.stime_ticks, s.ticks) == (4242, 4000, 250, 75, 325)


@pytest.mark.parametrize("line", ["", "12 no-parens S 1", "12 (x) S 1 2 3"])
def test_parse_proc_stat_rejects_malformed(line: str) -> None:
    with pytest.raises(ValueError):
        cpu.parse_proc_stat(line)


def test_tree_ticks_sums_live_descendants_only() -> None:
    stats = [
        cpu.ProcStat(pid=10, ppid=1, utime_ticks=100, stime_ticks=20),  # the proxy
        cpu.ProcStat(pid=11, ppid=10, utime_ticks=5, stime_ticks=5),  # its worker
        cpu.ProcStat(pid=12, ppid=11, utime_ticks=1, stime_ticks=0),  # worker's child
        cpu.ProcStat(pid=20, ppid=1, utime_ticks=999, stime_ticks=999),  # unrelated
    ]
    assert cpu.descendants(10, {s.pid: s.ppid for s in stats}) == {11, 12}
    assert cpu.tree_ticks(10, stats) == 131
    with pytest.raises(ProcessLookupError):
        cpu.tree_ticks(99, stats)


def test_cpu_us_per_req_math() -> None:
    # 250 ticks at 100 Hz = 2.5 CPU seconds over 50,000 requests = 50 us each.
    assert cpu.cpu_us_per_req(1000, 1250, 50_000, clk_tck=100) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        cpu.cpu_us_per_req(0, 10, 0, clk_tck=100)
    with pytest.raises(ValueError):
        cpu.cpu_us_per_req(10, 5, 100, clk_tck=100)


def test_read_tree_ticks_of_this_process() -> None:
    assert cpu.read_tree_ticks(os.getpid()) >= 0


def _rows() -> list[report.Row]:
    return [
        report.Row("balancer", "http-keepalive", 9000.0, 60.0, 5.0, 20.0, 0, 90000),
        report.Row("haproxy", "http-keepalive", 20000.0, 20.0, 2.0, 8.0, 0, 200000),
        report.Row.failed("balancer", "https-keepalive", "balancer exited with code 2: no TLS"),
        report.Row("haproxy", "https-keepalive", 18000.0, 25.0, 2.5, 9.0, 1, 180000),
    ]


def test_cpu_ratio_per_mode() -> None:
    ratios = report.cpu_ratio(_rows(), "balancer", "haproxy")
    assert ratios == {"http-keepalive": 3.0, "https-keepalive": None}


def test_format_table_shows_values_and_errors() -> None:
    table = report.format_table(_rows()).splitlines()
    assert table[0].split() == [
        "proxy",
        "mode",
        "rps",
        "cpu_us/req",
        "p50_ms",
        "p99_ms",
        "errors",
        "note",
    ]
    assert table[1].split() == [
        "balancer",
        "http-keepalive",
        "9000",
        "60.0",
        "5.000",
        "20.000",
        "0",
    ]
    assert "ERROR: balancer exited with code 2: no TLS" in table[3]


def test_build_document_shape() -> None:
    doc = report.build_document(_rows(), {"duration_s": 10}, {"r": {"m": 1.0}})
    assert doc["meta"] == {"duration_s": 10}
    assert set(doc["rows"][0]) == {
        "proxy",
        "mode",
        "rps",
        "cpu_us_per_req",
        "p50_ms",
        "p99_ms",
        "errors",
        "requests",
        "status",
        "reason",
        "cpu_samples",
        "steal_pct",
        "worker_spread_pct",
    }
    assert doc["rows"][2]["status"] == "error"


def test_haproxy_config_plain_and_tls(tmp_path: Path) -> None:
    plain = configs.haproxy_config(8080, [9001, 9002])
    assert "bind 127.0.0.1:8080\n" in plain
    assert "nbthread 1" in plain and "http-reuse always" in plain and "balance roundrobin" in plain
    assert "server b0 127.0.0.1:9001" in plain and "server b1 127.0.0.1:9002" in plain
    assert "log " not in plain
    tls = configs.haproxy_config(8443, [9001], tmp_path / "c.pem")
    assert f"bind 127.0.0.1:8443 ssl crt {tmp_path / 'c.pem'} alpn http/1.1" in tls


def test_haproxy_and_balancer_in_tcp_mode(tmp_path: Path) -> None:
    tcp = configs.haproxy_config(8080, [9001, 9002], tcp=True)
    assert "mode tcp" in tcp and "mode http" not in tcp and "http-reuse" not in tcp
    assert "server b1 127.0.0.1:9002" in tcp and "balance roundrobin" in tcp
    argv = run.proxy_argv("balancer", 8080, [9001], None, tmp_path, tcp=True)
    assert argv[argv.index("--mode") + 1] == "tcp"
    assert "--mode" not in run.proxy_argv("balancer", 8080, [9001], None, tmp_path)
    assert run.MODES["tcp-keepalive"].tcp and "tcp-keepalive" in run.DEFAULT_MODES


def test_nginx_config_keeps_state_in_workdir(tmp_path: Path) -> None:
    text = configs.nginx_config(tmp_path, [9001, 9002, 9003])
    assert text.count('return 200 "ok\\n";') == 3
    assert "daemon off;" in text and "master_process off;" in text
    assert f"pid {tmp_path}/nginx.pid;" in text
    assert "access_log off;" in text and "keepalive_requests 100000;" in text


def test_cli_defaults_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    args = run.parse_args([])
    assert args.duration == 10 and args.connections == 64
    assert args.modes == [
        "http-keepalive",
        "https-keepalive",
        "https-handshakes",
        "tcp-keepalive",
        "h2-tls",
    ]
    assert args.proxies == ["balancer", "balancer-w2", "haproxy", "naive-aiohttp"]
    assert run.parse_args(["--proxies", "haproxy,haproxy"]).proxies == ["haproxy"]
    for bad in (["--modes", "h3"], ["--duration", "0"], ["--proxies", ""]):
        with pytest.raises(SystemExit) as exc:
            run.parse_args(bad)
        assert exc.value.code == 2
    assert "unknown mode h3" in capsys.readouterr().err


def test_percentile_nearest_rank() -> None:
    from harness.traffic import percentile

    values = [float(v) for v in range(100, 0, -1)]  # any order
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize(
    ("head", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", True),
        (b"HTTP/1.0 302 Found\r\n\r\n", True),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", False),
        (b"garbage", False),
        (b"", False),
    ],
)
def test_status_ok_matches_wrk_rule(head: bytes, ok: bool) -> None:
    assert handshake_load.status_ok(head) is ok


def test_handshake_summary_round_trips_to_result() -> None:
    tally = handshake_load.Tally(latencies_ms=[4.0, 1.0, 2.0, 3.0], socket_errors=2, non_2xx_3xx=1)
    summary = tally.summary(duration_s=2.0)
    assert summary["requests"] == 4 and summary["rps"] == 2.0
    result = handshake_load.parse_summary("noise\n" + json.dumps(summary) + "\n")
    assert (result.requests, result.p50_ms, result.p99_ms, result.errors) == (4, 2.0, 4.0, 3)


@pytest.mark.parametrize("text", ["", "not json", json.dumps({"requests": 0, "p50_ms": None})])
def test_handshake_summary_rejects_empty_runs(text: str) -> None:
    with pytest.raises(ValueError):
        handshake_load.parse_summary(text)


def test_modes_name_their_load_generator() -> None:
    assert run.MODES["https-handshakes"].loadgen == "handshake"
    assert run.MODES["https-resumptions"].close and run.MODES["https-resumptions"].loadgen == "wrk"
    assert run.parse_args(["--modes", "https-resumptions"]).modes == ["https-resumptions"]


def test_median_rows_takes_the_median_of_rounds_and_keeps_the_samples() -> None:
    from bench.report import Row, median_rows

    samples = [
        Row("balancer", "http", rps=100, cpu_us_per_req=90.0, errors=0, requests=10),
        Row("haproxy", "http", rps=300, cpu_us_per_req=30.0, errors=0, requests=30),
        Row("balancer", "http", rps=120, cpu_us_per_req=60.0, errors=1, requests=12),
        Row("haproxy", "http", rps=310, cpu_us_per_req=33.0, errors=0, requests=31),
        Row("balancer", "http", rps=110, cpu_us_per_req=70.0, errors=0, requests=11),
        Row.failed("haproxy", "http", "crashed"),
    ]
    rows = {r.proxy: r for r in median_rows(samples)}
    assert rows["balancer"].cpu_us_per_req == 70.0
    assert rows["balancer"].cpu_samples == (90.0, 60.0, 70.0)
    assert rows["balancer"].errors == 1 and rows["balancer"].requests == 33
    assert rows["haproxy"].cpu_us_per_req == 31.5  # even count: mean of the middle two
    assert rows["haproxy"].status == "ok"


def test_median_rows_reports_an_error_when_every_round_failed() -> None:
    from bench.report import Row, median_rows

    rows = median_rows(
        [Row.failed("balancer", "https", "no cert"), Row.failed("balancer", "https", "no cert")]
    )
    assert len(rows) == 1 and rows[0].status == "error" and rows[0].reason == "no cert"


PROC_STAT = """cpu  4705 150 1120 16250 520 0 25 900 0 0
cpu0 2350 75 560 8125 260 0 12 450 0 0
intr 1 2 3
"""


def test_system_ticks_and_steal_share() -> None:
    from bench import cpu

    before = cpu.parse_system_ticks(PROC_STAT)
    assert before == cpu.SystemTicks(steal=900, total=4705 + 150 + 1120 + 16250 + 520 + 25 + 900)
    after = cpu.SystemTicks(steal=before.steal + 50, total=before.total + 1000)
    assert cpu.steal_percent(before, after) == 5.0
    assert cpu.steal_percent(after, after) == 0.0  # an empty window is no steal, not a crash
    with pytest.raises(ValueError, match="no cpu line"):
        cpu.parse_system_ticks("intr 1 2 3\n")
    with pytest.raises(ValueError, match="no steal"):
        cpu.parse_system_ticks("cpu  1 2 3 4\n")
    assert cpu.read_system_ticks().total > 0  # this machine's /proc/stat parses


def test_rounds_under_host_contention_are_flagged() -> None:
    from bench.report import Row, describe_sample, format_table, median_rows

    samples = [
        Row("balancer", "http", rps=100, cpu_us_per_req=50.0, errors=0, requests=10, steal_pct=1),
        Row("balancer", "http", rps=90, cpu_us_per_req=60.0, errors=0, requests=9, steal_pct=19),
        Row("balancer", "http", rps=95, cpu_us_per_req=55.0, errors=0, requests=9, steal_pct=9),
        Row("haproxy", "http", rps=300, cpu_us_per_req=25.0, errors=0, requests=30, steal_pct=0.5),
    ]
    rows = {r.proxy: r for r in median_rows(samples)}
    assert rows["balancer"].steal_pct == 9 and rows["haproxy"].steal_pct == 0.5
    table = format_table(list(rows.values()))
    balancer_line, haproxy_line = table.splitlines()[1:]
    assert "host stole 9% of CPU time" in balancer_line
    assert "stole" not in haproxy_line
    assert describe_sample(samples[1]) == "90 req/s, 60.0 us/req, steal 19.0%"


def test_spread_is_the_farthest_worker_from_an_even_share() -> None:
    assert report.spread_pct([50, 50]) == 0.0
    assert report.spread_pct([60, 40]) == 20.0
    assert report.spread_pct([10, 10, 40]) == 100.0
    assert report.spread_pct([]) is None
    assert report.spread_pct([0, 0]) is None
