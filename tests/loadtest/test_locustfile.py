"""Headless Locust against an in-process HTTPS server: verification must be on."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def _https_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def _locust(
    url: str,
    ca_file: Path | None,
    out: Path,
    cwd: Path,
    shape: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[int, str]:
    argv = [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE)]
    if shape is None:
        argv += ["-u", "2", "-r", "2", "-t", "5s"]
    argv += ["--host", url, "--only-summary", "--backends-out", str(out), *extra]
    env = dict(os.environ)
    env.pop("LB_CA_CERT", None)
    if ca_file is not None:
        env["LB_CA_CERT"] = str(ca_file)
    env.pop("LB_SHAPE", None)
    env.update(shape or {})
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(errors="replace")


async def test_locust_succeeds_with_our_ca(serve: Any, tmp_path: Path) -> None:
    ca = trustme.CA()
    served = await serve(_https_ctx(ca))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    code, output = await _locust(served.url, tmp_path / "ca.pem", tmp_path / "b.json", tmp_path)
    assert code == 0, output[-2000:]
    assert served.requests > 0
    counts = json.loads((tmp_path / "b.json").read_text())
    assert counts["backends"] == {"t1": served.requests}


async def test_locust_fails_against_another_ca(serve: Any, tmp_path: Path) -> None:
    served = await serve(_https_ctx(trustme.CA()))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
    code, output = await _locust(served.url, tmp_path / "other.pem", tmp_path / "b.json", tmp_path)
    assert code == 1, output[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in output
    assert served.requests == 0  # no request got past the handshake
    assert json.loads((tmp_path / "b.json").read_text())["backends"] == {}


async def test_step_shape_runs_its_steps_and_stops_by_itself(serve: Any, tmp_path: Path) -> None:
    ca = trustme.CA()
    served = await serve(_https_ctx(ca))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    shape = {"LB_SHAPE": "step", "LB_STEP_USERS": "1", "LB_STEP_SECONDS": "1", "LB_STEPS": "3"}
    # no -t: the shape ends the run after 3 steps of 1 s (bounded by _locust's 60 s)
    code, output = await _locust(
        served.url, tmp_path / "ca.pem", tmp_path / "b.json", tmp_path, shape=shape
    )
    assert code == 0, output[-2000:]
    assert served.requests > 0


async def test_unknown_shape_is_refused(serve: Any, tmp_path: Path) -> None:
    ca = trustme.CA()
    served = await serve(_https_ctx(ca))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    code, output = await _locust(
        served.url, tmp_path / "ca.pem", tmp_path / "b.json", tmp_path, shape={"LB_SHAPE": "ramp"}
    )
    assert code != 0
    assert "LB_SHAPE must be one of step, spike" in output
    assert served.requests == 0


async def test_https_without_ca_cert_warns_once_and_says_what_to_set(
    serve: Any, tmp_path: Path
) -> None:
    served = await serve(_https_ctx(trustme.CA()))
    code, output = await _locust(served.url, None, tmp_path / "b.json", tmp_path)
    assert code == 1, output[-2000:]  # every request fails verification...
    assert output.count("LB_CA_CERT is not set") == 1, output[-3000:]  # ...and it says why
    assert "Set LB_CA_CERT=pki/ca.crt" in output
    assert served.requests == 0


async def _admin(tmp_path: Path, algorithm: str) -> tuple[str, web.AppRunner]:
    async def state(request: web.Request) -> web.Response:
        return web.json_response({"algorithm": algorithm, "backends": []})

    app = web.Application()
    app.router.add_get("/api/state", state)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner


async def test_sticky_refuses_to_run_against_round_robin(serve: Any, tmp_path: Path) -> None:
    served = await serve(None)
    admin, runner = await _admin(tmp_path, "round-robin")
    try:
        extra = ("--scenario", "sticky", "--admin-url", admin)
        code, output = await _locust(served.url, None, tmp_path / "b.json", tmp_path, extra=extra)
    finally:
        await runner.cleanup()
    assert code == 2, output[-2000:]
    assert "the sticky scenario needs source hashing" in output
    assert "runs 'round-robin'" in output
    assert "sticky violation" not in output
    assert "LB_CA_CERT" not in output  # plain http: no certificate warning
    assert served.requests == 0


async def test_sticky_runs_against_source_hash(serve: Any, tmp_path: Path) -> None:
    served = await serve(None)
    admin, runner = await _admin(tmp_path, "source-hash")
    try:
        extra = ("--scenario", "sticky", "--admin-url", admin)
        code, output = await _locust(served.url, None, tmp_path / "b.json", tmp_path, extra=extra)
    finally:
        await runner.cleanup()
    assert code == 0, output[-2000:]
    assert "refusing to run" not in output
    assert served.requests > 0
