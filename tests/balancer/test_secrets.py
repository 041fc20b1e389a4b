"""Secrets (admin token, pair secret) never reach logs or the admin API."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from harness import BackendProc, BalancerProc, free_port, free_ports, pair_args, wait_until


def test_token_and_pair_secret_are_never_logged_or_served(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    token = "tok-" + secrets.token_hex(16)
    pair_secret = "sec-" + secrets.token_hex(16)
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "pair.secret").write_text(pair_secret + "\n")
    b1 = backend("b1")
    election, peer = free_ports(2, kind=socket.SOCK_DGRAM)
    lb = balancer(
        *("--listen", f"127.0.0.1:{free_port()}", "--backend", b1.address),
        *("--admin", "127.0.0.1:0", "--admin-token-file", str(tmp_path / "token")),
        *("--log-level", "debug"),
        *pair_args(
            election=election,
            peer=peer,
            priority=100,
            secret_file=tmp_path / "pair.secret",
        ),
        listens=False,  # a pair node starts passive
    )
    drain = f"/api/backends/{b1.address}/drain"
    assert lb.admin(drain, "POST", token="wrong").status == 401
    assert lb.admin(drain, "POST", token=token).status == 200
    assert lb.admin(f"/api/backends/{b1.address}/enable", "POST", token=token).status == 200
    # with no peer it wins the election: adverts (signed with the secret) have gone out
    assert wait_until(lambda: lb.role() == "active", 15.0), lb.output()
    state = lb.admin("/api/state")
    metrics = lb.admin("/metrics")
    assert (state.status, metrics.status) == (200, 200)
    assert "drain" in json.dumps(state.json()["events"])  # the actions did happen
    lb.stop()
    log = lb.output()
    assert "role passive -> active" in log  # the log we searched is the one that saw it all
    for secret in (token, pair_secret):
        assert secret not in log
        assert secret not in state.body.decode()
        assert secret not in metrics.body.decode()
