"""Browser tests of the web studio: a real ``qwenstudio serve`` subprocess (tiny model, loopback) driven by Playwright
with Debian's Chromium (``/usr/bin/chromium``; never ``playwright install``). Skipped only when that browser is absent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Screenshots go to a temp folder unless QWENSTUDIO_SCREENSHOTS names one (refresh the README's with
# QWENSTUDIO_SCREENSHOTS=docs/screenshots python -m pytest tests/ui): a test run never rewrites tracked files.
SCREENSHOTS = Path(os.environ.get("QWENSTUDIO_SCREENSHOTS") or tempfile.gettempdir() + "/qwenstudio-screenshots")

if not Path(CHROMIUM).exists():
    pytest.skip(f"UI tests need Debian's Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _qwenstudio() -> list[str]:
    exe = Path(sys.executable).with_name("qwenstudio")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from qwenstudio.cli.main import main; main()"]


class Server:
    """``qwenstudio serve`` in a subprocess with its own home; start/stop (SIGTERM, graceful) at will."""

    def __init__(self, home: Path, api_key: str | None = None, port: int | None = None):
        self.home, self.api_key = home, api_key
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "QWENSTUDIO_HOME": str(self.home)}
        env.pop("QWENSTUDIO_API_KEY", None)
        cmd = [*_qwenstudio(), "serve", "--port", str(self.port), "--model", "tiny"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.log = open(self.home.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/readyz", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qwenstudio serve did not become ready; log: {self.log.name}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.log.close()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)


@pytest.fixture(scope="session")
def home_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui")


def _new_home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir()
    return home


@pytest.fixture(scope="session")
def server(home_root):
    s = Server(_new_home(home_root, "main")).start()
    yield s
    s.stop()


@pytest.fixture
def make_server(home_root):
    """Factory for servers with their own home (API key, restart tests)."""
    started: list[Server] = []

    def make(name: str, api_key: str | None = None, home: Path | None = None, port: int | None = None) -> Server:
        s = Server(home or _new_home(home_root, name), api_key, port).start()
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc is not None:
            s.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh context (own localStorage) at desktop width; fails the test on any uncaught page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
