"""The page at GET / in a real headless browser (Debian's chromium driven by playwright): ask, watch the
streamed text, the checked steps and the latency arrive. Skipped when /usr/bin/chromium is absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from nestling.serve.app import create_app
from nestling.serve.runtime import Reasoner
from nestling.serve.settings import Settings
from serve_fakes import FakeEngine, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

ANSWERED_12 = "document.getElementById('answer').textContent === 'Answer: 12'"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium: apt-get install chromium"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_the_page_streams_steps_marks_and_latency(browser, tmp_path):
    r = Reasoner(FakeEngine(), variant="fake-a", name="tiny", task="rg:basic_arithmetic")
    app = create_app(Settings(), reasoner=r)
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('fake-a')")
        assert "tiny" in page.text_content("#model")

        page.fill("#question", "a wrong one")
        page.click("#go")
        page.wait_for_function("document.getElementById('latency').textContent.length > 0", timeout=15_000)
        assert page.text_content("#live") == "Step 1: 9 * 8 = 64\nStep 2: So the result is 64\nAnswer: 64"
        steps = page.query_selector_all("#steps li")
        assert [s.get_attribute("class") for s in steps] == ["step bad", "step unchecked"]
        assert steps[0].text_content() == "\u2717 9 * 8 = 64"
        assert page.text_content("#answer") == "Answer: 64"
        latency = page.text_content("#latency")
        assert "time to first token" in latency and "fake-a (fake)" in latency
        assert page.text_content("#error") == ""

        page.fill("#question", "lucky: 3 + 4?")
        page.click("#go")
        page.wait_for_function("document.getElementById('verdict').textContent.length > 0", timeout=15_000)
        assert page.get_attribute("#steps li", "class") == "step ungrounded"  # apart from a false step
        assert page.text_content("#steps li") == "? 2 + 5 = 7"
        assert page.text_content("#verdict").startswith("explanation incomplete")

        page.fill("#question", "slip: 9 * 8 + 3?")
        page.check("#calculator")
        page.click("#go")
        page.wait_for_function(
            "document.getElementById('answer').textContent === 'Answer: 75'", timeout=15_000
        )
        steps = page.query_selector_all("#steps li")
        assert [s.get_attribute("class") for s in steps] == ["step ok", "step ok"]
        assert steps[0].text_content() == "\u2713 9 * 8 = 72 (calculator: the model wrote 64)"
        assert page.text_content("#live") == "Step 1: 9 * 8 = 72\nStep 2: 72 + 3 = 75\nAnswer: 75"
        page.uncheck("#calculator")

        page.fill("#question", "What is 7 + 5?")
        page.click("#go")
        page.wait_for_function(ANSWERED_12, timeout=15_000)
        assert page.get_attribute("#steps li", "class") == "step ok"
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5_000
        if os.environ.get("NESTLING_SCREENSHOT"):  # keep a copy to look at
            shutil.copy(shot, os.environ["NESTLING_SCREENSHOT"])

        page.fill("#question", "")
        page.evaluate("document.getElementById('question').removeAttribute('required')")
        page.click("#go")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=15_000)
        assert page.text_content("#error").startswith("422")


def test_the_page_sends_the_api_key(browser):
    r = Reasoner(FakeEngine(), variant="fake-a", name="tiny")
    app = create_app(Settings(api_key="k"), reasoner=r)
    with serve_in_thread(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.click("#go")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=15_000)
        assert page.text_content("#error").startswith("401")
        page.fill("#key", "k")
        page.click("#go")
        page.wait_for_function(ANSWERED_12, timeout=15_000)
