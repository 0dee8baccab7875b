"""The status page in a real headless browser (the distribution's Chromium and ChromeDriver,
installed by .ci/run): it asks for a key, refuses a client's, and shows the champion,
traffic, drift, detector rates and alerts to an administrator."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import httpx
import numpy as np
import pytest

from tests.serving_support import add_client, running_service

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("Chromium and ChromeDriver are not installed (.ci/run installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mlsec-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _show(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "show").click()


def test_status_page_shows_the_champion_traffic_drift_detectors_and_alerts(two_versions, browser, monkeypatch, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ws, _ = two_versions
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    admin, viewer = add_client(ws, f"page-admin-{time.time_ns()}", admin=True), add_client(ws, f"viewer-{time.time_ns()}")
    with running_service(ws, ["serving.alerts.window=20"]) as (url, service):
        noise = np.random.default_rng(0).random((30, 64)).tolist()       # noise: flagged, and an evasion alert
        assert httpx.post(f"{url}/v1/predict", json={"inputs": noise}, headers={"Authorization": f"Bearer {viewer}"},
                          timeout=60).status_code == 200
        service.flush()
        browser.get(f"{url}/status")
        assert browser.find_element(By.ID, "content").get_attribute("hidden") is not None
        _show(browser, viewer)
        WebDriverWait(browser, 30).until(lambda d: "403" in d.find_element(By.ID, "message").text)
        assert not browser.find_element(By.ID, "content").is_displayed()
        _show(browser, admin)
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "content").is_displayed())
        champion = browser.find_element(By.ID, "champion").text
        assert service.host.current.version in champion and "mlsec-digits" in champion
        assert "images" in champion
        traffic = browser.find_element(By.ID, "traffic").text
        import re

        rows = re.search(r"^rows (\d+)$", traffic, re.M)
        assert rows and int(rows.group(1)) >= 30, traffic                # at least this test's rows, logged
        assert "drift" in browser.find_element(By.ID, "drift").text.lower()
        detectors = browser.find_element(By.ID, "detectors").text
        assert "held-out false positives" in detectors and "PGD detection" in detectors
        WebDriverWait(browser, 30).until(lambda d: "evasion" in d.find_element(By.ID, "alerts").text)
        assert admin not in browser.page_source                           # the key is not written into the page
        browser.save_screenshot(str(tmp_path / "status.png"))
        if os.environ.get("MLSEC_KEEP_SCREENSHOT"):
            shutil.copy(tmp_path / "status.png", os.environ["MLSEC_KEEP_SCREENSHOT"])
