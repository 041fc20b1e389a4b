"""The live dashboard in headless Chromium: rows appear, a killed backend turns down, the
timeline records it; a screenshot lands in tests/artifacts/dashboard.png."""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.testing import BackendProcess, spawn_backend_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs the chromium and chromedriver binaries (apt-get install chromium "
        "chromium-driver)",
    ),
]


def _read_until(
    proc: subprocess.Popen[bytes], markers: tuple[str, ...], timeout: float
) -> dict[str, str]:
    """Read the child's stdout until every marker was seen on some line (bounded)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    found: dict[str, str] = {}
    while time.monotonic() < deadline and len(found) < len(markers):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            found.update({m: line for m in markers if m in line})
    if len(found) < len(markers):
        raise RuntimeError(f"balancer did not print {markers!r}; stdout so far: {buf!r}")
    return found


def api_state(admin_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin_url + "/api/state", timeout=5) as resp:
        state: dict[str, Any] = json.load(resp)
        return state


@pytest.fixture
def backends() -> Iterator[list[BackendProcess]]:
    procs: list[BackendProcess] = []
    try:
        for i in range(3):
            procs.append(spawn_backend_process(f"b{i}"))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def balancer(backends: list[BackendProcess]) -> Iterator[tuple[str, str]]:
    """A `python -m balancer` child; yields (public address, admin url)."""
    cmd = [sys.executable, "-m", "balancer", "--listen", "127.0.0.1:0"]
    for b in backends:
        cmd += ["--backend", f"{b.host}:{b.port}"]
    cmd += ["--admin", "127.0.0.1:0", "--check-interval", "0.3", "--check-timeout", "0.3"]
    cmd += ["--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, env=env, cwd=str(ROOT))
        try:
            try:
                lines = _read_until(proc, ("listening on", "admin on"), 15)
            except RuntimeError as exc:
                errlog.seek(0)
                raise RuntimeError(f"{exc}; stderr: {errlog.read(4000)!r}") from None
            yield lines["listening on"].rsplit("//", 1)[1], lines["admin on"].rsplit(" ", 1)[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def traffic(balancer: tuple[str, str]) -> Iterator[list[int]]:
    """A background client so the chart and rates have something to show."""
    host, port = balancer[0].rsplit(":", 1)
    stop = threading.Event()
    statuses: list[int] = []

    def run() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        for _ in range(100_000):  # bounded; normally ended by `stop`
            if stop.is_set():
                break
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=2)
            time.sleep(0.01)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield statuses
    stop.set()
    thread.join(10)


@pytest.fixture
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield drv
    finally:
        drv.quit()


def test_dashboard_shows_a_killed_backend_going_down(
    backends: list[BackendProcess],
    balancer: tuple[str, str],
    traffic: list[int],
    driver: object,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    ids = [f"{b.host}:{b.port}" for b in backends]
    driver.get(balancer[1] + "/")

    # the page re-renders every second: read the DOM in one script, not element by element
    def states() -> dict[str, str]:
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('tr[data-backend]'))"
            ".map(r => [r.dataset.backend, r.dataset.state, r.querySelector('.pill').textContent])"
        )
        return {bid: state for bid, state, pill in rows if pill.lower() == state}

    def timeline_kinds(backend: str) -> list[str]:
        kinds: list[str] = driver.execute_script(
            "return Array.from(document.querySelectorAll('#timeline li[data-testid=event]'))"
            ".filter(li => li.dataset.backend === arguments[0]).map(li => li.dataset.kind)",
            backend,
        )
        return kinds

    WebDriverWait(driver, 10, 0.1).until(lambda d: states() == dict.fromkeys(ids, "up"))
    assert driver.find_element(By.ID, "role").text.lower() == "standalone"
    assert driver.find_element(By.ID, "algorithm").get_attribute("value") == "round-robin"
    # a few seconds of traffic so the chart and the rates have history
    WebDriverWait(driver, 10, 0.2).until(lambda d: len(traffic) > 150)

    victim = backends[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    WebDriverWait(driver, 10, 0.1).until(lambda d: states()[ids[1]] in ("down", "ejected"))
    WebDriverWait(driver, 10, 0.1).until(
        lambda d: {"down", "ejected"} & set(timeline_kinds(ids[1]))
    )
    assert states()[ids[0]] == "up"
    assert states()[ids[2]] == "up"

    # the controls work (no token configured: loopback may mutate)
    driver.execute_script(
        "document.querySelector(`tr[data-backend='${arguments[0]}'] button[data-action=drain]`)"
        ".click()",
        ids[0],
    )
    WebDriverWait(driver, 10, 0.1).until(lambda d: states().get(ids[0]) == "drained")
    WebDriverWait(driver, 10, 0.1).until(lambda d: "drain" in timeline_kinds(ids[0]))
    driver.execute_script(
        "const s = document.getElementById('algorithm'); s.value = 'least-connections';"
        "s.dispatchEvent(new Event('change'));"
    )
    for _ in range(50):  # bounded wait for the PUT the page sent
        if api_state(balancer[1])["algorithm"] == "least-connections":
            break
        time.sleep(0.1)
    assert api_state(balancer[1])["algorithm"] == "least-connections"
    # let the chart show the shift, then keep a picture for humans
    seen = len(traffic)
    WebDriverWait(driver, 10, 0.2).until(lambda d: len(traffic) > seen + 100)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
