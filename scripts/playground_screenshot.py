"""The README's playground screenshot: `proxytune serve --model demo`, the page in headless Chromium (the same
browser the tests drive), one held-out GSM question, a token where the proxy's top token differs from the
base's focused so its details show, then docs/images/playground.png.

    python scripts/playground_screenshot.py [--max-tokens 96] [--index 0]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_server import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--index", type=int, default=0, help="which held-out GSM question")
    parser.add_argument("--output", default=str(ROOT / "docs" / "images" / "playground.png"))
    args = parser.parse_args()

    import os
    import subprocess
    import time

    import httpx
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # the driver's path is given: Selenium Manager never reaches out
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from proxytune.datasets.gsm import PROMPT, heldout_examples

    question = heldout_examples(args.index + 1, seed=0)[args.index].question
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "proxytune", "serve", "--model", "demo", "--port", str(port)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 1800, poll_frequency=1)
            wait.until(lambda b: "model demo" in b.find_element(By.ID, "model").text)
            browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "prompt"),
                                   PROMPT.format(question=question))
            browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "max_tokens"),
                                   str(args.max_tokens))
            browser.find_element(By.ID, "run").click()
            wait.until(lambda b: b.find_element(By.ID, "summary").text != "")
            wait.until(lambda b: all(b.find_element(By.ID, f"out-{c}").text for c in ("base", "expert")))
            time.sleep(2)
            changed = browser.find_elements(By.CSS_SELECTOR, "#out-proxy .tok.changed")
            target = changed[0] if changed else browser.find_elements(By.CSS_SELECTOR, "#out-proxy .tok")[0]
            browser.execute_script("arguments[0].focus()", target)
            time.sleep(0.5)
            height = browser.execute_script("return document.body.scrollHeight")
            browser.set_window_size(1500, max(1000, height + 40))
            browser.save_screenshot(args.output)
            print(browser.find_element(By.ID, "summary").text)
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
