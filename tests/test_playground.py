"""The playground in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real `proxytune serve` on the tiny trio, with an API key typed into the page."""
from __future__ import annotations

import shutil

import pytest

from proxytune import ProxyTuner
from tiny_server import ServerProcess, save_tiny_trio

KEY = "playground-key"
PROMPT = "The quick brown fox"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (make install-browser; CI installs them)")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_trio(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def server(dirs):
    process = ServerProcess(dirs, "--api-key", KEY, "--served-model-name", "tiny").wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: condition())


def text(browser, column: str) -> str:
    return browser.execute_script(f"return document.getElementById('out-{column}').textContent")


def open_page(browser, server, prompt=PROMPT, max_tokens=12):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "api_key")
    key.send_keys(KEY)
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    wait(browser, lambda: "model tiny" in browser.find_element(By.ID, "model").text)
    browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "prompt"), prompt)
    browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "max_tokens"),
                           str(max_tokens))


def test_a_prompt_streams_into_three_columns_that_are_base_expert_and_proxy(browser, server, dirs):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    browser.find_element(By.ID, "run").click()
    tuner = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti_expert"])
    want = {"base": tuner.generate(PROMPT, max_new_tokens=12, alone="base")[0],
            "expert": tuner.generate(PROMPT, max_new_tokens=12, alone="expert")[0],
            "proxy": tuner.generate(PROMPT, max_new_tokens=12, return_details=5)[0]}
    for column, output in want.items():
        wait(browser, lambda: text(browser, column) == output.text)
    wait(browser, lambda: browser.find_element(By.ID, "summary").text != "")
    # the heat map: one span per released piece of text, its shift p_proxy − p_base of the chosen token
    spans = browser.find_elements(By.CSS_SELECTOR, "#out-proxy .tok")
    assert spans and browser.execute_script("return [...arguments[0]].map(s => s.textContent).join('')", spans) \
        == want["proxy"].text
    first = want["proxy"].details[0]
    assert float(spans[0].get_attribute("data-shift")) == pytest.approx(
        first.chosen_prob["proxy"] - first.chosen_prob["base"], abs=1e-3)
    changed = [d.top["proxy"][0][0] != d.top["base"][0][0] for d in want["proxy"].details[:len(spans)]]
    assert any(changed) == bool(browser.find_elements(By.CSS_SELECTOR, "#out-proxy .tok.changed"))
    # hover (or keyboard focus) shows every role's top tokens with their probabilities
    browser.execute_script("arguments[0].focus()", spans[0])
    detail = browser.find_element(By.ID, "detail")
    wait(browser, lambda: detail.is_displayed())
    for role in ("base", "expert", "anti_expert", "proxy"):
        assert role in detail.text
    assert f"{first.chosen_prob['proxy']:.3f}" in detail.text
    summary = browser.find_element(By.ID, "summary").text
    assert summary.startswith(f"{len(want['proxy'].token_ids)} tokens")


def test_moving_alpha_reruns_the_proxy_column_only(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, max_tokens=10)
    browser.find_element(By.ID, "run").click()
    wait(browser, lambda: browser.find_element(By.ID, "summary").text != "")
    base, expert = text(browser, "base"), text(browser, "expert")
    assert text(browser, "proxy") != base  # at α = 1 the proxy differs from the base here
    browser.execute_script("window.requests = 0; const f = window.fetch;"
                           "window.fetch = (...a) => { window.requests += 1; return f(...a); };")
    slider = browser.find_element(By.ID, "alpha-0")
    browser.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'));"
                           "arguments[0].dispatchEvent(new Event('change'))", slider)
    wait(browser, lambda: text(browser, "proxy") == base)  # α = 0: the proxy is the base alone
    assert browser.execute_script("return window.requests") == 1  # one request: the proxy column's
    assert text(browser, "base") == base and text(browser, "expert") == expert
    assert "α = 0.0" in browser.find_element(By.ID, "alpha-shown").text


def test_a_bad_request_shows_the_servers_reason_in_the_page(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, max_tokens=100000)
    browser.find_element(By.ID, "run").click()
    error = browser.find_element(By.ID, "error")
    try:
        wait(browser, lambda: error.is_displayed() and "max_tokens" in error.text, timeout=30)
    except Exception:
        raise AssertionError(f"error box: {error.text!r}; proxy column: {text(browser, 'proxy')!r}")
    assert "Error:" in text(browser, "proxy")


def test_chat_mode_formats_the_prompt_as_a_user_message_for_every_column(browser, server, dirs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, server, prompt="def add(a, b):", max_tokens=8)
    Select(browser.find_element(By.ID, "mode")).select_by_value("chat")
    browser.find_element(By.ID, "run").send_keys("\n")  # the keyboard runs it too
    tuner = ProxyTuner.from_pretrained(dirs["base"], dirs["expert"], dirs["anti_expert"])
    messages = [{"role": "user", "content": "def add(a, b):"}]
    for column, alone in (("base", "base"), ("expert", "expert"), ("proxy", None)):
        want = tuner.chat(messages, max_new_tokens=8, alone=alone).text
        wait(browser, lambda: text(browser, column) == want)
