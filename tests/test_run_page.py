"""The run page (tools/report.py -> report/index.html, compare.html): one self-contained file built from the same
summary as summary.md; and, slow, the page rendered by a real headless Chromium: every image loads, no console
error."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from test_report import make_run
from tools import report as R

REPO = Path(__file__).resolve().parents[1]


def page_of(run: Path) -> str:
    assert R.main([str(run), "--no-load"]) == 0
    return (run / "report" / "index.html").read_text()


def test_the_run_page_is_self_contained_and_says_what_the_summary_says(tmp_path):
    run = make_run(tmp_path)
    (run / "eval" / "demo_check.json").write_text(json.dumps(
        {"step": 400, "num": 12, "ddim_steps": 10, "guidance": 3.0, "color": 1.0, "shape": 0.92, "motion": 0.96,
         "all": 0.9, "background": 0.04}))
    (run / "samples" / "final").mkdir()
    shutil.copy(REPO / "docs" / "windows_vs_even.png", run / "samples" / "final" / "x.png")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(run / "samples" / "final" / "a red circle.gif")
    page = page_of(run)
    # nothing is fetched: every image is inline, no stylesheet, script or link to the network
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page
    # the summary's content (the same Markdown, rendered), then every preview in step order and the GIFs
    summary = (run / "report" / "summary.md").read_text()
    for heading in re.findall(r"^## (.+)$", summary, re.M):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "<table>" in page and "ckpt_000310.pt" in page  # the checkpoint inventory
    assert "<h2>Demo check</h2>" in page and "0.92" in page
    previews = re.findall(r"<figcaption>step (\d+): preview_step", page)
    assert previews == ["200", "400"]
    assert "<figcaption>a red circle.gif</figcaption>" in page.replace("final/", "")


def test_the_compare_page_overlays_runs_and_tables_their_config_differences(tmp_path):
    a, b = make_run(tmp_path, "run_a"), make_run(tmp_path, "run_b", scale=2.0)
    (b / "config.yaml").write_text("train:\n  steps: 1000\n  log_every: 20\n  lr: 0.0003\n")
    (a / "config.yaml").write_text("train:\n  steps: 1000\n  log_every: 10\n")
    assert R.main([str(a), str(b), "--no-load"]) == 0
    page = (a / "report" / "compare.html").read_text()
    assert re.findall(r'<img [^>]*src="([^"]{0,15})', page) == ["data:image/png;"]  # the overlay, inline
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", page)
    assert rows == [("train.log_every", "10", "20"), ("train.lr", "(not set)", "0.0003")]
    assert (a / "report" / "index.html").is_file() and (b / "report" / "index.html").is_file()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_the_page_renders_in_a_real_browser_with_every_image_and_no_console_error(tmp_path):
    if not chromium() or not shutil.which("chromedriver"):
        if os.geteuid() != 0:
            pytest.skip("needs Debian's chromium and chromium-driver (make browser-deps, as root)")
        pytest.fail("chromium and chromedriver are missing although we are root: make browser-deps installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    run = make_run(tmp_path)
    page = run / "report" / "index.html"
    page_of(run)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) >= 5, images  # latest sample, figures, two previews
        broken = [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)]
        assert not broken, f"images that did not load: {broken}"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        assert driver.title == f"t2v run {run.name}"
        if os.environ.get("T2V_SCREENSHOT"):  # how docs/report_page.png was taken
            driver.save_screenshot(os.environ["T2V_SCREENSHOT"])
    finally:
        driver.quit()
