"""The playground in headless Chromium (Debian's, via Playwright): prompt -> streamed completion ->
thumbs-up and a correction, both of which must reach the feedback store. Keeps a screenshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _serve_helpers import make_model, thread_server

from lmcore.config import Params, ServeParams
from lmcore.feedback.store import FeedbackStore

pytestmark = pytest.mark.code
CHROMIUM = Path("/usr/bin/chromium")


def test_playground_generates_and_sends_feedback(tmp_path):
    if not CHROMIUM.is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("/usr/bin/chromium is missing in CI (apt-get install chromium)")
        pytest.skip("/usr/bin/chromium not installed")
    from playwright.sync_api import sync_playwright

    from lmcore.serve.app import create_app

    model = make_model(tmp_path / "tiny-model")
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    params = Params(serve=ServeParams(poll_interval_s=0))
    shot = Path(os.environ.get("LMOPS_HOME", tmp_path)) / "artifacts" / "playground.png"
    try:
        with thread_server(create_app(str(model), params, store=store)) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('local-')")
            page.fill("#prompt", "def greet(name):\n")
            page.fill("#max_new_tokens", "40")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_function("document.getElementById('completion').dataset.generationId")
            gid = page.eval_on_selector("#completion", "e => e.dataset.generationId")
            assert page.locator("#completion .tok").count() > 0
            assert page.locator("#completion .tok.p0, #completion .tok.p1").count() > 0  # coloured by prob
            page.click("#up")
            page.wait_for_function("document.getElementById('status').textContent.includes('feedback saved')")
            page.click("#edit")
            page.fill("#correction", "    return f'Hello, {name}!'\n")
            page.click("#submit-correction")
            page.wait_for_function("document.getElementById('status').textContent.includes('correction saved')")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            print(f"playground screenshot: {shot}")
            page.uncheck("#colour")
            assert "colour" not in (page.get_attribute("#output", "class") or "")
            browser.close()
        rows = store.feedback_for(gid)
        assert [(r["rating"], r["correction"]) for r in rows] == [(1, None), (-1, "    return f'Hello, {name}!'\n")]
        assert store.get_generation(gid)["prompt"] == "def greet(name):\n"
        assert shot.stat().st_size > 10_000
    finally:
        store.close()
