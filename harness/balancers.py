"""`python -m balancer` child processes: one standalone balancer or one node of a pair."""

from __future__ import annotations

import re
import ssl
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.http import IO_TIMEOUT, Answer, probe, request
from harness.procs import HOST, Child, listener_problem

START_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"^balancer: listening on (https?|tcp)://(\S+):(\d+)$", re.MULTILINE)
_ADMIN = re.compile(r"^balancer: admin on (http\S+)$", re.MULTILINE)


class BalancerProc(Child):
    """`python -m balancer ARGS`; `port`, `url` and `admin_url` are known once it is ready.

    Ready means: it printed "listening on" (unless `listens` is False: a passive pair node
    does not bind the service) and, with an admin API, "admin on" and /api/state answers;
    and every socket listening on those ports is its own.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log: Path,
        *,
        admin: bool | None = None,
        listens: bool = True,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(name, [sys.executable, "-m", "balancer", *args], log)
        self.args = list(args)
        self.has_admin = "--admin" in self.args if admin is None else admin
        self.listens = listens
        self.start_timeout = start_timeout
        self.scheme = "http"
        self.host = HOST
        self.port = 0
        self.admin_url = ""

    # life cycle -----------------------------------------------------------------------------
    def start(self) -> BalancerProc:
        """Start (again, after a stop) and wait until ready."""
        self.start_nowait()
        self.wait_until_ready()
        return self

    def start_nowait(self) -> BalancerProc:
        """Start without waiting (a drill measures how long the restart takes to show)."""
        self._pin_ports()
        super().start()
        return self

    def _pin_ports(self) -> None:
        # a restart comes back on the ports it had: clients and drills keep their URLs
        for flag, host, port in (
            ("--listen", self.host, self.port),
            ("--admin", self.admin_host, self.admin_port if self.admin_url else 0),
        ):
            if port and flag in self.argv:
                i = self.argv.index(flag) + 1
                if self.argv[i].endswith(":0"):
                    self.argv[i] = f"{host}:{port}"

    def wait_until_ready(self) -> None:
        """Raise StartError (with the log) unless it is ready within `start_timeout`."""
        self.wait_ready(self._ready, self.start_timeout)

    def _ready(self) -> str | None:
        out = self.output()
        if self.listens:
            m = _LISTENING.search(out)
            if m is None:
                return "no 'listening on' line yet"
            self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
            problem = listener_problem(self, self.port)
            if problem is not None:
                return problem
        if self.has_admin:
            a = _ADMIN.search(out)
            if a is None:
                return "no 'admin on' line yet"
            self.admin_url = a.group(1)
            problem = probe(self.admin_host, self.admin_port, "/api/state")
            if problem is None:
                problem = listener_problem(self, self.admin_port)
            if problem is not None:
                return problem
        return None

    # addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def admin_host(self) -> str:
        return urllib.parse.urlsplit(self.admin_url).hostname or HOST

    @property
    def admin_port(self) -> int:
        return urllib.parse.urlsplit(self.admin_url).port or 0

    # the admin API --------------------------------------------------------------------------
    def admin(
        self, path: str, method: str = "GET", body: bytes | None = None, token: str | None = None
    ) -> Answer:
        if not self.admin_url:
            raise RuntimeError(f"{self.name} has no admin API")
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if body is None and method != "GET":
            body = b""
        return request(
            self.admin_host,
            self.admin_port,
            path,
            method=method,
            body=body,
            headers=headers,
            timeout=IO_TIMEOUT,
        )

    def state(self) -> dict[str, Any]:
        ans = self.admin("/api/state")
        if ans.status != 200:
            raise RuntimeError(f"{self.name}: /api/state answered HTTP {ans.status}")
        data: dict[str, Any] = ans.json()
        return data

    def backends(self) -> dict[str, dict[str, Any]]:
        return {b["address"]: b for b in self.state()["backends"]}

    def event_kinds(self) -> list[str]:
        return [e["kind"] for e in self.state()["events"]]

    def role(self) -> str | None:
        """The pair role, or None while the admin API does not answer."""
        try:
            return str(self.state()["role"])
        except (OSError, RuntimeError, ValueError):
            return None

    def post_reload(self) -> tuple[int, dict[str, Any]]:
        ans = self.admin("/api/reload", "POST")
        data: dict[str, Any] = ans.json()
        return ans.status, data

    def get(
        self, path: str = "/", ctx: ssl.SSLContext | None = None, timeout: float = IO_TIMEOUT
    ) -> Answer:
        """One request to the service on a fresh connection."""
        return request(self.host, self.port, path, ctx=ctx, timeout=timeout)


def pair_args(
    *,
    election: int,
    peer: int,
    priority: int,
    secret_file: Path,
    host: str = HOST,
    advert_interval: float | None = None,
) -> list[str]:
    """The flags that make a balancer one node of a local-mode pair."""
    args = ["--bind-election", f"{host}:{election}", "--peer", f"{host}:{peer}"]
    args += ["--priority", str(priority), "--secret-file", str(secret_file)]
    if advert_interval is not None:
        args += ["--advert-interval", str(advert_interval)]
    return args
