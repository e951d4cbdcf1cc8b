"""report.html in a real browser: headless Chromium (the system's, driven by Playwright) opens a freshly rendered
comparison report; every plot must load with a size, and the page must log no error. The screenshot is kept in
the test's temporary folder and, when MIAOTUI_SCREENSHOT names a file, there too.

Without Chromium (or Playwright) the test is skipped with the reason, except under CI (the CI variable set),
where it fails: CI must not skip it silently. MIAOTUI_CHROMIUM names a browser executable other than the default.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from miaotui.report import render_folder

STORED_REPORT = REPO / "docs" / "benchmarks" / "compare-ref-llama" / "report.json"
# Headless, and nothing that reaches for the network (there is none: without these Chromium stalls on start).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Every <img>: loaded, with its natural size.
IMAGES = "Array.from(document.images).map(i => ({src: i.src.slice(0, 60), ok: i.complete && i.naturalWidth > 0}))"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


def chromium() -> str:
    found = os.environ.get("MIAOTUI_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if not found or not Path(found).exists():
        _unavailable("no Chromium found (apt-get install chromium, or set MIAOTUI_CHROMIUM)")
    return found


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (./setup.sh --dev installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


def open_page(browser, path: Path, shot: Path) -> tuple[list[dict], list[str]]:
    """The page's images (src, loaded) and its errors (console errors, uncaught exceptions); saves a screenshot."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri(), wait_until="load", timeout=60_000)
    images = page.evaluate(IMAGES)
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    return images, errors


def test_report_html_shows_its_plots(browser, tmp_path):
    shutil.copy(STORED_REPORT, tmp_path / "report.json")
    render_folder(tmp_path)  # today's renderer: report.md, report.html with the plots, the plot PNGs
    plots = sorted(tmp_path.glob("plot-*.png"))
    assert plots, "the comparison report has no plots"

    shot = tmp_path / "report.png"
    images, errors = open_page(browser, tmp_path / "report.html", shot)
    if os.environ.get("MIAOTUI_SCREENSHOT"):
        target = Path(os.environ["MIAOTUI_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
    print(f"screenshot: {shot}")

    assert len(images) == len(plots), f"{len(plots)} plots rendered, {len(images)} images on the page"
    assert all(i["ok"] for i in images), f"images that did not load: {[i for i in images if not i['ok']]}"
    assert not errors, f"the page logged errors: {errors}"
    assert shot.stat().st_size > 20_000  # a page with tables and three plots, not a blank one


def test_a_broken_image_is_caught(browser, tmp_path):
    """The check above fails on a page whose image does not load."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="missing.png"><img src="data:image/png;base64,AAAA"></body></html>')
    images, errors = open_page(browser, page, tmp_path / "broken.png")
    assert [i["ok"] for i in images] == [False, False]
    assert errors  # Chromium reports the missing file
