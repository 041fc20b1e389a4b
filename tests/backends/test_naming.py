"""`python -m backends.naming`: the DNS PTR query and answer, against a loopback server."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import naming


def _answer(query: bytes, name: str | None, rcode: int = 0) -> bytes:
    """A response echoing `query`'s question, with one compressed PTR answer or none."""
    ident = struct.unpack("!H", query[:2])[0]
    question = query[12:]
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, 1 if name else 0, 0, 0)
    if not name:
        return header + question
    rdata = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    # the owner is a pointer to the question's name at offset 12
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 600, len(rdata)) + rdata
    return header + question + answer


@pytest.fixture
def dns_server() -> Iterator[tuple[int, list[bytes], dict[str, str | None]]]:
    """A one-thread UDP DNS server on 127.0.0.1: answers `reply['name']` to every query."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    queries: list[bytes] = []
    reply: dict[str, str | None] = {"name": None}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            queries.append(data)
            sock.sendto(_answer(data, reply["name"]), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], queries, reply
    stop.set()
    thread.join(2)
    sock.close()


def test_ptr_query_asks_for_the_reverse_pointer() -> None:
    q = naming.ptr_query("172.28.0.132", 0x1234)
    assert q[:4] == b"\x12\x34\x01\x00"  # id, recursion desired
    assert b"\x03132\x010\x0228\x03172\x07in-addr\x04arpa\x00\x00\x0c\x00\x01" in q


def test_parse_reads_a_compressed_ptr_answer() -> None:
    query = naming.ptr_query("172.28.0.132", 7)
    msg = _answer(query, "lbtestbed_backend_3.lbtestbed_lbnet")
    assert naming.parse_ptr_answer(msg, 7) == "lbtestbed_backend_3.lbtestbed_lbnet"


@pytest.mark.parametrize(
    "msg",
    [
        b"",
        b"\x00" * 11,
        _answer(naming.ptr_query("10.0.0.1", 7), None),  # no answer record
        _answer(naming.ptr_query("10.0.0.1", 7), None, rcode=3),  # NXDOMAIN
        _answer(naming.ptr_query("10.0.0.1", 8), "x.y"),  # another query's answer
        _answer(naming.ptr_query("10.0.0.1", 7), "x.y")[:-5],  # truncated
        # a pointer loop: the answer's owner points at itself
        _answer(naming.ptr_query("10.0.0.1", 7), None)[:6]
        + b"\x00\x01"
        + _answer(naming.ptr_query("10.0.0.1", 7), None)[8:]
        + b"\xc0\x2c",
    ],
)
def test_parse_refuses_what_is_no_answer(msg: bytes) -> None:
    assert naming.parse_ptr_answer(msg, 7) is None


def test_reverse_lookup_against_a_server(
    dns_server: tuple[int, list[bytes], dict[str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, queries, reply = dns_server
    reply["name"] = "lbtestbed-backend-4.lbtestbed_lbnet"
    assert naming.reverse_lookup("172.28.0.9", ["127.0.0.1"], port) == reply["name"]
    assert b"\x019\x010\x0228\x03172\x07in-addr" in queries[-1]
    monkeypatch.setattr(naming, "own_address", lambda: "172.28.0.9")
    monkeypatch.setattr(naming, "nameservers", lambda: ["127.0.0.1"])
    assert naming.compose_name("backend", "d6cda8979528", port) == "backend-4"
    reply["name"] = None  # no PTR record: the fallback
    assert naming.compose_name("backend", "d6cda8979528", port) == "d6cda8979528"


def test_nameservers_read_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# docker\nnameserver 127.0.0.11\noptions ndots:0\nnameserver ::1\n")
    assert naming.nameservers(str(conf)) == ["127.0.0.11", "::1"]
    assert naming.nameservers(str(tmp_path / "none")) == []


def test_cli_usage_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert naming.main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1
