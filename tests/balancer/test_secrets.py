"""Secrets (admin token, pair secret) never reach logs or the admin API."""

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from backends.testing import spawn_backend_process


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_token_and_pair_secret_are_never_logged_or_served(tmp_path: Path) -> None:
    token = "tok-" + secrets.token_hex(16)
    pair_secret = "sec-" + secrets.token_hex(16)
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "pair.secret").write_text(pair_secret + "\n")
    backend = spawn_backend_process("b1", port=0)
    admin, listen = _free_port(), _free_port()
    e1, e2 = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
    log = tmp_path / "balancer.log"
    with log.open("w") as out:
        lb = subprocess.Popen(
            [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{listen}"]
            + ["--backend", f"127.0.0.1:{backend.port}", "--admin", f"127.0.0.1:{admin}"]
            + ["--admin-token-file", str(tmp_path / "token"), "--log-level", "debug"]
            + ["--secret-file", str(tmp_path / "pair.secret")]
            + ["--bind-election", f"127.0.0.1:{e1}", "--peer", f"127.0.0.1:{e2}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{admin}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if _call(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        bid = f"127.0.0.1:{backend.port}"
        assert _call(f"{base}/api/backends/{bid}/drain", "POST", token="wrong")[0] == 401
        assert _call(f"{base}/api/backends/{bid}/drain", "POST", token=token)[0] == 200
        assert _call(f"{base}/api/backends/{bid}/enable", "POST", token=token)[0] == 200
        status, state = _call(base + "/api/state")
        assert status == 200
        _, metrics = _call(base + "/metrics")
        time.sleep(0.5)  # a few adverts and checks go by
    finally:
        lb.terminate()
        lb.wait(15)
        backend.terminate()
        backend.wait(15)
    text = log.read_text()
    assert "drain" in json.dumps(json.loads(state)["events"])  # the actions did happen
    for secret in (token, pair_secret):
        assert secret not in text
        assert secret not in state
        assert secret not in metrics
