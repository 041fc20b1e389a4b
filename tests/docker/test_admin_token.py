"""Admin in the containers: the ca service makes the admin token once and publishes it
private, and the balancer's container command line makes mutations need it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.admin.api import AdminError, AuthPolicy, authorize, load_token
from balancer.config import from_args

REPO = Path(__file__).resolve().parents[2]
CA_INIT = REPO / "docker" / "ca-init.sh"
BALANCER_SH = REPO / "docker" / "balancer.sh"
GATEWAY = "172.28.0.1"  # where a request from the host comes from, seen in the container


def run_ca_init(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PKI_DIR": str(tmp_path / "pki"),
        "CERTS_DIR": str(tmp_path / "certs"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    (tmp_path / "certs").mkdir(exist_ok=True)
    return subprocess.run(
        ["sh", str(CA_INIT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="ca-init.sh chowns files, as in its container")
def test_ca_init_makes_the_admin_token_once_publishes_it_0600_and_never_prints_it(
    tmp_path: Path,
) -> None:
    first = run_ca_init(tmp_path)
    assert first.returncode == 0, first.stderr
    published = tmp_path / "certs" / "admin.token"
    token = published.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE(published.stat().st_mode) == 0o600
    assert token not in first.stdout + first.stderr
    assert token != (tmp_path / "certs" / "pair.secret").read_text().strip()
    again = run_ca_init(tmp_path)  # a re-run of ca keeps the token (and the pair secret)
    assert again.returncode == 0, again.stderr
    assert published.read_text().strip() == token
    assert token not in again.stdout + again.stderr


def container_argv(certs: Path) -> list[str]:
    """The flags docker/balancer.sh execs the balancer with, /certs pointed at `certs`: the
    real script run by sh, with a `python` on PATH that prints its arguments."""
    bin_dir = certs / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done\n')
    fake.chmod(0o755)
    script = certs / "balancer.sh"
    script.write_text(BALANCER_SH.read_text().replace("/certs/", f"{certs}/"))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "LB_PEER": "172.28.0.12:7946",
        "LB_PRIORITY": "150",
        "CERT_WAIT_SECONDS": "0",
    }
    out = subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.decode().split("\0")[:-1]
    assert argv[:2] == ["-m", "balancer"], argv
    return argv[2:]


def test_the_balancer_container_requires_the_token_for_mutations(tmp_path: Path) -> None:
    script = BALANCER_SH.read_text()
    # it waits for the token like the other files the ca service publishes
    assert "/certs/admin.token" in script.split("exec python -m balancer")[0]
    for name in ("balancer.crt", "balancer.key", "pair.secret"):  # looked at when loaded
        (tmp_path / name).write_text("unused here\n")
    (tmp_path / "admin.token").write_text("f" * 64 + "\n")
    cfg = from_args(container_argv(tmp_path))
    assert cfg.admin.listen == "0.0.0.0:9000"
    assert cfg.admin.token_file == str(tmp_path / "admin.token")
    token, error = load_token(cfg.admin.token_file)
    policy = AuthPolicy(token, error, mtls=bool(cfg.admin.client_ca))
    for remote in (GATEWAY, "127.0.0.1"):  # not even loopback skips the token
        with pytest.raises(AdminError) as refused:
            authorize(policy, None, False, remote)
        assert refused.value.status == 401
    authorize(policy, "Bearer " + "f" * 64, False, GATEWAY)
