"""The playground in headless Chromium (Debian's, via Playwright): prompt -> streamed completion ->
thumbs-up and a correction, both of which must reach the feedback store. Keeps a screenshot. A model with
a chat template is talked to as a chat: the page shows the formatted prompt and streams the reply."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _serve_helpers import make_model, thread_server

from lmcore.config import Params, ServeParams
from lmcore.feedback.store import FeedbackStore

pytestmark = pytest.mark.code
CHROMIUM = Path("/usr/bin/chromium")


def _need_chromium() -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("/usr/bin/chromium is missing in CI (apt-get install chromium)")
        pytest.skip("/usr/bin/chromium not installed")


def generate(page, text: str, max_tokens: int, seed: int) -> str:
    """Type ``text``, press Generate, wait for the reply; its generation id."""
    page.fill("#prompt", text)
    page.fill("#max_new_tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.wait_for_function("document.getElementById('completion').dataset.generationId")
    return page.eval_on_selector("#completion", "e => e.dataset.generationId")


def test_playground_generates_and_sends_feedback(tmp_path):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    from lmcore.serve.app import create_app

    model = make_model(tmp_path / "tiny-model")
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    params = Params(serve=ServeParams(poll_interval_s=0, compile_decode=False))
    shot = Path(os.environ.get("LMOPS_HOME", tmp_path)) / "artifacts" / "playground.png"
    try:
        with thread_server(create_app(str(model), params, store=store)) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('local-')")
            assert page.locator("#chat-toggle").is_hidden()  # a byte-level model without a chat template
            gid = generate(page, "def greet(name):\n", max_tokens=40, seed=7)
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


def test_playground_formats_a_chat_models_prompt_with_its_template(tmp_path):
    _need_chromium()
    from _base_helpers import make_base
    from playwright.sync_api import sync_playwright

    from lmcore.data.tokenizer import Tokenizer
    from lmcore.model.checkpoint import save_model
    from lmcore.model.transformer import ModelConfig, Transformer
    from lmcore.serve.app import create_app

    tok = Tokenizer.load(make_base(tmp_path / "base"))  # ChatML template, as transformers saves it
    assert tok.chat_template
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, block_size=64)
    model = save_model(tmp_path / "chat-model", Transformer(cfg), tok, {})
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    params = Params(serve=ServeParams(poll_interval_s=0, compile_decode=False))
    try:
        with thread_server(create_app(str(model), params, store=store)) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("!document.getElementById('chat-toggle').hidden")
            assert page.is_checked("#chat") and page.inner_text("#prompt-label") == "Message"
            gid = generate(page, "What is two plus two?", max_tokens=12, seed=3)
            shown = page.inner_text("#prompt-echo")
            assert shown.strip() == ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant"), shown
            assert page.locator("#completion .tok").count() > 0 and "finish" in page.inner_text("#meta")
            page.click("#down")
            page.wait_for_function("document.getElementById('status').textContent.includes('feedback saved')")
            page.uncheck("#chat")  # back to plain continuation of the raw text
            page.fill("#prompt", "Two plus")
            page.click("#generate")
            page.wait_for_function(f"document.getElementById('completion').dataset.generationId !== '{gid}'")
            assert page.inner_text("#prompt-echo") == "Two plus"
            browser.close()
        served = store.get_generation(gid)
        assert served["prompt"].startswith("<|im_start|>user\nWhat is two plus two?")  # what the model was given
        assert [r["rating"] for r in store.feedback_for(gid)] == [-1]
    finally:
        store.close()
