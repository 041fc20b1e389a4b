"""A Locust worker from outside the compose network joins the master through port 5557,
published on request (`LOCUST_MASTER_BIND`). The master runs in its own compose project
(only `ca` and `locust-master`); the worker runs in a second project on host networking,
standing in for another host. Both projects are removed afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import LOCUST_URL, ROOT, UP_TIMEOUT_S, get_json, leftovers, wait_for

MASTER_PROJECT = "lbtlocustmaster"
WORKER_PROJECT = "lbtlocustworker"
WORKER_COMPOSE = """\
services:
  remote-worker:
    image: lb-testbed:latest
    network_mode: host
    command: [locust, -f, /app/loadtest/locustfile.py, --worker,
              --master-host, 127.0.0.1, --master-port, "5557"]
"""


def _compose() -> list[str]:
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if v2.returncode == 0 else ["docker-compose"]


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def master_env() -> Iterator[dict[str, str]]:
    if leftovers():
        pytest.skip("project lbtestbed is up: it holds port 8089")
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": MASTER_PROJECT,
        "COMPOSE_FILE": "compose.yaml:docker/compose.locust-master.yaml",
        "LOCUST_MASTER_BIND": "127.0.0.1",
    }
    subnet = _run([str(ROOT / "tools" / "choose_subnet.py")], env, 60)
    if subnet.returncode != 0:
        pytest.skip(f"no free subnet: {subnet.stderr.strip()}")
    env.update(v.split("=", 1) for v in subnet.stdout.split() if "=" in v)
    try:
        yield env
    finally:
        _run([*_compose(), "down", "-v", "--remove-orphans"], env, 180)


def _workers() -> list[Any] | None:
    try:
        data = get_json(f"{LOCUST_URL}/stats/requests")
    except (OSError, ValueError):
        return None
    workers: list[Any] = data.get("workers") or []
    return workers or None


def test_outside_worker_joins_the_master_through_the_published_port(
    master_env: dict[str, str], tmp_path: Path
) -> None:
    image = _run(["make", "image"], master_env, UP_TIMEOUT_S)
    assert image.returncode == 0, image.stderr[-2000:]
    up = _run([*_compose(), "up", "-d", "--no-build", "locust-master"], master_env, 300)
    assert up.returncode == 0, up.stderr[-2000:]
    ports = _run(["docker", "port", f"{MASTER_PROJECT}_locust-master_1"], master_env, 30)
    if ports.returncode != 0:  # Compose v2 names it with hyphens
        ports = _run(["docker", "port", f"{MASTER_PROJECT}-locust-master-1"], master_env, 30)
    assert "5557/tcp -> 127.0.0.1:5557" in ports.stdout, ports.stdout + ports.stderr

    (tmp_path / "compose.yaml").write_text(WORKER_COMPOSE)
    worker = [*_compose(), "-p", WORKER_PROJECT, "-f", str(tmp_path / "compose.yaml")]
    env = {k: v for k, v in master_env.items() if k not in ("COMPOSE_FILE",)}
    env["COMPOSE_PROJECT_NAME"] = WORKER_PROJECT
    try:
        started = _run([*worker, "up", "-d"], env, 120)
        assert started.returncode == 0, started.stderr[-2000:]
        workers = wait_for("the outside worker in the master's list", _workers, 60)
        # host networking: the worker's id starts with this host's name, not a container's
        assert any(str(w["id"]).startswith(socket.gethostname() + "_") for w in workers), workers
    finally:
        _run([*worker, "down", "--remove-orphans"], env, 120)
