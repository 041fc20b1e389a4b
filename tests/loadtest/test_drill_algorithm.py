"""`drill --algorithm` on the docker target: both balancers switched for the drill, then
back; without it the report names the algorithm they run (fake admin APIs on loopback)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtest.drill import build_parser
from loadtest.targets import DockerTarget, DrillError

TOKEN = "t0ken"


class FakeAdmin(ThreadingHTTPServer):
    algorithm = "round-robin"
    puts: list[str]


class Handler(BaseHTTPRequestHandler):
    server: FakeAdmin

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, {"algorithm": self.server.algorithm, "role": "active"})

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"error": "admin token required"})
            return
        self.server.algorithm = body["algorithm"]
        self.server.puts.append(body["algorithm"])
        self._answer(200, {"algorithm": body["algorithm"]})


@pytest.fixture
def admins() -> Iterator[list[FakeAdmin]]:
    servers = []
    for _ in range(2):
        srv = FakeAdmin(("127.0.0.1", 0), Handler)
        srv.puts = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _target(admins: list[FakeAdmin], algorithm: str | None, token: str) -> DockerTarget:
    urls = {
        f"balancer-{c}": f"http://127.0.0.1:{s.server_address[1]}"
        for c, s in zip("ab", admins, strict=True)
    }
    target = DockerTarget(admin_urls=urls, algorithm=algorithm)
    target._token = token  # setup() reads it from the CA volume; no Docker here
    return target


def test_both_balancers_switch_for_the_drill_and_back(admins: list[FakeAdmin]) -> None:
    target = _target(admins, "least-connections", TOKEN)
    target.prepare()
    assert [s.algorithm for s in admins] == ["least-connections"] * 2
    target.teardown()
    assert [s.algorithm for s in admins] == ["round-robin"] * 2
    assert [s.puts for s in admins] == [["least-connections", "round-robin"]] * 2
    assert target.algorithm == "least-connections"  # what the report says


def test_without_algorithm_nothing_changes_and_the_report_names_theirs(
    admins: list[FakeAdmin],
) -> None:
    admins[0].algorithm = admins[1].algorithm = "source-hash"
    target = _target(admins, None, "")
    target.prepare()
    target.teardown()
    assert target.algorithm == "source-hash"
    assert [s.puts for s in admins] == [[], []]


def test_a_refused_switch_is_a_one_line_drill_error(admins: list[FakeAdmin]) -> None:
    target = _target(admins, "least-connections", "wrong")
    with pytest.raises(DrillError, match=r"HTTP 401 .*admin token required"):
        target.prepare()
    assert [s.algorithm for s in admins] == ["round-robin"] * 2


def test_an_unknown_algorithm_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["delay-backend", "--algorithm", "fastest", "--json", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
