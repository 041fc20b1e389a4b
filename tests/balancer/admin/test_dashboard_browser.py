"""The live dashboard in headless Chromium: rows appear, a killed backend turns down, the
timeline records it; a screenshot lands in tests/artifacts/dashboard.png."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, BackendProc, Harness, LoadLoop, LocalStack
from harness.http import request
from harness.stack import PRIORITIES

# a missing selenium is a skip, like a missing browser, not a collection error
pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "tests" / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs the chromium and chromedriver binaries (apt-get install chromium "
        "chromium-driver)",
    ),
]


def api_state(admin_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin_url + "/api/state", timeout=5) as resp:
        state: dict[str, Any] = json.load(resp)
        return state


@pytest.fixture
def backends(harness: Harness) -> list[BackendProc]:
    return [harness.backend(f"b{i}") for i in range(3)]


@pytest.fixture
def balancer(harness: Harness, backends: list[BackendProc]) -> tuple[str, str]:
    """A `python -m balancer` child; (public address, admin url)."""
    # named as the demo backends call themselves: the rows show the name, the address beside
    named = (f"{b.address},name={b.name}" for b in backends)
    args = ["--listen", "127.0.0.1:0", *(a for spec in named for a in ("--backend", spec))]
    args += ["--admin", "127.0.0.1:0", "--check-interval", "0.3", "--check-timeout", "0.3"]
    lb = harness.balancer(*args, "--log-level", "warning")
    return f"{lb.host}:{lb.port}", lb.admin_url


@pytest.fixture
def traffic(balancer: tuple[str, str]) -> Iterator[LoadLoop[None]]:
    """A background client so the chart and rates have something to show (10 ms apart)."""
    host, port = balancer[0].rsplit(":", 1)

    def one() -> tuple[int, None]:
        time.sleep(0.01)
        return request(host, int(port), "/", timeout=2.0).status, None

    with LoadLoop(one, duration=120.0) as load:
        yield load


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
    backends: list[BackendProc],
    balancer: tuple[str, str],
    traffic: LoadLoop[None],
    driver: object,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    ids = [b.name for b in backends]
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
    # start-up is on the timeline: backends found, checks passing
    WebDriverWait(driver, 10, 0.1).until(
        lambda d: all({"added", "up"} <= set(timeline_kinds(i)) for i in ids)
    )
    assert "standalone" in driver.find_element(By.ID, "pair").text
    assert "plain HTTP" in driver.find_element(By.ID, "certs").text
    assert driver.find_element(By.ID, "role").text.lower() == "standalone"
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-backend]'))"
        ".map(r => [r.querySelector('td.id').textContent, r.querySelector('.addr').textContent])"
    )
    assert sorted(shown) == sorted([f"{b.name}{b.address}", b.address] for b in backends)
    assert driver.find_element(By.ID, "algorithm").get_attribute("value") == "round-robin"
    # a few seconds of traffic so the chart and the rates have history
    WebDriverWait(driver, 10, 0.2).until(lambda d: traffic.sent > 150)

    victim = backends[1]
    victim.signal(signal.SIGKILL)
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
    seen = traffic.sent
    WebDriverWait(driver, 10, 0.2).until(lambda d: traffic.sent > seen + 100)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_pair_and_certificate_panels_and_history_across_a_page_load(
    tmp_path: Path, driver: object
) -> None:
    """A TLS pair: b's page shows a as its active peer, then "unreachable" once a is killed;
    the certificate is shown with issuer and fingerprint; a reload starts with history."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    stack = LocalStack.ephemeral(
        pair=True, tls=True, pki_dir=tmp_path / "pki", workdir=tmp_path / "run", check_interval=0.3
    )
    with stack:
        assert stack.ca_file is not None
        ctx = ssl.create_default_context(cafile=stack.ca_file)

        def one() -> tuple[int, None]:
            time.sleep(0.01)
            return request(stack.host, stack.service_port, "/", ctx=ctx, timeout=2.0).status, None

        with LoadLoop(one, duration=120.0) as traffic:
            # history survives a page load: a new page of the active starts with its traffic
            driver.get(stack.admin_urls["a"] + "/")
            WebDriverWait(driver, 10, 0.2).until(lambda d: traffic.ok > 200)
            driver.refresh()

            def history(key: str) -> int:
                value = driver.execute_script(
                    "return document.getElementById('chart').dataset[arguments[0]]", key
                )
                return int(value or 0)

            WebDriverWait(driver, 10, 0.1).until(lambda d: history("historySteps") >= 2)
            assert history("historyRequests") > 100  # served before this page existed
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard-history.png"))

            driver.get(stack.admin_urls["b"] + "/")

            def pair() -> dict[str, str]:
                texts: dict[str, str] = driver.execute_script(
                    "return Object.fromEntries(Array.from(document.querySelectorAll("
                    "'#pair [data-testid^=pair-]')).map(e => [e.dataset.testid, e.textContent]))"
                )
                return texts

            WebDriverWait(driver, 10, 0.1).until(lambda d: pair().get("pair-peer-role") == "active")
            seen = pair()
            assert seen["pair-self-role"] == "passive"
            assert seen["pair-self-priority"] == str(PRIORITIES[1])
            assert seen["pair-peer-priority"] == str(PRIORITIES[0])
            assert seen["pair-peer-address"] == f"{stack.host}:{stack.election_ports[0]}"
            assert seen["pair-peer-advert"].endswith("s ago")

            leaf = x509.load_pem_x509_certificate((tmp_path / "pki" / "localhost.crt").read_bytes())
            cert: dict[str, str] = driver.execute_script(
                "const r = document.querySelector('#certs tr[data-testid=cert-row]');"
                "return r && {status: r.dataset.status, text: r.cells[0].textContent,"
                " issuer: r.querySelector('[data-testid=cert-issuer]').textContent,"
                " fp: r.querySelector('[data-testid=cert-fingerprint]').textContent};"
            )
            assert cert["status"] == "valid" and "localhost" in cert["text"]
            assert cert["issuer"] == leaf.issuer.rfc4514_string()
            assert cert["fp"] == leaf.fingerprint(hashes.SHA256()).hex(":").upper()
            # the expiry warning, on data of our own (one script: the page re-renders each second)
            statuses: list[str] = driver.execute_script(
                "const day = 86400000, now = Date.now();"
                "const c = (d) => ({names: ['x.test'], issuer: 'CN=t', sha256: 'AA',"
                " not_after: new Date(now + d * day).toISOString()});"
                "renderCerts({now: now / 1000, listener: {tls: true},"
                " certificates: [c(30), c(13), c(-1)]});"
                "return Array.from(document.querySelectorAll('#certs tr[data-testid=cert-row]'))"
                ".map(r => r.dataset.status);"
            )
            assert statuses == ["valid", "expires soon", "expired"]

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard-pair.png"))

            stack.kill_balancer("a")
            WebDriverWait(driver, 15, 0.1).until(
                lambda d: pair().get("pair-peer-role") == "unreachable"
            )
            WebDriverWait(driver, 10, 0.1).until(lambda d: pair()["pair-self-role"] == "active")
            seen = pair()
            assert seen["pair-peer-priority"] == str(PRIORITIES[0])  # last known, kept
            driver.execute_script(
                "const w = document.getElementById('window'); w.value = '600';"
                "w.dispatchEvent(new Event('change'));"
            )
            time_marker = traffic.sent
            WebDriverWait(driver, 10, 0.2).until(lambda d: traffic.sent > time_marker + 50)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard-pair-unreachable.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
