"""The OHIF viewer at /viewer and the review page, in a real browser (Debian's headless
Chromium, driven by Selenium), on a study the node processed itself.

An operator signs in; a synthetic chest CT goes through a ``review: required`` rule (the
shipped body and lung models on the node's own Triton). On the job's review page the
operator opens the viewer, which shows the CT with the SEG's segments, the RTSTRUCT's
structures and the SR's measurements; back on the review page they untick one structure and
approve: what reaches the destination holds only the others. Screenshots go to
docs/screenshots/ (linked from the README). Also: the viewer's files need a user, its
settings name the node's DICOMweb, and a file it does not have is a 404."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pydicom
import pytest
import yaml
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from airouter.app import accounts
from airouter.app.web.viewer import VIEWER_DIR
from airouter.core.db import Store
from airouter.core.vocab import Role
from tests.peers import ROOT, start_node, stop_process, storescu, tool, wait_for
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

SCREENSHOTS = ROOT / "docs" / "screenshots"
OPERATOR = ("rita", "reviewer password")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = tool("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--use-angle=swiftshader",  # WebGL without a GPU: OHIF draws with it
        "--enable-unsafe-swiftshader",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(tool("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    def again() -> Any:
        try:
            return check()
        except WebDriverException:
            return None

    return wait_for(again, timeout_s, what, every_s=0.5)


def _text(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def _shot(driver: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _open_viewer(driver: WebDriver, url: str) -> None:
    # OHIF's first-use tour, marked as seen (as a user's "Skip all" would): it comes up at
    # its own pace and would cover the viewport
    if not urlparse(driver.current_url).path.startswith("/viewer/"):
        driver.get(url.split("/viewer/", 1)[0] + "/viewer/app-config.js")
    driver.execute_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    driver.get(url)
    _until("the viewer's study browser", lambda: "AI segmentation" in _text(driver), 90)
    assert not driver.find_elements(By.XPATH, "//*[text()='Skip all']")


def _load(driver: WebDriver, series_description: str) -> None:
    """Open a series of the study browser in the viewport (as a user double-clicks it), and
    say yes when the viewer asks whether to load a segmentation."""
    thumbnail = driver.find_element(By.XPATH, f"//*[text()='{series_description}']")
    ActionChains(driver).double_click(thumbnail).perform()

    def answered() -> bool:
        for yes in driver.find_elements(By.XPATH, "//button[normalize-space()='Yes']"):
            yes.click()
            return True
        return False

    _until(f"the viewer to ask about {series_description}", answered, 60)


def _panel(driver: WebDriver, button: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'[data-cy="{button}"]').click()


def test_operator_reviews_in_the_viewer_and_sends_chosen_structures(
    tmp_path: Path, browser: WebDriver
) -> None:
    assert (VIEWER_DIR / "index.html").is_file(), "make install puts OHIF in place"
    data = tmp_path / "node" / "var"
    data.mkdir(parents=True)
    accounts.add_user(Store(f"sqlite:///{data / 'airouter.db'}"), OPERATOR[0], Role.OPERATOR,
                      OPERATOR[1])  # fmt: skip
    _, token = accounts.create_token(Store(f"sqlite:///{data / 'airouter.db'}"), OPERATOR[0], "t")
    rules, outbox = tmp_path / "rules", tmp_path / "tps"
    rules.mkdir()
    rule = {
        "name": "reviewed-contours",
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": ["ct-body", "ct-lungs"],
        "outputs": ["SEG", "SR", "RTSTRUCT"],
        "destinations": ["tps"],
        "review": "required",
    }
    (rules / "review.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    node = start_node(
        tmp_path / "node",
        None,
        token=token,
        router={"rules_dir": str(rules), "quiet_period_s": 0.5},
        dispatch={"destinations": {"tps": {"kind": "folder", "path": str(outbox)}}},
    )
    try:
        base = node.url
        # the viewer is behind the login; its settings point at the node's own DICOMweb
        for path in ("/viewer/", "/viewer/app-config.js"):
            try:
                urllib.request.urlopen(base + path, timeout=10)
                raise AssertionError(f"{path} answered without a user")
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
        config = urllib.request.Request(base + "/viewer/app-config.js")
        config.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(config, timeout=10) as response:
            text = response.read().decode()
        assert 'window.location.origin + "/dicomweb"' in text and "routerBasename" in text
        missing = urllib.request.Request(base + "/viewer/no-such-bundle.js")
        missing.add_header("Authorization", f"Bearer {token}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(missing, timeout=10)
        assert refused.value.code == 404

        p = chest_phantom(slices=40, size=128)
        study, files = write_ct_series(p.hu, p.affine, tmp_path / "ct", patient_id="VIEW-1")
        assert storescu(node.dimse_port, files).returncode == 0
        job = wait_for(
            lambda: next(
                (j for j in node.get("/api/jobs") or [] if j["state"] == "awaiting_review"), None
            ),
            240,
            "the job to await review",
        )

        # sign in, straight to the job's review page
        browser.get(f"{base}/dashboard/jobs/{job['id']}/review")
        assert "/login" in browser.current_url
        browser.find_element(By.ID, "username").send_keys(OPERATOR[0])
        browser.find_element(By.ID, "password").send_keys(OPERATOR[1])
        browser.find_element(By.ID, "sign-in").click()
        _until("the review page", lambda: browser.find_element(By.ID, "review-form"))
        boxes = browser.find_elements(By.CSS_SELECTOR, "#review-form input[name=structure]")
        assert {b.get_attribute("value") for b in boxes} == {"Body", "Right Lung", "Left Lung"}
        _shot(browser, "review")
        review_page = browser.current_url
        viewer_url = browser.find_element(By.ID, "open-viewer").get_attribute("href")
        assert viewer_url and urlparse(viewer_url).path == "/viewer/viewer"

        # the viewer: the CT, the SEG's segments, the RTSTRUCT's structures, the SR's labels
        _open_viewer(browser, viewer_url)
        _shot(browser, "viewer-ct")
        _load(browser, "AI segmentation")
        _panel(browser, "panelSegmentation-btn")
        for name in ("Body", "Right Lung", "Left Lung"):
            _until(f"segment {name} in the panel", lambda n=name: n in _text(browser))
        assert "AI segmentation" in _text(browser)
        _shot(browser, "viewer-seg")

        _open_viewer(browser, viewer_url)
        _load(browser, "AI structures")
        _panel(browser, "panelSegmentation-btn")
        _until(
            "the RTSTRUCT's structures in the panel",
            lambda: all(n in _text(browser) for n in ("Body", "Right Lung", "Left Lung")),
        )
        _shot(browser, "viewer-rtstruct")

        _open_viewer(browser, viewer_url)
        thumbnail = browser.find_element(By.XPATH, "//*[text()='AI measurements']")
        ActionChains(browser).double_click(thumbnail).perform()
        labels = _until(
            "the SR's measurement labels on the image",
            lambda: (t := _text(browser)) and "Volume:" in t and "Area:" in t and t,
        )
        assert "Attenuation Coefficient:" in labels
        _shot(browser, "viewer-sr")
        errors = [
            e["message"]
            for e in browser.get_log("browser")
            if "Error Boundary" in e["message"] or "Something went wrong" in e["message"]
        ]
        assert errors == []

        # back to the review: send the lungs only
        browser.get(review_page)
        _until("the review form", lambda: browser.find_element(By.ID, "review-form"))
        browser.find_element(By.CSS_SELECTOR, "input[name=structure][value=Body]").click()
        browser.find_element(By.ID, "approve").click()
        _until(
            "the study's page after approval",
            lambda: urlparse(browser.current_url).path == f"/dashboard/studies/{study}",
        )
        # the study's page shows a thumbnail of each image series (the CT, the SEG)
        thumbs = _until(
            "the series thumbnails",
            lambda: (
                (t := browser.find_elements(By.CSS_SELECTOR, "#series td.thumb img"))
                and len(t) >= 2
                and all(
                    browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in t
                )
                and t
            ),
        )
        assert len(thumbs) >= 2
        written = wait_for(
            lambda: (f := sorted(outbox.rglob("*.dcm"))) and len(f) == 3 and f, 240, "3 objects"
        )
        by_modality = {pydicom.dcmread(f).Modality: pydicom.dcmread(f) for f in written}
        seg, rt = by_modality["SEG"], by_modality["RTSTRUCT"]
        assert {s.SegmentLabel for s in seg.SegmentSequence} == {"Right Lung", "Left Lung"}
        assert {r.ROIName for r in rt.StructureSetROISequence} == {"Right Lung", "Left Lung"}
        events = node.get(f"/api/events?study={study}&kind=review_approved") or []
        assert events and events[0]["user"] == OPERATOR[0]
    finally:
        stop_process(node.process)
    assert "Traceback" not in node.log_text()


def test_rewrite_moves_a_root_build_under_the_prefix(tmp_path: Path) -> None:
    """What the install changes in OHIF's build, on a miniature of it."""
    from airouter.app.web.viewer import rewrite

    (tmp_path / "index.html").write_text(
        '<script>window.PUBLIC_URL="/"</script><link href="/app.bundle.css">'
        '<script src="/app-config.js"></script><script src="/init-service-worker.js"></script>'
        '<a href="//cdn.example">x</a>'
    )
    (tmp_path / "app.bundle.1234567890abcdef.js").write_text(
        '__webpack_require__.p = "/";\n'
        "const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;\n"
    )
    (tmp_path / "app.bundle.css").write_text("@font-face{src:url(/a.woff2)}")
    (tmp_path / "manifest.json").write_text('{"icons": [{"src": "/assets/x.png"}]}')
    (tmp_path / "sw.js").write_text("")
    assert rewrite(tmp_path, "/viewer/") == 4
    index = (tmp_path / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in index and 'href="/viewer/app.bundle.css"' in index
    assert 'src="/viewer/app-config.js"' in index and "init-service-worker" not in index
    assert 'href="//cdn.example"' in index  # not a path of ours
    js = (tmp_path / "app.bundle.1234567890abcdef.js").read_text()
    assert '__webpack_require__.p = "/viewer/";' in js and "coords[0]?.Referenced" in js
    assert "url(/viewer/a.woff2)" in (tmp_path / "app.bundle.css").read_text()
    assert '"/viewer/assets/x.png"' in (tmp_path / "manifest.json").read_text()
    assert not (tmp_path / "sw.js").exists()
