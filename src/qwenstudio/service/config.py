"""Service settings as a frozen dataclass. Keys are hashed on construction so the raw key never lives in the config
(nor in its repr, logs or tracebacks)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field


def hash_key(key: str) -> str:
    """sha256 hex of an API key: what is kept in memory and compared (never the key itself)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_hashes: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()  # empty: CORS closed
    max_body_bytes: int = 1 << 20  # JSON requests
    max_upload_bytes: int = 32 << 20  # multipart image uploads (/api/uploads, /v1/images/edits): up to 3 images + mask
    queue_size: int = 16  # queued jobs (not counting the running one); beyond it 429
    retry_after_s: int = 5
    job_deadline_s: float = 600.0  # per running job; over it the job is cancelled and failed "deadline_exceeded"
    preview_every: int = 0  # default for jobs that do not ask; 0 = no previews
    shutdown_grace_s: float = 10.0
    run_worker: bool = True  # False: an API-only process (workers sharing the store run its jobs)
    rate_limit_per_min: int = 0  # per API key (per client address without keys), state-changing requests; 0 = off
    # Operator caps, tighter than the engine's own bounds (None: the engine's): over them a request is a 422.
    max_steps: int | None = None
    max_pixels: int | None = None  # width * height
    max_batch: int | None = None

    @classmethod
    def with_keys(cls, keys: tuple[str, ...] | list[str] = (), **kw) -> ServiceConfig:
        """Build a config from raw keys, keeping only their hashes."""
        return cls(api_key_hashes=tuple(hash_key(k) for k in keys if k), **kw)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind without an API key (SECURITY.md 14)."""
        from .errors import UnsafeBind

        if not is_loopback(self.host) and not self.auth_enabled:
            raise UnsafeBind(
                f"refusing to listen on {self.host} without an API key: pass --api-key (or QWENSTUDIO_API_KEY), "
                "or bind 127.0.0.1"
            )
