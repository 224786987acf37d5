"""The status page in real headless Chromium (Debian's `chromium`, driven by Playwright): it loads, refreshes at
least once a second, shows live numbers that change while a small load runs, and logs no console errors.

With KAIROS_SCREENSHOT=1 the load runs longer (so the charts fill) and a screenshot goes to docs/status-page.png.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import REPO, LiveServer, live_server

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# reference/cpu-feasibility.md §6; the background-networking flags keep Chromium off the (closed) network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("KAIROS_SCREENSHOT") == "1"
LOAD_TIMEOUT_MS = 90_000
SCREENSHOT_PATH = REPO / "docs" / "status-page.png"
TENANTS = ("alice", "bob", "carol")
APPS = ("chat-ui", "agent-7", "")
PROMPTS = ("Name three colors.", "Write a haiku about the sea.", "Explain what a CPU does.", "Count to ten.")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # At most 4 running requests, so a load of 5 leaves one waiting: every table has something to show.
    with live_server(Path(tmp_path_factory.mktemp("status-page")), "--max-num-seqs", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"Chromium is not installed at {CHROMIUM} (scripts/install.sh installs Debian's `chromium`)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Load:
    """`num_clients` threads, each sending streaming chat requests back to back until `stop()`."""

    def __init__(self, base_url: str, num_clients: int, max_tokens: int) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.num_clients = num_clients
        self.stopping = threading.Event()
        self.num_done = 0
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(num_clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(num_clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as http:
            for n in itertools.count():
                if self.stopping.is_set():
                    return
                headers = {
                    "X-Tenant-Id": TENANTS[i % len(TENANTS)],
                    "X-SLO-Class": "batch" if i % 2 else "interactive",
                }
                if app := APPS[i % len(APPS)]:
                    headers["X-App-Id"] = app
                body = {
                    "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
                    "max_tokens": self.max_tokens,
                    "stream": True,
                    "ignore_eos": True,
                }
                with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    if response.status_code != 200:
                        self.errors.append(f"HTTP {response.status_code}")
                    for _ in response.iter_lines():
                        pass
                self.num_done += 1

    def stop(self) -> None:
        self.stopping.set()
        for future in self._futures:
            future.result(timeout=120)
        self._pool.shutdown()


def text(page, selector: str) -> str:
    return page.text_content(selector) or ""


def test_status_page_is_live_and_clean(server: LiveServer, browser):
    httpx.post(  # warm-up: the first request pays the engine's compile time
        f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120
    ).raise_for_status()
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))

    page.goto(f"{server.base_url}/")
    page.wait_for_function("document.getElementById('state').textContent === 'serving'", timeout=10_000)
    assert text(page, "#model") == "smollm2-135m-instruct"
    assert text(page, "#policy") == "vllm"
    updated = page.evaluate("document.body.dataset.updated")
    page.wait_for_function(f"document.body.dataset.updated !== '{updated}'", timeout=2_500)  # polls ≤ 1 s

    tokens_before = text(page, "#gen-tokens-total")
    load = Load(server.base_url, num_clients=5, max_tokens=40 if SCREENSHOT else 16)
    try:
        # Generous timeouts: new batch shapes compile on first use, and CI machines are shared.
        for condition in (
            "Number(document.getElementById('num-running').textContent) > 0",
            f"document.getElementById('gen-tokens-total').textContent !== '{tokens_before}'",
            "document.getElementById('queues-tenant').textContent.includes('alice')",
            "document.getElementById('queues-app').textContent.includes('agent-7')",
            "document.getElementById('queues-class').textContent.includes('batch')",
            "Number(document.getElementById('batch-decode-requests').textContent) > 0",
        ):
            page.wait_for_function(condition, timeout=LOAD_TIMEOUT_MS)
        if SCREENSHOT:
            time.sleep(45)  # let the sparklines and percentiles fill
            page.wait_for_function(
                "Number(document.getElementById('num-waiting').textContent) > 0", timeout=LOAD_TIMEOUT_MS
            )
            SCREENSHOT_PATH.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_PATH), full_page=True)
    finally:
        load.stop()
    assert load.errors == [] and load.num_done >= 1
    page.wait_for_function(
        "Number(document.getElementById('num-running').textContent) === 0", timeout=LOAD_TIMEOUT_MS
    )
    assert int(text(page, "#gen-tokens-total").replace(",", "")) > int(tokens_before.replace(",", "") or 0)
    page.close()
    assert errors == []


def test_static_files_are_served_only_from_static(server: LiveServer):
    assert httpx.get(f"{server.base_url}/static/status.css").status_code == 200
    assert httpx.get(f"{server.base_url}/static/../server/app.py").status_code == 404
    assert httpx.get(f"{server.base_url}/static/%2e%2e/server/app.py").status_code == 404
