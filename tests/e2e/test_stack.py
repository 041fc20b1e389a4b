"""End to end against the compose stack (`make up`): HTTPS through the VIP with our CA, the
balancer pair, Locust, and the failover drills. Tests run in file order; each one leaves
the stack healthy (one active balancer, every backend up) for the next.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import (
    ADMINS,
    BACKENDS,
    LOCUST_URL,
    PROJECT,
    SERVICE_URL,
    Stack,
    active_backends,
    all_backends_up,
    get_json,
    healthy_pair,
    roles,
    run_cmd,
    tail,
    wait_for,
)

DRILL_TIMEOUT_S = 180
SHORT = ("--rate", "100", "--duration", "15")  # scale-backends keeps 20 s: discovery needs time
FAILOVER_TARGET_S = 1.0  # the target for drill 2


def https_get(url: str, ctx: ssl.SSLContext) -> tuple[int, str | None, bytes]:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        return resp.status, resp.headers.get("X-Backend"), resp.read()


def backend_names(ca_file: Path, max_requests: int = 30, want: int = BACKENDS) -> set[str]:
    """X-Backend values over up to `max_requests` verified requests (stops at `want`)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    names: set[str] = set()
    for _ in range(max_requests):
        status, name, _ = https_get(SERVICE_URL + "/", ctx)
        assert status == 200
        if name:
            names.add(name)
        if len(names) >= want:
            break
    return names


def drill_process(
    stack: Stack, scenario: str, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "loadtest.drill", scenario, "--json", str(out), "--quiet"]
    return subprocess.run(
        [*argv, *extra],
        cwd=stack.root,
        env=env or stack.env,
        capture_output=True,
        text=True,
        timeout=DRILL_TIMEOUT_S,
        check=False,
    )


def run_drill(stack: Stack, scenario: str, out: Path, *extra: str) -> dict[str, Any]:
    """Run a drill on our project; exit 0 means its (default) expectations held."""
    p = drill_process(stack, scenario, out, "--project", PROJECT, *extra)
    print(f"\n{p.stderr.strip()}")  # the drill's summary and expectation lines
    assert p.returncode == 0, f"drill {scenario} exit {p.returncode}:\n{p.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["expectations"] and report["expectations_met"] is True
    return report


def docker_start(service: str) -> None:
    """`docker start` the (only) container of a compose service."""
    label = [
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    ]
    ids = subprocess.run(
        ["docker", "ps", "-aq", *label], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert len(ids) == 1, f"expected one {service} container, found {ids}"
    subprocess.run(["docker", "start", ids[0]], capture_output=True, timeout=60, check=True)


# ---- HTTPS through the VIP -----------------------------------------------------------------


def test_curl_verifies_the_service_with_our_ca(stack: Stack) -> None:
    p = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(stack.ca_file), "-D", "-", SERVICE_URL],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    head = p.stdout.lower()
    # curl offers h2 in ALPN and the balancer takes it, through the TCP-mode entry
    assert head.startswith("http/2 200") and "x-backend:" in head


ENTRY_ADMIN = "http://127.0.0.1:9003"


def test_the_entry_relays_in_tcp_mode_and_passes_the_client_address(stack: Stack) -> None:
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))
    status, _, body = https_get(SERVICE_URL + "/echo", ctx)
    assert status == 200
    forwarded = [v for k, v in json.loads(body)["headers"] if k == "X-Forwarded-For"]
    with urllib.request.urlopen(ENTRY_ADMIN + "/api/state", timeout=5) as resp:
        state = json.load(resp)
    assert state["listener"]["all"][0]["mode"] == "tcp"
    [vip] = state["backends"]
    assert vip["name"] == "vip" and vip["tcp"]["connections"] >= 1
    # the pair saw the entry's PROXY v2 header: the client is the host side, not the entry
    filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
    filters += ["--filter", "label=com.docker.compose.service=entry"]
    ids = subprocess.run(
        ["docker", "ps", "-q", *filters], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    entry_ip = subprocess.run(
        ["docker", "inspect", "-f", fmt, *ids[:1]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert len(forwarded) == 1 and forwarded[0] != entry_ip, (forwarded, entry_ip)


def test_python_client_with_only_our_ca_sees_every_backend(stack: Stack) -> None:
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))  # trusts our CA only
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    names = backend_names(stack.ca_file)
    assert len(names) == BACKENDS, f"X-Backend values seen: {names}"


def compose_backends() -> dict[str, tuple[str, str]]:
    """`docker ps`: backend-N -> (container name, address) for each backend replica.

    N is read from the container name (`lbtestbed_backend_N` with Compose v1,
    `lbtestbed-backend-N` with v2) and must agree with compose's replica label.
    """
    fmt = '{{.ID}} {{.Names}} {{.Label "com.docker.compose.container-number"}}'
    filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
    filters += ["--filter", "label=com.docker.compose.service=backend"]
    ps = subprocess.run(
        ["docker", "ps", *filters, "--format", fmt],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out: dict[str, tuple[str, str]] = {}
    for line in ps.stdout.splitlines():
        cid, container, number = line.split()
        m = re.fullmatch(rf"{PROJECT}[_-]backend[_-](\d+)", container)
        assert m is not None and m.group(1) == number, f"unexpected container {container}"
        ip = subprocess.run(
            ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"]
            + [cid],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        out[f"backend-{number}"] = (container, f"{ip}:8080")
    return out


def test_one_name_per_backend_in_docker_ps_x_backend_api_and_metrics(stack: Stack) -> None:
    replicas = compose_backends()
    assert len(replicas) == BACKENDS, replicas
    # X-Backend: the replica names itself from Docker's reverse DNS of its own address
    assert backend_names(stack.ca_file) == set(replicas)
    for balancer, admin in ADMINS.items():
        # /api/state: discovery names each address by the same reverse lookup
        state = get_json(admin + "/api/state")
        seen = {b["name"]: b["address"] for b in state["backends"]}
        assert seen == {name: addr for name, (_, addr) in replicas.items()}, balancer
        with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        for name, (_, addr) in replicas.items():
            assert f'lb_backend_info{{address="{addr}",backend="{name}"}} 1.0' in metrics
            assert f'lb_backend_up{{backend="{name}"}}' in metrics
    # the access log (LB_ACCESS_LOG=-, to docker logs) of the active balancer
    active = next(n for n, r in roles().items() if r == "active")
    logs = subprocess.run(
        [*(["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"])]
        + ["logs", "--no-color", "--tail", "200", active],
        cwd=stack.root,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    logged = set()
    for line in logs.splitlines():
        _, _, text = line.partition("| ")
        if text.startswith('{"ts"'):
            entry = json.loads(text)
            logged.add((entry["backend"], entry["backend_address"]))
    assert logged == {(name, addr) for name, (_, addr) in replicas.items()}


def test_a_scaled_replica_is_named_the_same_way(stack: Stack) -> None:
    p = run_cmd(["make", "up", f"BACKENDS={BACKENDS + 1}"], 600)
    assert p.returncode == 0, tail(p)
    try:
        replicas = compose_backends()
        new = f"backend-{BACKENDS + 1}"
        assert new in replicas and len(replicas) == BACKENDS + 1, replicas

        def everywhere() -> bool:
            for admin in ADMINS.values():
                state = get_json(admin + "/api/state")
                named = {b["name"]: b["address"] for b in state["backends"]}
                if named.get(new) != replicas[new][1]:
                    return False
            return new in backend_names(stack.ca_file, max_requests=40, want=BACKENDS + 1)

        wait_for(f"{new} in both balancers' state and in X-Backend", everywhere, 60)
    finally:
        p = run_cmd(["make", "up", f"BACKENDS={BACKENDS}"], 600)
        assert p.returncode == 0, tail(p)
        wait_for(f"{BACKENDS} backends up", all_backends_up, 60)
    assert set(compose_backends()) == {f"backend-{n}" for n in range(1, BACKENDS + 1)}


def test_client_without_our_ca_fails_verification(stack: Stack) -> None:
    ctx = ssl.create_default_context()  # the system store: our CA is not in it
    with pytest.raises(urllib.error.URLError) as exc:
        https_get(SERVICE_URL + "/", ctx)
    assert isinstance(exc.value.reason, ssl.SSLCertVerificationError)
    p = subprocess.run(
        ["curl", "-sS", "--max-time", "10", SERVICE_URL + "/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 60, p.stderr  # curl: peer certificate cannot be authenticated


# ---- the balancer pair ---------------------------------------------------------------------


def test_exactly_one_balancer_is_active(stack: Stack) -> None:
    r = roles()
    assert sorted(str(v) for v in r.values()) == ["active", "passive"], r
    active = next(n for n, role in r.items() if role == "active")
    state = get_json(ADMINS[active] + "/api/state")
    assert len(state["backends"]) == BACKENDS
    assert {b["state"] for b in state["backends"]} == {"up"}


# ---- the admin API: reads open, mutations need the ca service's token ----------------------


def admin_call(url: str, method: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, method=method, headers=headers, data=b"")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_admin_mutations_need_the_token_from_make_admin_token(stack: Stack) -> None:
    p = subprocess.run(
        ["make", "-s", "admin-token"],
        cwd=stack.root,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    token = p.stdout.strip()
    assert len(token) == 64 and token.isalnum(), "make admin-token printed more than a token"
    active = next(n for n, role in roles().items() if role == "active")
    url = ADMINS[active]
    victim = get_json(url + "/api/state")["backends"][0]["id"]
    drain = f"{url}/api/backends/{urllib.parse.quote(victim, safe='')}/drain"
    # from the host, without the token: refused (401), nothing changes; reads stay open
    status, body = admin_call(drain, "POST", None)
    assert (status, body) == (401, {"error": "missing bearer token"})
    status, _ = admin_call(drain, "POST", "0" * 64)
    assert status == 401
    state = get_json(url + "/api/state")
    assert {b["admin_state"] for b in state["backends"]} == {"enabled"}
    # with it: applied; enable again so the next tests find every backend up
    status, body = admin_call(drain, "POST", token)
    assert (status, body["admin_state"]) == (200, "draining")
    enable = drain.removesuffix("/drain") + "/enable"
    status, body = admin_call(enable, "POST", token)
    assert (status, body["admin_state"]) == (200, "enabled")
    wait_for("every backend up again", all_backends_up, 30)


# ---- Locust -------------------------------------------------------------------------------


def _locust(path: str, form: dict[str, str] | None = None) -> Any:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(LOCUST_URL + path, data=data, timeout=5) as resp:
        body = resp.read()
        assert resp.status == 200, (path, resp.status)
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def test_locust_master_has_a_worker_and_a_short_swarm_succeeds(stack: Stack) -> None:
    html = _locust("/")
    assert b"<html" in html.lower()
    wait_for("a Locust worker", lambda: _locust("/stats/requests")["worker_count"] >= 1, timeout=60)
    _locust("/stats/reset", {})
    started = _locust("/swarm", {"user_count": "4", "spawn_rate": "4"})
    assert started["success"], started
    try:
        time.sleep(5)  # users verify TLS against our CA inside lbnet
    finally:
        _locust("/stop", {})
    stats = _locust("/stats/requests")
    total = next(s for s in stats["stats"] if s["name"] == "Aggregated")
    assert total["num_requests"] > 0, stats
    assert total["num_failures"] == 0, stats.get("errors")
    print(f"\nlocust: {total['num_requests']} requests, 0 failures, {stats['worker_count']} worker")


# ---- drills (each leaves the stack healthy) ---------------------------------------------


def test_drill_kill_backend_loses_no_request(stack: Stack, tmp_path: Path) -> None:
    r = run_drill(stack, "kill-backend", tmp_path / "kill-backend.json", *SHORT)
    assert r["counts"]["sent"] > 0
    assert r["failed_requests"] == 0, r["counts"]
    assert [e["kind"] for e in r["events"]] == ["kill", "restart"]
    assert r["detect_s"] is not None
    # the drill restarted the backend: all of them serve again
    wait_for(f"{BACKENDS} backends up", all_backends_up, 60)
    wait_for(f"{BACKENDS} X-Backend names", lambda: len(backend_names(stack.ca_file)) == 3, 30)


def test_drill_stop_backend_loses_no_request(stack: Stack, tmp_path: Path) -> None:
    r = run_drill(stack, "stop-backend", tmp_path / "stop-backend.json", *SHORT)
    conditions = {e["condition"]: e["measured"] for e in r["expectations"]}
    assert conditions["failed_requests==0"] == 0, r["counts"]  # SIGTERM: nothing lost
    assert [e["kind"] for e in r["events"]] == ["stop", "restart"]
    wait_for(f"{BACKENDS} backends up", all_backends_up, 60)


def test_drill_refuses_a_project_that_is_not_running(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "COMPOSE_PROJECT_NAME": "lbtestbedabsent"}
    p = drill_process(stack, "kill-backend", tmp_path / "x.json", env=env)
    assert p.returncode == 2
    assert p.stderr == (
        "drill: compose project 'lbtestbedabsent' is not running; start it with `make up` "
        "or set COMPOSE_PROJECT_NAME to the project to drill\n"
    )
    assert not (tmp_path / "x.json").exists()
    wait_for(f"{BACKENDS} backends up", all_backends_up, 10)  # ours untouched


def test_drill_restart_backend_loses_no_request(stack: Stack, tmp_path: Path) -> None:
    r = run_drill(stack, "restart-backend", tmp_path / "restart-backend.json", *SHORT)
    assert r["failed_requests"] == 0, r["counts"]
    assert [e["kind"] for e in r["events"]] == ["stop", "restart"]
    assert r["recover_s"] is not None, "the restarted backend never served again"
    wait_for(f"{BACKENDS} backends up", all_backends_up, 60)


def test_drill_scale_backends_adds_serves_and_drains(stack: Stack, tmp_path: Path) -> None:
    r = run_drill(stack, "scale-backends", tmp_path / "scale.json", "--rate", "100")
    assert r["failed_requests"] == 0, r["counts"]
    assert r["added_s"] is not None and r["served_by_added"] > 0
    assert r["removed_s"] is not None
    ids = {b["id"] for b in active_backends()}
    assert r["added_backend_id"] not in ids
    wait_for(f"{BACKENDS} backends up", all_backends_up, 60)
    # the drill removed its container; nothing but the compose replicas is left
    p = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=lb-testbed.drill"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert p.stdout.split() == []


def test_drill_kill_active_balancer_fails_over(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "kill-active.json"
    try:
        # defaults: active_changed==true and failed_new_connections==0 (the entry relay
        # retries the VIP during the takeover)
        r = run_drill(stack, "kill-active-balancer", out, *SHORT)
        failover = r["failover_s"]
        print(
            f"failover_s={failover} failed={r['failed_requests']} in_flight="
            f"{r['failed_in_flight']} new_connections={r['failed_new_connections']}"
        )
        assert r["failed_new_connections"] == 0, r["counts"]
        assert r["active_after"] not in (None, r["active_before"]), r
        assert failover is None or failover <= FAILOVER_TARGET_S, (
            f"failover took {failover} s (target <= {FAILOVER_TARGET_S} s); "
            f"failed requests: {r['failed_requests']}"
        )
    finally:
        # bring the killed balancer back so the pair is whole again (either one: the drill
        # may have failed before its report named the victim)
        for service in ADMINS:
            docker_start(service)
        wait_for("both balancers healthy, one active", healthy_pair, 90)
    assert set(roles()) == set(ADMINS)
