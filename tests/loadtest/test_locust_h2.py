"""Locust's h2 scenario against a real balancer over TLS (verified against our CA): every
stream succeeds and the streams of one connection reach every backend under round robin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import Harness

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def test_the_h2_scenario_spreads_one_connections_streams(harness: Harness, tmp_path: Path) -> None:
    stack = harness.stack(tls=True, pki_dir=tmp_path / "pki")
    assert stack.ca_file is not None
    out = tmp_path / "b.json"
    argv = [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE)]
    argv += ["-u", "2", "-r", "2", "-t", "4s", "--only-summary", "--scenario", "h2"]
    argv += ["--host", stack.service_url, "--backends-out", str(out)]
    env = {**os.environ, "LB_CA_CERT": stack.ca_file}
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    counts = json.loads(out.read_text())
    h2 = counts["h2"]
    assert h2["streams"] == 10 * h2["batches"] > 0
    assert h2["backends_per_connection"] == 3.0  # round robin: every batch reached all three
    assert set(counts["backends"]) == {"b1", "b2", "b3"}
