"""Run a qwenstudio app on loopback in a thread (tests and benchmarks): a real uvicorn server on a free port."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


@contextmanager
def run_app(app, host: str = "127.0.0.1", start_timeout: float = 20):
    """Yield the base URL of ``app`` served by uvicorn on ``host``:0 (lifespan on); stop and join on exit. The
    app's ServiceConfig sets the connection policy exactly as ``qwenstudio serve`` does (proxy headers, timeouts)."""
    import uvicorn

    from ..service.server_options import uvicorn_options

    config = getattr(getattr(app, "state", None), "config", None)
    options = uvicorn_options(config) if config is not None else {}
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
