from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trustme

from harness import free_port
from harness.traffic import Outcome, run_traffic

ServerFactory = Any


async def test_sends_rate_times_duration_and_records_each(serve: ServerFactory) -> None:
    served = await serve(None)
    seen: list[Outcome] = []
    outs = await run_traffic(served.url + "/", 50, 1.0, on_outcome=seen.append)
    assert len(outs) == 50 == len(seen) == served.requests
    assert all(o.ok and o.status == 200 and o.backend == "t1" for o in outs)
    assert all(o.latency is not None and o.latency >= 0 for o in outs)
    sends = [o.t_send for o in outs]
    assert sends == sorted(sends)
    # open loop: request i is never sent before its slot i/rate
    assert sends[-1] - sends[0] >= 49 / 50 - 0.05


async def test_keepalive_reuses_and_new_connections_do_not(serve: ServerFactory) -> None:
    served = await serve(None)
    await run_traffic(served.url + "/", 20, 1.0, keepalive=False)
    assert len(served.peers) == 20  # one TCP connection per request
    served.peers.clear()
    await run_traffic(served.url + "/", 20, 1.0, keepalive=True, connections=1)
    assert len(served.peers) == 1


async def test_each_outcome_says_which_connection_it_had(serve: ServerFactory) -> None:
    served = await serve(None)
    outs = await run_traffic(served.url + "/", 20, 1.0, keepalive=True, connections=1)
    assert outs[0].conn == "new" and {o.conn for o in outs[1:]} == {"reused"}
    outs = await run_traffic(served.url + "/", 5, 1.0, keepalive=False)
    assert {o.conn for o in outs} == {"new"}
    closed = f"http://127.0.0.1:{free_port()}/"  # nothing listens: the connect fails
    outs = await run_traffic(closed, 5, 1.0)
    assert {o.conn for o in outs} == {"failed"} and not any(o.ok for o in outs)


async def test_status_errors_and_timeouts_are_recorded(serve: ServerFactory) -> None:
    served = await serve(None)
    outs = await run_traffic(served.url + "/fail", 20, 0.5)
    assert [o.status for o in outs] == [503] * 10 and not any(o.ok for o in outs)
    outs = await run_traffic(f"http://127.0.0.1:{free_port()}/", 20, 0.5)
    assert len(outs) == 10
    assert all(o.status is None and o.error and "Connect" in o.error for o in outs)
    outs = await run_traffic(served.url + "/slow", 10, 0.2, timeout=0.2)
    assert [o.error for o in outs] == ["timeout", "timeout"]


def _https_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_https_verifies_against_the_given_ca(serve: ServerFactory, tmp_path: Path) -> None:
    ca, other = trustme.CA(), trustme.CA()
    served = await serve(_https_ctx(ca))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    outs = await run_traffic(served.url + "/", 10, 0.5, ca_file=str(tmp_path / "ca.pem"))
    assert all(o.ok for o in outs) and len(outs) == 5
    outs = await run_traffic(served.url + "/", 10, 0.5, ca_file=str(tmp_path / "other.pem"))
    assert len(outs) == 5
    assert all(o.status is None and "Certificate" in (o.error or "") for o in outs)
