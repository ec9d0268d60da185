"""Headless Chromium for the browser tests, driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the
``selenium`` package (the ``test`` extra). Both paths are given to Selenium, and
``SE_OFFLINE`` is set, so Selenium Manager never looks for or downloads anything. The
browser is started with a fresh profile in the test's temporary directory and flags that
let it run as root in a closed network: no sandbox, no GPU, no background traffic.

Selenium calls block: tests run them in a thread (``deferToThread``) so that the reactor
keeps serving whatever the test plays meanwhile (a print provider, say).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.trial.unittest import SkipTest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Chromium's flags: headless as root on a machine without a display or a network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-proxy-server",
    "--hide-scrollbars",
)
WINDOW = (1280, 900)
#: Bound on loading one page, and on waiting for an element to appear.
PAGE_DEADLINE = 15.0
ELEMENT_DEADLINE = 10.0
#: Where screenshots go: this variable's directory, else ``artifacts`` in trial's
#: working directory (``_trial_temp``). ``SITESRV_TEST_`` because tox passes only those.
ARTIFACTS_ENV = "SITESRV_TEST_ARTIFACTS"
#: Set to ``required`` where a missing browser is an error, not a reason to skip.
REQUIRED_ENV = "SITESRV_TEST_BROWSER"


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def skip_without_browser() -> None:
    """Raise SkipTest, saying what is missing, unless Chromium and Selenium are here;
    fail instead where ``$SITESRV_TEST_BROWSER`` is ``required`` (CI), so that a broken
    set-up cannot pass as skipped tests."""
    reason = browser_unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRED_ENV) == "required":
        raise AssertionError(f"{REQUIRED_ENV}=required but {reason}")
    raise SkipTest(reason)


def start_browser(directory: str) -> Any:
    """A Selenium WebDriver for a new headless Chromium; its profile and the driver's log
    go in ``directory``. Blocking: call it in a thread."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    os.makedirs(directory, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={os.path.join(directory, 'profile')}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    service = Service(
        executable_path=CHROMEDRIVER,
        log_output=os.path.join(directory, "chromedriver.log"),
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(PAGE_DEADLINE)
    return driver


def stop_browser(driver: Any) -> None:
    """Quit the browser and its driver. Blocking: call it in a thread."""
    driver.quit()


def wait_for_element(driver: Any, selector: str, deadline: float = ELEMENT_DEADLINE) -> Any:
    """The first element matching a CSS selector, once it is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    located = expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector))
    return WebDriverWait(driver, deadline).until(located, f"no element {selector!r}")


def click_and_load(driver: Any, selector: str, deadline: float = PAGE_DEADLINE) -> None:
    """Click the element matching ``selector`` (a form's button) and wait until the page
    it leads to has replaced this one (a click does not wait for that itself)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element("tag name", "html")
    wait_for_element(driver, selector).click()
    gone = expected_conditions.staleness_of(page)
    # While the old document is torn down, ChromeDriver may answer "node does not belong
    # to the document" instead of "stale element": ask again.
    waiting = WebDriverWait(driver, deadline, ignored_exceptions=(WebDriverException,))
    waiting.until(gone, f"still on the same page after {selector!r}")
    wait_for_element(driver, "body")


def artifacts_directory() -> str:
    """The directory for test artifacts (created if need be)."""
    directory = os.path.abspath(os.environ.get(ARTIFACTS_ENV) or "artifacts")
    os.makedirs(directory, exist_ok=True)
    return directory


def save_screenshot(driver: Any, name: str) -> str:
    """A PNG of the whole current page (not only what fits the window) in the artifacts
    directory; its path."""
    size = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
        },
    )
    path = os.path.join(artifacts_directory(), name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    return path
