"""Optional per-key rate limit (SECURITY 17): a token bucket per API key (per client address when no keys are
configured), in memory, for state-changing requests (the ones that queue work or write). Over it: 429 with
``Retry-After``. Runs after the guard (added before it), so only requests with a valid key reach a bucket and an
unknown key cannot drain anyone's.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time

from ..errors import InvalidRequest
from .api.errors import error_response
from .auth import STATE_CHANGING, presented_key

MAX_BUCKETS = 10_000  # beyond it, full (idle) buckets are forgotten: no unbounded growth from many addresses


def parse_rate(text: str) -> int:
    """'30/min', '2/s', '600/h' or a bare number (per minute) -> requests per minute."""
    value, _, unit = text.strip().partition("/")
    per = {"": 1.0, "m": 1.0, "min": 1.0, "minute": 1.0, "s": 60.0, "sec": 60.0, "second": 60.0,
           "h": 1 / 60, "hour": 1 / 60}.get(unit.strip().lower())
    if per is None or not value.strip().isdigit():
        raise InvalidRequest(f"rate limit must look like '30/min', '2/s' or '600/h', got {text!r}",
                             code="invalid_rate_limit")
    return max(1, int(int(value) * per))


class TokenBuckets:
    def __init__(self, per_min: int, clock=time.monotonic):
        self.capacity = float(per_min)
        self.rate = per_min / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token; return 0 when granted, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > MAX_BUCKETS:
                self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.capacity]
        for k in full:
            del self._buckets[k]


class RateLimitMiddleware:
    def __init__(self, app, per_min: int, auth_enabled: bool, metrics=None):
        self.app, self.metrics, self.auth_enabled = app, metrics, auth_enabled
        self.buckets = TokenBuckets(per_min)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in STATE_CHANGING:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = presented_key(headers) if self.auth_enabled else None  # without keys, any header is free to forge
        ident = ("key:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() if key
                 else "addr:" + str((scope.get("client") or ("?",))[0]))
        wait = self.buckets.take(ident)
        if wait > 0:
            if self.metrics is not None:
                self.metrics.job_rejected("rate_limited")
            retry = max(1, math.ceil(wait))
            path = scope.get("path", "")
            return await error_response(path, 429, "rate_limited",
                                        f"rate limit of {int(self.buckets.capacity)} requests/min reached; "
                                        f"retry in {retry} s", {"Retry-After": str(retry)})(scope, receive, send)
        return await self.app(scope, receive, send)
