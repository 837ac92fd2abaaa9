"""The chat page at / in a real browser: Debian's headless Chromium driven by Selenium.

A person's session: open the page (the server wants a key: the page asks for it), choose a
sample image, ask the toy task's four questions in one conversation and watch each answer stream
in, with FTL and tokens/s under it; then an error (a question longer than SEQ) shows in the page,
and "New chat" starts over. The screenshot is saved as build/server-page.png for a person to see.
"""
from __future__ import annotations

import os
import shutil

import pytest

from mllama_tpu import REPO_ROOT
from serving import KEY, SAMPLES, TRUTH, running_server

IMAGE = SAMPLES / "green_square_left_on_red_2x2.png"
SCREENSHOT = REPO_ROOT / "build" / "server-page.png"


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium and chromedriver are not installed: run scripts/setup_browser.sh "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # Importing TPU-MLIR (earlier tests in this process) puts its libraries on LD_LIBRARY_PATH in
    # os.environ; the browser must load the system's.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    driver = webdriver.Chrome(service=Service(driver_path, env=env), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), "--backend", "onnx", "-m", str(tiny_onnx_dir)) as s:
        yield s


def test_chat_page_in_a_browser(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    browser.get(server.url + "/")
    # The server wants a key: the page says so and asks for it.
    wait.until(lambda b: find("#keybox").is_displayed())
    assert "API key" in find("#status").text and "401" in find("#status").text
    find("#key").send_keys(KEY, Keys.TAB)
    wait.until(lambda b: find("#model").text == f"model: {server.model}")
    assert find("#status").text == ""

    find("#file").send_keys(str(IMAGE))
    wait.until(lambda b: find("#preview").is_displayed()
               and b.execute_script("return document.getElementById('preview').naturalWidth") == 374)
    assert find("#imagename").text == IMAGE.name

    for i, (question, expected) in enumerate(TRUTH[IMAGE.name]["questions"].items()):
        find("#question").send_keys(question, Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant")) == i + 1
                   and b.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("data-state") in ("done", "error"))
        answer = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        assert answer.get_attribute("data-state") == "done", answer.text
        assert answer.find_element(By.CSS_SELECTOR, ".text").text.strip() == expected
        assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces, as streamed
        stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
        assert "FTL" in stats and "tokens/s" in stats, stats
    # One conversation: every question after the first went with the history (the image in the first).
    assert browser.execute_script("return state.messages.length") == 8
    assert browser.execute_script("return typeof state.messages[0].content") == "object"
    assert browser.execute_script("return typeof state.messages[2].content") == "string"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # An error shows in the page, and the conversation is not broken by it.
    find("#question").send_keys(" ".join(["red"] * 200), Keys.ENTER)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("data-state") == "error")
    assert "limit is" in find("#status").text and "HTTP 400" in find("#status").text
    assert browser.execute_script("return state.messages.length") == 8

    find("#newchat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and not find("#preview").is_displayed()
    find("#question").send_keys("Hello", Keys.ENTER)  # text only, in the new conversation
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant")
               and b.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("data-state") == "done")
    assert browser.execute_script("return state.messages.length") == 2
