"""Request guards as one pure-ASGI middleware, run before any route: Host allow-list (DNS rebinding), API key,
cross-site posts (Origin by scheme+host+port, Sec-Fetch-Site), body size cap.

Why pure ASGI (not BaseHTTPMiddleware): the body cap must count the bytes actually received (a missing or lying
Content-Length must not get past it) and the client's disconnect must still reach the route that waits on it.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from .api.errors import error_response
from .config import ServiceConfig

# "/" and /ui/*: the web studio's page and static files (no data in them; the page asks for the key itself).
OPEN_PATHS = frozenset({"/healthz", "/"})
OPEN_PREFIXES = ("/ui/",)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def key_matches(presented: str, hashes: tuple[str, ...]) -> bool:
    """Hash the presented key and compare with every stored hash in constant time (no early exit)."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()
    ok = False
    for h in hashes:
        ok |= hmac.compare_digest(digest, h)
    return ok


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


UPLOAD_PATHS = frozenset({"/api/uploads", "/v1/images/edits"})  # multipart routes: the larger body cap


class GuardMiddleware:
    def __init__(self, app, config: ServiceConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def deny(status: int, code: str, message: str, extra: dict | None = None):
            await error_response(path, status, code, message, extra)(scope, receive, send)

        if not self.config.host_allowed(headers.get("host")):
            return await deny(421, "host_not_allowed", "this server does not answer for that Host name; the "
                              "operator can add it with --allowed-host")

        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if self.config.auth_enabled and not open_path and scope.get("method") != "OPTIONS":
            key = presented_key(headers)
            if not key or not key_matches(key, self.config.api_key_hashes):
                return await deny(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer KEY)",
                                  {"WWW-Authenticate": "Bearer"})

        if scope.get("method") in STATE_CHANGING and not self._origin_allowed(headers, scope.get("scheme", "http")):
            return await deny(403, "cross_origin_forbidden", "cross-site requests are not allowed")

        limit = self.config.max_upload_bytes if path in UPLOAD_PATHS else self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await deny(413, "payload_too_large", f"request body over the {limit}-byte limit")
        if scope.get("method") not in STATE_CHANGING:
            return await self.app(scope, receive, send)

        # Read the body here, counting real bytes, then replay it; later receives pass through (disconnects).
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await deny(413, "payload_too_large", f"request body over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _origin_allowed(self, headers: dict[str, str], scheme: str) -> bool:
        """Browsers send Origin (and Sec-Fetch-Site) on cross-site posts; allow this server's own origin (same
        scheme, host and port) and the configured CORS origins only."""
        origin = headers.get("origin")
        configured = origin is not None and (origin in self.config.cors_origins or "*" in self.config.cors_origins)
        if headers.get("sec-fetch-site", "").lower() == "cross-site" and not configured:
            return False
        if origin is None or configured:
            return True
        return same_origin(origin, scheme, headers.get("host", ""))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_tuple(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme.lower(), parts.hostname.lower(), port or _DEFAULT_PORTS.get(scheme.lower(), 0)


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Origin ``scheme://host[:port]`` equals the request's own scheme, Host name and port (defaults filled)."""
    try:
        o = urlsplit(origin)
    except ValueError:
        return False
    if o.scheme not in _DEFAULT_PORTS or o.path not in ("", "/") or o.query or o.username is not None:
        return False
    mine, theirs = _origin_tuple(scheme, host), _origin_tuple(o.scheme, o.netloc)
    return mine is not None and mine == theirs
