"""The web page in a real headless Chromium (Debian's chromium + chromedriver through selenium): enter the key and
a prompt, wait for the image, check it is a decoded PNG of the requested size and that progress arrived.

Skips only where chromium is missing and $CI is unset; in CI a missing browser fails the test.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import pytest
from helpers import API_KEY
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,900"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def test_page_asks_for_the_key_then_generates_an_image(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    wait(browser, lambda d: by_id(d, "key-row").is_displayed())
    assert "API key" in wait(browser, lambda d: by_id(d, "error").text)  # /v1/models answered 401

    by_id(browser, "api_key").send_keys(API_KEY + Keys.TAB)  # change event: stored, models reloaded
    wait(browser, lambda d: by_id(d, "model").get_attribute("value") == "tiny")
    assert by_id(browser, "width").get_attribute("value") == "16"
    by_id(browser, "prompt").send_keys("a red circle in the top left")
    steps = by_id(browser, "steps")
    steps.clear()
    steps.send_keys("3")
    by_id(browser, "seed").send_keys("42")
    by_id(browser, "generate").click()

    card = wait(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, "#gallery .card") or [None])[0])
    image = card.find_element(By.TAG_NAME, "img")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    decoded.load()
    assert decoded.format == "PNG" and decoded.size == (16, 16)
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 16
    assert card.get_attribute("data-steps-seen") == "3"  # every sampler step reached the page
    settings = card.find_element(By.CLASS_NAME, "settings").text
    assert "16x16" in settings and "3 steps" in settings and "seed 42" in settings and "tiny" in settings
    download = card.find_element(By.CLASS_NAME, "download")
    assert download.get_attribute("href") == src and download.get_attribute("download") == "t2i-tiny-42.png"
    assert by_id(browser, "error").text == ""
    browser.save_screenshot(str(tmp_path / "page.png"))
