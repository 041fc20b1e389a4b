"""Pure parts of bench/failover.py: keepalived config, probe-log parsing, timings, table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is not an installed package; make the repo root importable for pytest's runner.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.failover_core import (
    KeepalivedNode,
    Probe,
    Row,
    extract_failover,
    first_answer_from,
    keepalived_master_down,
    keepalived_version_for,
    parse_probe_line,
    parse_probe_log,
    render_keepalived,
    steady,
    table,
)


def node(**kw: object) -> KeepalivedNode:
    base: dict[str, object] = {
        "name": "lbfo_a",
        "interface": "eth0",
        "address": "10.213.0.1",
        "peer": "10.213.0.2",
        "priority": 150,
        "vip": "10.213.0.100/24",
        "advert_interval": 1.0,
    }
    base.update(kw)
    return KeepalivedNode(**base)  # type: ignore[arg-type]


# ----- keepalived config ---------------------------------------------------------------------


def test_render_keepalived_unicast_instance() -> None:
    conf = render_keepalived(node())
    assert "router_id lbfo_a" in conf
    assert "vrrp_version 2" in conf
    assert "state BACKUP" in conf
    assert "interface eth0" in conf
    assert "priority 150" in conf
    assert "advert_int 1\n" in conf
    assert "unicast_src_ip 10.213.0.1" in conf
    assert "unicast_peer {\n        10.213.0.2\n    }" in conf
    assert "10.213.0.100/24 dev eth0" in conf
    assert conf.count("{") == conf.count("}")


def test_render_keepalived_subsecond_needs_vrrp3() -> None:
    conf = render_keepalived(node(advert_interval=0.2))
    assert "vrrp_version 3" in conf
    assert "advert_int 0.2\n" in conf


@pytest.mark.parametrize(
    ("interval", "version"), [(1.0, 2), (2.0, 2), (0.2, 3), (1.5, 3), (0.01, 3)]
)
def test_vrrp_version_for_interval(interval: float, version: int) -> None:
    assert keepalived_version_for(interval) == version


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"priority": 0}, "priority"),
        ({"priority": 255}, "priority"),
        ({"vrid": 0}, "virtual router id"),
        ({"advert_interval": 0.001}, "advert interval"),
        ({"advert_interval": 0.125}, "advert interval"),
        ({"advert_interval": 41.0}, "advert interval"),
        ({"vip": "10.213.0.300/24"}, "invalid address"),
        ({"peer": "not-an-ip"}, "invalid address"),
    ],
)
def test_render_keepalived_refuses_bad_settings(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_keepalived(node(**change))


def test_keepalived_master_down() -> None:
    # v2: skew in whole seconds; v3: skew scaled by the interval
    assert keepalived_master_down(1.0, 100) == pytest.approx(3 + 156 / 256)
    assert keepalived_master_down(0.2, 100) == pytest.approx(0.6 + 156 / 256 * 0.2)


# ----- probe log -------------------------------------------------------------------------------


def test_probe_line_round_trip() -> None:
    p = Probe(12.5, 12.503, 200, "via-a")
    assert parse_probe_line(p.line()) == Probe(12.5, 12.503, 200, "via-a")
    assert p.ok
    assert not Probe(1, 2, 0, "timeout").ok


@pytest.mark.parametrize(
    "line",
    [
        "",
        "# comment 1 2 3",
        "1.0 2.0 200",
        "1.0 2.0 200 a extra",
        "x 2.0 200 a",
        "1.0 2.0 OK a",
        "2.0 1.0 200 a",  # ends before it starts
        "nan 1.0 200 a",
        "1.0 2.0 -1 a",
    ],
)
def test_malformed_probe_lines_are_skipped(line: str) -> None:
    assert parse_probe_line(line) is None


def test_parse_probe_log_sorts_by_start_and_skips_junk() -> None:
    # concurrent probes finish out of order; a killed prober may leave a torn last line
    text = "2.0 2.1 200 a\n1.0 1.5 0 timeout\n\n3.0 3.01 200 b\n4.0 4.0"
    probes = parse_probe_log(text)
    assert [p.start for p in probes] == [1.0, 2.0, 3.0]


# ----- timing extraction -----------------------------------------------------------------------


def _log(*rows: tuple[float, float, int, str]) -> list[Probe]:
    return [Probe(*r) for r in rows]


def test_extract_failover_from_first_new_answer() -> None:
    probes = _log(
        (9.90, 9.91, 200, "a"),
        (9.99, 10.00, 200, "a"),
        (10.01, 10.51, 0, "timeout"),
        (10.02, 10.52, 0, "timeout"),
        (10.40, 10.90, 0, "timeout"),
        (10.70, 10.71, 200, "b"),
        (10.60, 10.75, 200, "b"),  # started earlier, answered later: not the first answer
        (10.80, 10.81, 200, "b"),
    )
    result = extract_failover(probes, event_at=10.0, old="a", new="b")
    assert result.failover_s == pytest.approx(0.71)
    assert result.last_old_s == pytest.approx(0.0)
    assert result.failed_probes == 3


def test_extract_failover_ignores_new_answers_before_the_event() -> None:
    probes = _log((5.0, 5.01, 200, "b"), (10.3, 10.31, 200, "b"))
    assert extract_failover(probes, 10.0, "a", "b").failover_s == pytest.approx(0.31)


def test_extract_failover_without_old_answers() -> None:
    result = extract_failover(_log((10.1, 10.2, 200, "b")), 10.0, "a", "b")
    assert result.last_old_s is None


def test_extract_failover_needs_an_answer_from_the_new_node() -> None:
    probes = _log((10.1, 10.2, 200, "a"), (10.3, 10.8, 0, "timeout"), (10.4, 10.41, 503, "b"))
    with pytest.raises(ValueError, match="no answer from 'b'"):
        extract_failover(probes, 10.0, "a", "b")
    assert first_answer_from(probes, "b", 10.0) is None


def test_steady_needs_enough_probes_all_from_one_node() -> None:
    probes = _log(*[(1.0 + i / 100, 1.001 + i / 100, 200, "a") for i in range(30)])
    assert steady(probes, "a", since=1.0, min_count=20)
    assert not steady(probes, "a", since=1.0, min_count=31)
    assert not steady(probes, "b", since=1.0, min_count=1)
    mixed = [*probes, Probe(1.2, 1.7, 0, "timeout")]
    assert not steady(mixed, "a", since=1.0, min_count=20)
    assert not steady(mixed, "a", since=1.0, min_count=5)


# ----- results ---------------------------------------------------------------------------------


def test_row_median_and_dict() -> None:
    row = Row("keepalived", 1.0, "kill", (3.2, 3.5, 3.3))
    assert row.failover_s == pytest.approx(3.3)
    d = row.as_dict()
    assert d == {
        "system": "keepalived",
        "advert_interval": 1.0,
        "event": "kill",
        "failover_s": 3.3,
        "samples": [3.2, 3.5, 3.3],
    }
    empty = Row("balancer", 0.2, "stop", (), note="failed")
    assert empty.failover_s is None
    assert empty.as_dict()["note"] == "failed"


def test_table_lists_every_row() -> None:
    text = table([Row("keepalived", 1.0, "kill", (3.3,)), Row("balancer", 0.2, "stop", ())])
    lines = text.splitlines()
    assert lines[0].split() == ["system", "advert_s", "event", "median_s", "samples"]
    assert lines[2].split() == ["keepalived", "1", "kill", "3.300", "3.300"]
    assert lines[3].split() == ["balancer", "0.2", "stop", "-", "-"]


# ----- the prober against a local server ------------------------------------------------------


async def test_probe_once_reads_status_and_backend(tmp_path: Path) -> None:
    import asyncio

    from bench.failover_probe import probe_once, run

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Backend: via-b\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe_once("127.0.0.1", port, 2.0) == (200, "via-b")
        out = tmp_path / "probes.log"
        with out.open("w") as f:
            await run("127.0.0.1", port, 0.02, 1.0, 0.2, f)
        probes = parse_probe_log(out.read_text())
        assert 3 <= len(probes) <= 15
        assert all(p.ok and p.backend == "via-b" for p in probes)
    finally:
        server.close()
        await server.wait_closed()
    assert await probe_once("127.0.0.1", port, 2.0) == (0, "refused")
