"""The web page in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium; no download).

Signs in through the form, searches for the CT patient, opens the study and the
lossy series' viewer, waits for the difference image, then scrolls a slice and
changes the window and sees the image URLs follow. The server sends the real
Content-Security-Policy, so a blocked script or style would show here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from archive.catalog.models import Derivation, Series, Study
from archive.kinds import DerivationKind
from tests.integration.api.conftest import TOKEN, Served

CHROMIUM = os.environ.get("MEDARCHIVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MEDARCHIVE_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 10.0


def _browser() -> tuple[str, str]:
    chromium = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    pytest.fail("chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver; "
                "bash .ci/run installs them)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(WAIT * 2)
    try:
        yield driver
    finally:
        driver.quit()


def _lossy_series(served: Served) -> str:
    with served.archive.unit_of_work() as uow:
        uid = uow.session.scalar(
            select(Series.series_uid).join(Study).join(Derivation, Derivation.series_id == Series.id)
            .where(Study.study_uid == served.ct_study_uid, Derivation.kind == DerivationKind.LOSSY))
    assert uid is not None
    return uid


def test_sign_in_find_the_study_and_see_the_difference_image(browser: Any, served: Served) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    with served.archive.unit_of_work() as uow:
        patient_id = uow.session.scalar(select(Study.patient_id).where(Study.study_uid == served.ct_study_uid))
    assert patient_id
    lossy_uid = _lossy_series(served)

    browser.get(served.url + "/")
    token = wait.until(ec.presence_of_element_located((By.NAME, "token")))  # not signed in: the sign-in form
    token.send_keys(TOKEN)
    token.submit()
    search = wait.until(ec.presence_of_element_located((By.NAME, "patient")))
    search.send_keys(patient_id)
    search.submit()
    wait.until(ec.staleness_of(search))  # the filtered page replaced the list (whose link would go stale)
    link = wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f'tr[data-study="{served.ct_study_uid}"] a')))
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-study="{served.html_study_uid}"]')
    link.click()

    def loaded(name: str, by: str = By.ID) -> Any:
        def check(driver: Any) -> Any:
            image = driver.find_element(by, name if by != By.ID else f"pane-{name}")
            ok = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
            return image if ok else False
        return check

    row = f'tr[data-series="{lossy_uid}"]'
    wait.until(loaded(f"{row} td.thumb img", By.CSS_SELECTOR))  # the WADO thumbnail, authenticated by the cookie
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"{row} td:last-child a"))).click()

    difference = wait.until(loaded("difference"))
    assert difference.get_attribute("naturalWidth") == "512"
    original = wait.until(loaded("original"))
    before = original.get_attribute("src")
    assert "window=" in before

    # the window: a preset, then a typed width
    centre, width = browser.find_element(By.ID, "wc"), browser.find_element(By.ID, "ww")
    width.send_keys(Keys.CONTROL, "a")
    width.send_keys("123")
    wait.until(lambda d: "123" in (d.find_element(By.ID, "pane-original").get_attribute("src") or ""))
    assert "123" in browser.find_element(By.ID, "pane-reconstruction").get_attribute("src")
    assert "window" not in browser.find_element(By.ID, "pane-difference").get_attribute("src")
    wait.until(loaded("original"))
    assert centre.get_attribute("value")

    # slice scrolling: the lossy series has one slice, the MR series eight
    with served.archive.unit_of_work() as uow:
        mr_series = uow.session.scalar(select(Series.series_uid).join(Study).where(
            Study.study_uid == served.mr_study_uid, Series.derived_from_id.is_(None)))
    browser.get(f"{served.url}/ui/studies/{served.mr_study_uid}/series/{mr_series}")
    first = wait.until(loaded("reconstruction")).get_attribute("src")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(By.ID, "pane-reconstruction").get_attribute("src") != first)
    second = wait.until(loaded("reconstruction")).get_attribute("src")
    browser.execute_script(
        "arguments[0].dispatchEvent(new WheelEvent('wheel', {deltaY: 100, bubbles: true, cancelable: true}))",
        browser.find_element(By.CSS_SELECTOR, ".panes"))
    wait.until(lambda d: d.find_element(By.ID, "pane-reconstruction").get_attribute("src") not in (first, second))
    assert browser.find_element(By.ID, "slice").get_attribute("value") != "3"

    browser.find_element(By.CSS_SELECTOR, "#sign-out button").click()  # signed out: the sign-in form again
    wait.until(ec.presence_of_element_located((By.NAME, "token")))
    browser.get(served.url + "/")
    assert browser.find_elements(By.NAME, "token") and not browser.find_elements(By.NAME, "patient")

    # script errors and policy violations (network entries: the 401 before signing in, a missing favicon)
    problems = [entry["message"] for entry in browser.get_log("browser")
                if "Content Security Policy" in entry["message"]
                or (entry["level"] == "SEVERE" and entry.get("source") != "network")]
    assert not problems, problems
