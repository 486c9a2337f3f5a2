"""A `qwenstudio compare` report opened offline in headless Chromium: every image loads from its relative path,
the summary and per-prompt rows render, and nothing is fetched from the network."""

from __future__ import annotations

import json

from conftest import shot
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from typer.testing import CliRunner

from qwenstudio.cli.main import app


def test_compare_report_opens_offline(tmp_path, page):
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["compare", "--case", "pi-meeting-room,movie-poster", "--variant", "Base NFE=8:steps=4",
                                 "--variant", "fast NFE=2:steps=2,cfg=1", "--model", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    # the report's images are loading="lazy", and lazy images do not delay the load event: wait for them (an image
    # that never loads still fails below, after the timeout)
    try:
        page.wait_for_function("Array.from(document.images).every(e => e.complete && e.naturalWidth > 0)",
                               timeout=15000)
    except PlaywrightTimeout:  # the assertion below says which did not load
        pass
    loaded = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert loaded == [True] * 4
    assert all(u.startswith("file://") for u in requests), requests  # offline: no request leaves the folder
    rows = page.locator("table").first.locator("tr")
    assert rows.count() == 3  # header + two variants
    assert "Base NFE=8" in rows.nth(1).inner_text() and "1.00×" in rows.nth(1).inner_text()
    assert page.locator("figure").count() == 4 and page.locator("figcaption .bad").count() == 4  # noise never passes
    page.locator("figure details summary").first.click()
    request_json = json.loads(page.locator("pre.request").first.inner_text())
    assert request_json["seed"] == 42 and request_json["steps"] == 4
    page.locator("figure details summary").first.click()
    page.set_viewport_size({"width": 1280, "height": 1240})
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "compare-report")
