"""A real headless Chromium driven by Selenium: Debian's `chromium` and `chromium-driver` (.ci/run installs them).

Nothing is downloaded: the driver and browser paths are given, so Selenium Manager is never asked for one.
Without them a test skips, or fails under .ci/run (LORA_SWEEP_REQUIRE_CHROMIUM=1).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _missing(what: str) -> None:
    message = f"{what} is not installed (apt-get install -y chromium chromium-driver); .ci/run installs it"
    if os.environ.get("LORA_SWEEP_REQUIRE_CHROMIUM"):
        pytest.fail(message)
    pytest.skip(message)


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if not browser:
        _missing("chromium")
    if not driver:
        _missing("chromedriver")
    return browser, driver


@contextmanager
def browser(profile: Path, width: int = 1280, height: int = 900) -> Iterator:
    """A headless Chromium session (selenium WebDriver) with its own profile folder; closed on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
