"""A real server on loopback per test: uvicorn in a thread, the session's tiny engine behind an in-process client."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from svc_helpers import run_app


@dataclass
class Served:
    url: str
    app: object
    home: Path

    @property
    def state(self):
        return self.app.state

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@pytest.fixture
def serve(tiny_engine, tmp_path):
    """Factory: ``with serve(queue_size=1) as s:`` runs a fresh app (own home, store, outputs) on loopback."""
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient

    @contextmanager
    def start(home: Path | None = None, keys: tuple[str, ...] = (), **config):
        home = home or tmp_path / "home"
        client = InProcessEngineClient.from_engine(tiny_engine)
        client.wait_ready(30)
        app = create_app(Settings(home=home), client, ServiceConfig.with_keys(keys, **config))
        try:
            with run_app(app) as url:
                yield Served(url, app, home)
        finally:
            client.close()

    return start
