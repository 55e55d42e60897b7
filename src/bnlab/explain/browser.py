"""Debian's Chromium, headless, driven by Selenium: for the page's tests and its README
screenshot (``tools/explain_screenshot.py``). Needs ``chromium`` and ``chromium-driver``
(Debian packages) and ``selenium`` (the test extra); nothing is downloaded."""

from __future__ import annotations

import shutil

# Chromium's own background connections off: this machine's network is closed, and the
# page must not need one
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-sync",
    "--disable-component-update",
    "--disable-dev-shm-usage",
)


def available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


def chromium(profile_dir, width: int = 1280, height: int = 800):
    """A headless Chromium (a Selenium driver) with a fresh profile in ``profile_dir``,
    logging the console and the network (``goog:loggingPrefs``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not available():
        raise RuntimeError(
            "Debian's chromium and chromium-driver are not installed: "
            "apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    return driver
