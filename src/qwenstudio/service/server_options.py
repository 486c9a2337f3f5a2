"""How uvicorn runs a qwenstudio app, in one place for ``serve`` and the loopback test runner (SECURITY 30, 33).

- Proxy headers (``X-Forwarded-For``, ``Forwarded``) are believed only from ``trusted_proxies``; uvicorn's own
  default trusts them from 127.0.0.1, which let any local client reset its rate-limit bucket with a made-up address.
- uvicorn closes idle keep-alive connections but gives a request that is still *arriving* forever: a client can
  hold a socket (and a file descriptor) with half a header. ``TimedH11Protocol`` closes a connection whose request
  head and body have not fully arrived ``request_read_timeout_s`` after its first byte (or after connecting).
- ``limit_concurrency`` caps open connections (uvicorn answers 503 beyond it at once, holding nothing).
"""

from __future__ import annotations

from typing import Any

from .config import ServiceConfig


def timed_h11_protocol(read_timeout_s: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol plus a deadline for reading each request (head and body)."""

        read_timeout = read_timeout_s

        def connection_made(self, transport) -> None:
            self.read_deadline = None
            super().connection_made(transport)
            self.arm_read_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and data:
                self.arm_read_deadline()
            elif self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self.disarm_read_deadline()

        def connection_lost(self, exc) -> None:
            self.disarm_read_deadline()
            super().connection_lost(exc)

        def arm_read_deadline(self) -> None:
            if self.read_deadline is None:
                self.read_deadline = self.loop.call_later(self.read_timeout, self.read_timed_out)

        def disarm_read_deadline(self) -> None:
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def read_timed_out(self) -> None:
            self.read_deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()  # half a request after the deadline: drop it, free the fd

    return TimedH11Protocol


def uvicorn_options(config: ServiceConfig) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` that carry the service's connection policy."""
    proxies = tuple(config.trusted_proxies)
    return {
        "http": timed_h11_protocol(config.request_read_timeout_s),
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": ",".join(proxies) if proxies else "",
        "server_header": False,
        "timeout_keep_alive": config.keep_alive_s,
        "limit_concurrency": config.max_connections,
        "timeout_graceful_shutdown": max(1, int(config.shutdown_grace_s)),
        "h11_max_incomplete_event_size": 64 * 1024,  # request head
    }
