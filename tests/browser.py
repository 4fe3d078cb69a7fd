"""Headless Chromium for the web console tests: Debian's (scripts/setup.sh installs it), driven by
Playwright from the test extras (never its own browser downloads)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator

from playwright import async_api as playwright_api

CHROMIUM = "/usr/bin/chromium"

assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: run scripts/setup.sh"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[playwright_api.Browser]:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


async def logged_in_page(browser: playwright_api.Browser, user: str, password: str) -> playwright_api.Page:
    """A page of a new browser context that answers HTTP Basic authentication with ``user`` and
    trusts the service's self-signed certificate."""
    context = await browser.new_context(http_credentials={"username": user, "password": password},
                                        ignore_https_errors=True)
    return await context.new_page()
