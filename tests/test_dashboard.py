"""The dashboard in a real browser (Debian's headless Chromium, driven by Selenium): an
operator signs in, sends the shared head CT with storescu, watches its job appear and end on
the jobs page without a reload, opens the study, and retries the dead deliveries once the PACS
(Orthanc) is up again: they arrive. A viewer sees no retry button and the API refuses them.
Every page is photographed into docs/screenshots/ (linked from the README).
"""

from __future__ import annotations

import base64
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pydicom
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from airouter.app import accounts
from airouter.core.db import Store
from airouter.core.vocab import Role
from tests.peers import (
    ROOT,
    Orthanc,
    free_port,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    tool,
    wait_for,
)

pytestmark = pytest.mark.integration

SCREENSHOTS = ROOT / "docs" / "screenshots"
OPERATOR, VIEWER = ("olga", "operator password"), ("vic", "viewer password")
ADMIN = ("ada", "admin password")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = tool("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(tool("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    """Wait for ``check`` in the live page; a fragment swapped meanwhile is looked at again."""

    def again() -> Any:
        try:
            return check()
        except (StaleElementReferenceException, WebDriverException):
            return None

    return wait_for(again, timeout_s, what, every_s=0.3)


def _shot(driver: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _sign_in(driver: WebDriver, base: str, who: tuple[str, str], shot: bool = False) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/dashboard/jobs")
    assert "/login" in driver.current_url  # sent to sign in, and back after
    driver.find_element(By.ID, "username").send_keys(who[0])
    driver.find_element(By.ID, "password").send_keys(who[1])
    if shot:
        _shot(driver, "login")
    driver.find_element(By.ID, "sign-in").click()
    _until("the jobs page", lambda: urlparse(driver.current_url).path == "/dashboard/jobs")
    assert driver.find_element(By.ID, "user").text == who[0]


def _rows(driver: WebDriver, table: str) -> list[dict[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table} tr[data-state]")
    return [
        {
            "id": r.get_attribute("data-job") or r.get_attribute("data-delivery") or "",
            "state": r.get_attribute("data-state") or "",
            "text": r.text,
        }
        for r in rows
    ]


def _post(url: str, auth: tuple[str, str]) -> int:
    request = urllib.request.Request(url, method="POST")
    basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_operator_watches_a_study_go_through_and_retries_dead_deliveries(
    tmp_path: Path, browser: WebDriver
) -> None:
    data = tmp_path / "node" / "var"
    data.mkdir(parents=True)
    store = Store(f"sqlite:///{data / 'airouter.db'}")
    accounts.add_user(store, *OPERATOR[:1], Role.OPERATOR, OPERATOR[1])
    accounts.add_user(store, *VIEWER[:1], Role.VIEWER, VIEWER[1])
    accounts.add_user(store, *ADMIN[:1], Role.ADMIN, ADMIN[1])
    _, token = accounts.create_token(store, OPERATOR[0], "test")
    pacs_dicom, pacs_http = free_port(), free_port()  # the PACS is down at first
    node = start_node(
        tmp_path / "node",
        None,
        token=token,
        dispatch={
            "backoff_s": 0.5,
            "max_attempts": 1,
            "destinations": {
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom}
            },
        },
    )
    orthanc: Orthanc | None = None
    base = node.url
    try:
        _sign_in(browser, base, OPERATOR, shot=True)
        browser.execute_script("window.notReloaded = true;")
        files = head_ct_files()
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        sent = storescu(node.dimse_port, files)
        assert sent.returncode == 0, sent.stderr

        # the job appears, runs and ends (failed: its deliveries died, the PACS is down)
        job = _until("the job on the page", lambda: _rows(browser, "jobs"), 120)[0]
        ended = _until(
            "the job to end on the page",
            lambda: next((r for r in _rows(browser, "jobs") if r["state"] == "failed"), None),
            240,
        )
        assert ended["id"] == job["id"] and "delivery to pacs failed" in ended["text"]
        assert browser.execute_script("return window.notReloaded === true;"), "page reloaded"
        assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"] .retry-job')
        _shot(browser, "jobs")

        # the study, opened from the studies page
        browser.get(f"{base}/dashboard/studies")
        _shot(browser, "studies")
        browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{study_uid}"] a').click()
        _until("the study page", lambda: browser.find_element(By.ID, "study-uid").text == study_uid)
        series = browser.find_element(By.ID, "series").text
        assert "CT" in series and "140" in series
        assert len(_rows(browser, "deliveries")) == 3
        facts = [dt.text for dt in browser.find_elements(By.CSS_SELECTOR, "dl.facts dt")]
        assert "Patient" in facts  # an operator may see who it is (a viewer may not: below)
        _shot(browser, "study")

        # the PACS comes up; the operator retries the dead deliveries from the outbox
        orthanc = start_orthanc(tmp_path / "pacs", http_port=pacs_http, dicom_port=pacs_dicom)
        browser.get(f"{base}/dashboard/outbox?state=dead")
        dead = _until("three dead deliveries", lambda: len(_rows(browser, "deliveries")) == 3)
        assert dead
        browser.get(f"{base}/dashboard/outbox")
        browser.execute_script("window.notReloaded = true;")
        for delivery in [r["id"] for r in _rows(browser, "deliveries")]:
            _until(
                f"retry of delivery {delivery}",
                lambda d=delivery: (
                    browser.find_element(  # type: ignore[misc]
                        By.CSS_SELECTOR, f'tr[data-delivery="{d}"] .retry-delivery'
                    ).click()
                    or True
                ),
            )
            _until(
                "the answer in the status line",
                lambda: "pending" in browser.find_element(By.ID, "action-result").text,
            )
        _until(
            "the three deliveries sent, on the page",
            lambda: [r["state"] for r in _rows(browser, "deliveries")] == ["sent"] * 3,
            120,
        )
        assert browser.execute_script("return window.notReloaded === true;")
        assert orthanc is not None
        pacs = orthanc
        arrived = _until(
            "SEG, SR and RTSTRUCT in Orthanc", lambda: len(pacs.get("/instances") or []) == 3
        )
        assert arrived
        modalities = sorted(
            pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in pacs.get("/series")
        )
        assert modalities == ["RTSTRUCT", "SEG", "SR"]
        _shot(browser, "outbox")
        browser.get(f"{base}/dashboard/jobs")
        _until("the job done", lambda: _rows(browser, "jobs")[0]["state"] == "done")

        # the other pages, for the record (and each must render)
        browser.get(f"{base}/dashboard")
        _until("the overview", lambda: browser.find_element(By.ID, "triton").text == "ready")
        errors = browser.find_element(By.ID, "errors").text
        assert "delivery_dead" in errors and "job_failed" in errors  # what went wrong, kept
        _shot(browser, "overview")
        browser.get(f"{base}/dashboard/rules?study={study_uid}")
        assert (
            browser.find_element(By.ID, "rules").text
            and browser.find_element(By.ID, "dry-result").text
        )
        _shot(browser, "rules")
        browser.get(f"{base}/dashboard/models")
        assert browser.find_elements(By.CSS_SELECTOR, "#models .card")
        _shot(browser, "models")
        browser.get(f"{base}/dashboard/audit?user={OPERATOR[0]}")
        audit = browser.find_element(By.ID, "audit").text
        assert "delivery_retry" in audit or "http_request" in audit
        _shot(browser, "audit")

        # an admin makes a token for the viewer on the users page (shown once)
        assert not browser.find_elements(By.ID, "nav-users")  # an operator has no users page
        _sign_in(browser, base, ADMIN)
        browser.get(f"{base}/dashboard/users")
        browser.find_element(By.CSS_SELECTOR, f'tr[data-user="{VIEWER[0]}"] .new-token').click()
        shown = _until(
            "the new token",
            lambda: "air_" in (t := browser.find_element(By.ID, "action-result").text) and t,
        )
        viewer_token = shown.split(": ", 1)[1].split(" ", 1)[0]
        _until(
            "the token listed", lambda: "dashboard" in browser.find_element(By.ID, "tokens").text
        )
        _shot(browser, "users")
        request = urllib.request.Request(f"{base}/api/jobs")
        request.add_header("Authorization", f"Bearer {viewer_token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

        # a viewer: no action buttons, no patient identifiers, and the API says 403
        _sign_in(browser, base, VIEWER)
        assert _rows(browser, "jobs") and not browser.find_elements(By.CSS_SELECTOR, ".retry-job")
        browser.get(f"{base}/dashboard/outbox")
        assert _rows(browser, "deliveries")
        assert not browser.find_elements(By.CSS_SELECTOR, ".retry-delivery")
        browser.get(f"{base}/dashboard/studies")
        assert "Patient ID" not in browser.find_element(By.ID, "studies").text
        patient = pydicom.dcmread(files[0], stop_before_pixels=True)
        browser.get(f"{base}/dashboard/studies/{study_uid}")
        facts = [dt.text for dt in browser.find_elements(By.CSS_SELECTOR, "dl.facts dt")]
        assert facts and "Patient" not in facts and "Accession" not in facts
        assert str(patient.PatientID) not in browser.find_element(By.TAG_NAME, "main").text
        refused = _post(f"{base}/api/jobs/{job['id']}/retry", VIEWER)
        assert refused == 403
        assert _post(f"{base}/api/deliveries/1/retry", VIEWER) == 403
    except Exception:
        (tmp_path / "page.html").write_text(browser.page_source)  # what the browser showed
        raise
    finally:
        stop_process(node.process)
        if orthanc is not None:
            stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()


def test_no_page_links_outside_the_node() -> None:
    """The pages work offline in a hospital network: no template names a script, style or
    font of another server (htmx is served by the node)."""
    templates = ROOT / "airouter" / "app" / "web" / "templates"
    for page in templates.glob("*.html"):
        text = page.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, page
    assert (ROOT / "airouter" / "app" / "web" / "static" / "vendor" / "htmx.min.js").is_file()
    assert shutil.which("chromium")  # what the browser test drives
