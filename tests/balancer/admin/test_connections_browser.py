"""The dashboard's Connections view in headless Chromium: the live table fills and sorts, a
row opens its detail (SYN options, TLS, TCP_INFO over time), the close shows who sent the
first FIN, and the state counts, TLS mix and per-backend charts are drawn. A screenshot
lands in tests/artifacts/connections.png."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO, LoadLoop, LocalStack
from harness.http import request

pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "tests" / "artifacts"
DASH = "\u2013"  # what the page shows for "no value"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs the chromium and chromedriver binaries (apt-get install chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1500,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield drv
    finally:
        drv.quit()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_connections_view_table_detail_and_close(
    tmp_path: Path, driver: object, workers: str
) -> None:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    stack = LocalStack.ephemeral(
        tls=True,
        pki_dir=tmp_path / "pki",
        workdir=tmp_path / "run",
        balancer_args=("--workers", workers),
    )
    with stack:
        assert stack.ca_file is not None
        ctx = ssl.create_default_context(cafile=stack.ca_file)

        def one() -> tuple[int, None]:
            time.sleep(0.02)
            return request(stack.host, stack.service_port, "/", ctx=ctx, timeout=2.0).status, None

        # one keep-alive connection of our own, with SNI, to pick in the table
        mine = http.client.HTTPSConnection("localhost", stack.service_port, context=ctx, timeout=5)
        mine.request("GET", "/")
        assert mine.getresponse().read() is not None
        assert mine.sock is not None
        peer = f"127.0.0.1:{mine.sock.getsockname()[1]}"

        with LoadLoop(one, duration=120.0) as traffic:
            driver.get(stack.admin_urls["a"] + "/")
            driver.execute_script("document.querySelector('[data-view=connections]').click()")

            def rows() -> list[list[str]]:
                got: list[list[str]] = driver.execute_script(
                    "return Array.from(document.querySelectorAll('#conns tbody tr'))"
                    ".map(r => [r.dataset.side, r.cells[3].textContent, r.cells[6].textContent,"
                    " r.cells[r.cells.length - 1].textContent])"
                )
                return got

            WebDriverWait(driver, 10, 0.2).until(
                lambda d: (
                    {"client", "backend"} <= {r[0] for r in rows()}
                    and any(r[1] == peer for r in rows())
                )
            )
            WebDriverWait(driver, 10, 0.2).until(lambda d: traffic.ok > 30)
            # each row names the process that holds it: the balancer, or one of its workers
            state = stack.balancers[0].state()
            holders = {str(w["pid"]) for w in state["workers"]} or {str(stack.balancers[0].pid)}
            assert {r[3] for r in rows()} <= holders
            # sortable: rtt ms, ascending then descending
            driver.execute_script("document.querySelector('th[data-sort=rtt_ms]').click()")
            rtts = [float(r[2]) for r in rows() if r[2] not in (DASH, "")]
            assert rtts == sorted(rtts)
            driver.execute_script("document.querySelector('th[data-sort=rtt_ms]').click()")
            rtts = [float(r[2]) for r in rows() if r[2] not in (DASH, "")]
            assert rtts == sorted(rtts, reverse=True)

            driver.execute_script(
                "Array.from(document.querySelectorAll('#conns tbody tr'))"
                ".find(r => r.cells[3].textContent === arguments[0]).click()",
                peer,
            )

            def detail() -> dict[str, str]:
                got: dict[str, str] = driver.execute_script(
                    "const d = document.getElementById('conn-detail');"
                    "if (d.hidden) return {};"
                    "return Object.fromEntries(Array.from(d.querySelectorAll('[data-testid^=d-]'))"
                    ".map(e => [e.dataset.testid, e.textContent]));"
                )
                return got

            WebDriverWait(driver, 10, 0.2).until(lambda d: "d-mss" in detail())
            seen = detail()
            assert int(seen["d-mss"]) > 0 and seen["d-SACK-permitted"] == "true"
            assert seen["d-version"] == "TLSv1.3" and seen["d-SNI"] == "localhost"
            assert seen["d-ALPN"] in (DASH, "http/1.1")
            assert float(seen["d-rtt-ms"]) > 0 and int(seen["d-cwnd"]) > 0
            assert seen["d-first-FIN"] == "none yet"

            mine.close()  # we, the client, send the first FIN: TIME_WAIT is ours
            WebDriverWait(driver, 10, 0.2).until(lambda d: detail().get("d-first-FIN") == "peer")
            assert detail()["d-TIME-WAIT-held-by"] == "peer"

            def states() -> str:  # /api/tcp every 2 s
                text: str = driver.execute_script(
                    "return document.getElementById('tcp-states').textContent"
                )
                return text

            WebDriverWait(driver, 10, 0.2).until(
                lambda d: "LISTEN" in states() and "ESTABLISHED" in states()
            )
            WebDriverWait(driver, 10, 0.2).until(
                lambda d: (
                    "TLSv1.3"
                    in d.execute_script("return document.getElementById('tls-mix').textContent")
                )
            )
            # the per-backend RTT chart has drawn something
            WebDriverWait(driver, 10, 0.2).until(
                lambda d: d.execute_script(
                    "const c = document.getElementById('chart-rtt');"
                    "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                    "for (let i = 3; i < px.length; i += 4) if (px[i]) return true;"
                    "return false;"
                )
            )
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(
                str(
                    ARTIFACTS / ("connections.png" if workers == "1" else "connections-workers.png")
                )
            )
            # read the log while the balancer runs: the page keeps polling until it is gone
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            driver.get("about:blank")
    assert errors == []
