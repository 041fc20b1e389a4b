"""The dashboard's Workers panel in headless Chromium: one row per worker with its pid,
and a killed worker shows up restarted under a new pid, its restart counted."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator

import pytest

from harness import LocalStack

pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs the chromium and chromedriver binaries",
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
    drv = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield drv
    finally:
        drv.quit()


def test_the_workers_panel_shows_each_worker_and_a_restart(driver: object) -> None:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    with LocalStack.ephemeral(balancer_args=("--workers", "2")) as st:
        bal = st.balancers[0]
        driver.get(bal.admin_url + "/")

        def rows() -> list[list[str]]:
            found: list[list[str]] = driver.execute_script(
                "const p = document.getElementById('workers-panel');"
                "if (p.hidden) return [];"
                "return Array.from(document.querySelectorAll('tr[data-testid=worker-row]'))"
                ".map(r => Array.from(r.cells).map(c => c.textContent))"
            )
            return found

        pids = [str(w["pid"]) for w in bal.state()["workers"]]
        WebDriverWait(driver, 10, 0.1).until(lambda d: [r[1] for r in rows()] == pids)
        os.kill(int(pids[0]), signal.SIGKILL)
        # the row comes back under a new pid, with one restart counted
        WebDriverWait(driver, 10, 0.1).until(
            lambda d: (r := rows()) and r[0][1] not in (pids[0], "restarting") and r[0][6] == "1"
        )
        assert rows()[1][1] == pids[1]
