"""A real browser for the tests: Debian's `chromium` and `chromium-driver`, installed when absent
(as `slurm.py` installs Slurm), driven headless through Selenium.

    with headless_chromium() as driver:    # raises BrowserUnavailable (with the reason) when it cannot
        driver.get(page.as_uri())

No network is needed once the packages are installed: the driver is named by path, so
Selenium Manager never tries to download one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INSTALL_TIMEOUT_S = 900
PACKAGES = ("chromium", "chromium-driver")


class BrowserUnavailable(Exception):
    """Chromium or its driver cannot be installed or started here; the message says why."""


def install_chromium() -> tuple[str, str]:
    """apt-get install chromium and chromium-driver unless both are on PATH; their paths."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0:
            raise BrowserUnavailable("chromium is not installed and installing it needs root "
                                     "(apt-get install chromium chromium-driver)")
        if not shutil.which("apt-get"):
            raise BrowserUnavailable("chromium is not installed and there is no apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise BrowserUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {tail}")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        raise BrowserUnavailable(f"installed {', '.join(PACKAGES)} but chromium or chromedriver is not on PATH")
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Selenium Chrome driver on a headless chromium, quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:  # requirements.txt pins it; a venv made before that lacks it
        raise BrowserUnavailable(f"selenium is not installed ({error}): pip install -r requirements.txt") from error
    browser, driver_path = install_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: chromium refuses to run as root with its sandbox (the tests run as root in CI)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as error:  # WebDriverException and friends: the reason is in the message
        raise BrowserUnavailable(f"chromium did not start under chromedriver: {str(error).strip()[:400]}") from error
    try:
        yield driver
    finally:
        driver.quit()
