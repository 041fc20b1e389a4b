"""Shared by conftest.py and the tests (a uniquely named module: several conftest.py
files exist in this tree, so `from conftest import ...` would be ambiguous)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROJECT = "lbtestbed"
LABEL = f"label=com.docker.compose.project={PROJECT}"
ADMINS = {"balancer-a": "http://127.0.0.1:9001", "balancer-b": "http://127.0.0.1:9002"}
SERVICE_URL = "https://localhost:8443"
LOCUST_URL = "http://127.0.0.1:8089"
BACKENDS = 3
UP_TIMEOUT_S = 900  # a cold CI run builds the base image (debootstrap) first
READY_TIMEOUT_S = 120
# the balancers' JSON access log goes to `docker logs` (the one-name test reads it)
ENV = {
    **os.environ,
    "COMPOSE_PROJECT_NAME": PROJECT,
    "BACKENDS": str(BACKENDS),
    "LB_ACCESS_LOG": "-",
}


def run_cmd(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def tail(p: subprocess.CompletedProcess[str], lines: int = 25) -> str:
    return "\n".join((p.stdout + p.stderr).splitlines()[-lines:])


def leftovers() -> dict[str, list[str]]:
    """Containers, networks and volumes labelled with our compose project."""
    found = {}
    for kind, argv in (
        ("containers", ["docker", "ps", "-aq", "--filter", LABEL]),
        ("networks", ["docker", "network", "ls", "-q", "--filter", LABEL]),
        ("volumes", ["docker", "volume", "ls", "-q", "--filter", LABEL]),
    ):
        p = run_cmd(argv, 30)
        found[kind] = p.stdout.split()
    return {k: v for k, v in found.items() if v}


@cache
def skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not installed"
    if shutil.which("make") is None:
        return "make not installed"
    try:
        if run_cmd(["docker", "info"], 30).returncode != 0:
            return "Docker engine not reachable (`docker info` failed)"
        compose_v2 = run_cmd(["docker", "compose", "version"], 30).returncode == 0
    except subprocess.TimeoutExpired:
        return "Docker engine not answering (`docker info` timed out)"
    if not compose_v2 and shutil.which("docker-compose") is None:
        return "neither `docker compose` nor docker-compose is installed"
    if found := leftovers():
        return (
            f"compose project {PROJECT} already exists ({', '.join(found)}); "
            "the e2e suite needs a clean engine: `make down V=1` first"
        )
    return None


# ---- HTTP helpers (loopback only) ------------------------------------------------------


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def roles() -> dict[str, str | None]:
    """Role per balancer; None when its admin does not answer."""
    out: dict[str, str | None] = {}
    for name, url in ADMINS.items():
        try:
            out[name] = get_json(url + "/api/state").get("role")
        except (OSError, ValueError):
            out[name] = None
    return out


def healthz_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    """Poll `check()` until truthy; bounded in time and count. Fails with the last value."""
    last: Any = None
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def healthy_pair() -> dict[str, str | None] | None:
    """Both balancers answer /healthz, exactly one is active and the other passive."""
    if not all(healthz_ok(u) for u in ADMINS.values()):
        return None
    r = roles()
    return r if sorted(str(v) for v in r.values()) == ["active", "passive"] else None


def active_backends() -> list[dict[str, Any]]:
    name = next((n for n, r in roles().items() if r == "active"), None)
    if name is None:
        return []
    backends: list[dict[str, Any]] = get_json(ADMINS[name] + "/api/state")["backends"]
    return backends


def all_backends_up(n: int = BACKENDS) -> list[dict[str, Any]] | None:
    backends = active_backends()
    ok = len(backends) == n and all(b["state"] == "up" for b in backends)
    return backends if ok else None


@dataclass(frozen=True)
class Stack:
    root: Path
    ca_file: Path  # our compose CA, as written by `make ca-cert`
    env: dict[str, str]
