"""Locust traffic for lb-testbed, TLS verified against our CA.

    LB_CA_CERT=pki/ca.crt locust -f loadtest/locustfile.py --host https://127.0.0.1:8080

Without LB_CA_CERT an https host is verified against the system store only, where the
testbed's CA is not: it says so once, at the start, instead of failing every request with
nothing but CERTIFICATE_VERIFY_FAILED.

Scenarios (`--scenario`, also selectable in the web UI):
  steady     GET / and /echo
  slow       GET /delay?ms=50..500 (exercises least-connections)
  sticky     X-User header + cookie per user; counts users whose X-Backend changed.
             Needs source hashing (--algorithm source-hash --hash-key header:X-User): at
             the start it reads the balancer's /api/state (--admin-url, default http on
             port 9000 of the --host) and refuses to run against another algorithm
  bulk       GET /bytes?n=N and POST /upload of N/4 bytes (--bulk-bytes)
  handshake  `Connection: close` on every request: a new TCP+TLS handshake each time
  h2         HTTP/2: each user keeps one connection (ALPN h2 with an https host, h2c with
             prior knowledge with http) and sends --h2-streams GET / streams on it at once;
             reports how the streams of one connection spread over the backends
             ("h2" in --backends-out: streams, connections, backends per connection)

Load profiles: LB_SHAPE=step (LB_STEP_USERS users more every LB_STEP_SECONDS, LB_STEPS
times) or LB_SHAPE=spike (LB_BASE_USERS, LB_SPIKE_USERS for LB_SPIKE_SECONDS after
LB_SPIKE_AT, LB_SHAPE_SECONDS in all). Unset: the usual -u/-r/-t.

Per-backend counts (from X-Backend): the "Backends" tab and GET /backends in the web UI,
and `--backends-out FILE.json|FILE.csv` written when the test stops.

Headless thresholds: locust exits 1 when any request failed (`--exit-code-on-error N`
changes that code); on top of it `--max-error-rate R` (default 0.01) sets exit code 1 when
the failure ratio is above R, so CI can accept a few failures during a drill
(`--exit-code-on-error 0 --max-error-rate 0.05`).
"""

# mypy: disable-error-code="untyped-decorator,no-untyped-call"
# (locust's event hooks and shape API are untyped)

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from typing import Any

import gevent  # type: ignore[import-untyped]
import gevent.ssl  # type: ignore[import-untyped]
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.exception import StopUser
from locust.runners import WorkerRunner

BACKEND_HEADER = "X-Backend"
SCENARIOS = ("steady", "slow", "sticky", "bulk", "handshake", "h2")
log = logging.getLogger("lb-testbed")

# Per process; workers send deltas to the master (see report_to_master below).
backend_counts: Counter[str] = Counter()
sticky = {"violations": 0, "users": 0}
# h2 scenario: per connection, how many distinct backends its streams reached
h2_spread = {"batches": 0, "streams": 0, "backends_seen": 0}
_upload_cache: dict[int, bytes] = {}
_warned: set[str] = set()  # each warning once per process
_sticky_refused: list[str] = []  # why the sticky scenario cannot run (empty: it can)
ADMIN_PORT = 9000


def verified_ssl_context(*_args: Any, **_kwargs: Any) -> gevent.ssl.SSLContext:
    """Trust exactly our CA (LB_CA_CERT), hostname checked; ignores the bundle
    geventhttpclient offers as `cafile`. Without LB_CA_CERT: the system store, still verified."""
    return gevent.ssl.create_default_context(cafile=os.environ.get("LB_CA_CERT") or None)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--scenario", choices=SCENARIOS, default="steady", help="traffic mix")
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="exit code 1 when the failure ratio is above this (0..1)",
    )
    parser.add_argument("--bulk-bytes", type=int, default=1 << 20, help="bulk scenario size")
    parser.add_argument(
        "--h2-streams", type=int, default=10, help="h2 scenario: streams sent at once (10)"
    )
    parser.add_argument(
        "--backends-out", default="", help="write per-backend counts here (.json or .csv)"
    )
    parser.add_argument(
        "--admin-url",
        default="",
        help="balancer admin API the sticky scenario checks (default http://HOST:9000)",
    )


def _options(environment: Any) -> Any:
    return environment.parsed_options


# ---- checks at the start --------------------------------------------------------------------


def ca_warning(host: str | None, ca_cert: str | None) -> str | None:
    """Why every request to `host` will fail certificate verification, or None."""
    if not host or urllib.parse.urlsplit(host).scheme != "https":
        return None
    if not ca_cert:
        return (
            f"the host {host} is https and LB_CA_CERT is not set: certificates are checked "
            "against the system store only, so the testbed's (signed by its own CA) fail "
            "every request with CERTIFICATE_VERIFY_FAILED. Set LB_CA_CERT=pki/ca.crt "
            "(in compose: /certs/ca.crt)."
        )
    if not os.path.isfile(ca_cert):
        return f"LB_CA_CERT={ca_cert} is not a file: every https request will fail"
    return None


def _warn_once(message: str | None) -> None:
    if message and message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def admin_url_for(host: str | None, admin_url: str | None) -> str:
    """The balancer admin API: `--admin-url`, or plain http on port 9000 of the host."""
    if admin_url:
        return admin_url.rstrip("/")
    hostname = urllib.parse.urlsplit(host or "").hostname or "127.0.0.1"
    shown = f"[{hostname}]" if ":" in hostname else hostname
    return f"http://{shown}:{ADMIN_PORT}"


def sticky_problem(admin_url: str, timeout: float = 5.0) -> str | None:
    """Why the sticky scenario would measure nothing but the algorithm, or None."""
    url = f"{admin_url}/api/state"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            state = json.load(resp)
    except (OSError, ValueError) as exc:
        return (
            f"the sticky scenario needs the balancer's algorithm, but {url} did not answer "
            f"({exc}); pass --admin-url http://HOST:PORT"
        )
    algorithm = state.get("algorithm") if isinstance(state, dict) else None
    if algorithm != "source-hash":
        return (
            f"the sticky scenario needs source hashing, but the balancer at {admin_url} runs "
            f"{algorithm!r}: every change of backend would count as a violation. Run it with "
            "--algorithm source-hash --hash-key header:X-User (make local "
            "ALGORITHM=source-hash), or switch at runtime: curl -X PUT -d "
            f'\'{{"algorithm": "source-hash"}}\' {admin_url}/api/algorithm'
        )
    return None


@events.init.add_listener
def _check_host_at_init(environment: Any, **_kw: Any) -> None:
    opts = environment.parsed_options
    _warn_once(ca_warning(getattr(opts, "host", None), os.environ.get("LB_CA_CERT")))


@events.test_start.add_listener
def _checks_at_start(environment: Any, **_kw: Any) -> None:
    _warn_once(ca_warning(environment.host, os.environ.get("LB_CA_CERT")))
    opts = _options(environment)
    _sticky_refused.clear()
    if isinstance(environment.runner, WorkerRunner) or opts is None:
        return
    if getattr(opts, "scenario", "steady") != "sticky":
        return
    problem = sticky_problem(admin_url_for(environment.host, getattr(opts, "admin_url", "")))
    if problem is None:
        return
    _sticky_refused.append(problem)
    log.error("refusing to run: %s", problem)
    environment.process_exit_code = 2
    runner = environment.runner
    if getattr(opts, "headless", False):
        gevent.spawn_later(0, runner.quit)
    else:
        gevent.spawn_later(0, runner.stop)


class TestbedUser(FastHttpUser):
    insecure = False  # verify certificates (locust's default is not to)
    ssl_context_factory = staticmethod(verified_ssl_context)
    wait_time = between(0.05, 0.3)
    connection_timeout = 5.0
    network_timeout = 15.0

    def on_start(self) -> None:
        self.user_key = uuid.uuid4().hex[:12]
        self.backend: str | None = None
        self.violated = False

    @task
    def pick_scenario(self) -> None:
        opts = _options(self.environment)
        scenario = getattr(opts, "scenario", "steady") if opts is not None else "steady"
        getattr(self, f"_{scenario}")()

    def _steady(self) -> None:
        if random.random() < 0.75:
            self.client.get("/", name="/")
        else:
            self.client.get("/echo?from=locust", name="/echo")

    def _slow(self) -> None:
        ms = random.choice((50, 100, 200, 500))
        self.client.get(f"/delay?ms={ms}", name="/delay")

    def _sticky(self) -> None:
        if _sticky_refused:  # the start-up check failed: send nothing
            raise StopUser()
        headers = {"X-User": self.user_key, "Cookie": f"lb_user={self.user_key}"}
        with self.client.get("/", headers=headers, name="/ (sticky)", catch_response=True) as r:
            got = r.headers.get(BACKEND_HEADER) if r.status_code == 200 else None
            if got is None:
                return
            if self.backend is None:
                self.backend = got
                sticky["users"] += 1
            elif got != self.backend:
                sticky["violations"] += 1
                r.failure(f"sticky violation: {self.backend} -> {got}")
                self.backend = got

    def _bulk(self) -> None:
        n = max(1, _options(self.environment).bulk_bytes)
        if random.random() < 0.5:
            self.client.get(f"/bytes?n={n}", name="/bytes")
        else:
            body = _upload_cache.setdefault(n // 4, os.urandom(max(1, n // 4)))
            self.client.post("/upload", data=body, name="/upload")  # type: ignore[arg-type]

    def _handshake(self) -> None:
        self.client.get("/", headers={"Connection": "close"}, name="/ (new connection)")

    def _h2(self) -> None:
        from harness.h2 import H2Conn  # h2 and a blocking socket: gevent makes it cooperative

        n = max(1, min(100, getattr(_options(self.environment), "h2_streams", 10)))
        url = urllib.parse.urlsplit(self.host or "")
        tls = url.scheme == "https"
        start = time.perf_counter()
        conn: H2Conn | None = getattr(self, "h2conn", None)
        try:
            if conn is None or conn.closed or conn.goaway is not None:
                conn = self.h2conn = H2Conn(
                    url.hostname or "127.0.0.1",
                    url.port or (443 if tls else 80),
                    ca_file=(os.environ.get("LB_CA_CERT") or None) if tls else None,
                    server_name=url.hostname or "localhost",
                    use_system_ca=tls and not os.environ.get("LB_CA_CERT"),
                )
            replies = conn.get(["/"] * n, timeout=self.network_timeout)
        except (OSError, ConnectionError) as exc:
            self.h2conn = None
            self.environment.events.request.fire(
                request_type="H2",
                name="/ (h2 stream)",
                response_time=(time.perf_counter() - start) * 1000,
                response_length=0,
                exception=exc,
            )
            return
        elapsed = (time.perf_counter() - start) * 1000
        seen = set()
        for r in replies:
            ok = r.status == 200 and r.ended
            error = None if ok else ConnectionError(f"status {r.status}, reset {r.reset}")
            self.environment.events.request.fire(
                request_type="H2",
                name="/ (h2 stream)",
                response_time=elapsed,
                response_length=len(r.body),
                exception=error,
            )
            if r.backend:
                backend_counts[r.backend] += 1
                seen.add(r.backend)
        h2_spread["batches"] += 1
        h2_spread["streams"] += len(replies)
        h2_spread["backends_seen"] += len(seen)

    def on_stop(self) -> None:
        conn = getattr(self, "h2conn", None)
        if conn is not None:
            conn.close()


# ---- per-backend distribution ----------------------------------------------------------


@events.request.add_listener
def _count_backend(response: Any = None, exception: Any = None, **_kw: Any) -> None:
    # responses marked failed by a check (e.g. a sticky violation) still came from a backend
    name = (
        response.headers.get(BACKEND_HEADER) if response is not None and response.headers else None
    )
    if name or (exception is None and response is not None):
        backend_counts[name or "-"] += 1


@events.report_to_master.add_listener
def _send_counts(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    data["lb_backends"] = dict(backend_counts)
    data["lb_sticky"] = dict(sticky)
    data["lb_h2"] = dict(h2_spread)
    backend_counts.clear()
    sticky.update(violations=0, users=0)
    h2_spread.update(batches=0, streams=0, backends_seen=0)


@events.worker_report.add_listener
def _merge_counts(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    backend_counts.update(data.get("lb_backends", {}))
    for key, n in data.get("lb_sticky", {}).items():
        sticky[key] = sticky.get(key, 0) + n
    for key, n in data.get("lb_h2", {}).items():
        h2_spread[key] = h2_spread.get(key, 0) + n


def backend_rows() -> list[dict[str, Any]]:
    total = sum(backend_counts.values()) or 1
    return [
        {"name": name, "requests": n, "share": round(100 * n / total, 1)}
        for name, n in sorted(backend_counts.items())
    ]


def h2_view() -> dict[str, Any]:
    """The h2 scenario's spread: mean distinct backends reached by one batch of streams
    sent at once on one connection (round robin over 3 backends: 3; source hash: 1)."""
    batches = h2_spread["batches"]
    mean = round(h2_spread["backends_seen"] / batches, 2) if batches else None
    return {**h2_spread, "backends_per_connection": mean}


def snapshot() -> dict[str, Any]:
    return {
        "backends": dict(sorted(backend_counts.items())),
        "sticky": dict(sticky),
        "h2": h2_view(),
    }


@events.init.add_listener
def _web_ui(environment: Any, **_kw: Any) -> None:
    web_ui = environment.web_ui
    if web_ui is None:
        return
    from flask import jsonify, request

    @web_ui.app.route("/backends")
    def backends_json() -> Any:
        return jsonify(snapshot())

    # an extra tab in the stock UI: declared here, rows ride on /stats/requests
    web_ui.template_args["extended_tabs"] = [{"title": "Backends", "key": "backends"}]
    web_ui.template_args["extended_tables"] = [
        {
            "key": "backends",
            "structure": [
                {"key": "name", "title": "Backend (X-Backend)"},
                {"key": "requests", "title": "Responses"},
                {"key": "share", "title": "Share %"},
            ],
        }
    ]

    @web_ui.app.after_request
    def _extend_stats(response: Any) -> Any:
        if request.path == "/stats/requests" and response.is_json:
            data = response.get_json()
            data["extended_stats"] = [{"key": "backends", "data": backend_rows()}]
            response.set_data(json.dumps(data))
        return response


@events.test_stop.add_listener
def _write_counts(environment: Any, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    log.info(
        "per-backend responses: %s; sticky: %s; h2: %s", dict(backend_counts), sticky, h2_view()
    )
    out = getattr(_options(environment), "backends_out", "") if environment.parsed_options else ""
    if not out:
        return
    try:
        with open(out, "w", newline="") as f:
            if out.endswith(".csv"):
                w = csv.writer(f)
                w.writerow(["backend", "responses", "share_percent"])
                w.writerows([r["name"], r["requests"], r["share"]] for r in backend_rows())
            else:
                json.dump(snapshot(), f, indent=2)
    except OSError as exc:
        log.error("cannot write %s: %s", out, exc.strerror)


@events.quitting.add_listener
def _error_rate_gate(environment: Any, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    limit = environment.parsed_options.max_error_rate
    total = environment.stats.total
    if total.num_requests and total.fail_ratio > limit:
        log.error("failure ratio %.3f above --max-error-rate %.3f", total.fail_ratio, limit)
        environment.process_exit_code = 1


# ---- load shapes (LB_SHAPE=step|spike) ---------------------------------------------------


def _env_num(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


class StepShape(LoadTestShape):
    """+LB_STEP_USERS users every LB_STEP_SECONDS, LB_STEPS times, then stop."""

    abstract = True

    def tick(self) -> tuple[int, float] | None:
        users = int(_env_num("LB_STEP_USERS", 10))
        seconds = _env_num("LB_STEP_SECONDS", 30)
        step = int(self.get_run_time() // seconds)
        if step >= int(_env_num("LB_STEPS", 5)):
            return None
        return (step + 1) * users, max(1, users)


class SpikeShape(LoadTestShape):
    """LB_BASE_USERS, jumping to LB_SPIKE_USERS for LB_SPIKE_SECONDS at LB_SPIKE_AT."""

    abstract = True

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t >= _env_num("LB_SHAPE_SECONDS", 90):
            return None
        at, length = _env_num("LB_SPIKE_AT", 30), _env_num("LB_SPIKE_SECONDS", 20)
        if at <= t < at + length:
            return int(_env_num("LB_SPIKE_USERS", 100)), 100
        return int(_env_num("LB_BASE_USERS", 10)), 100


_SHAPES: dict[str, type[LoadTestShape]] = {"step": StepShape, "spike": SpikeShape}
_shape = os.environ.get("LB_SHAPE", "")
if _shape:
    if _shape not in _SHAPES:
        raise SystemExit(f"LB_SHAPE must be one of {', '.join(_SHAPES)}, got {_shape!r}")
    _SHAPES[_shape].abstract = False  # locust uses the one non-abstract shape class
