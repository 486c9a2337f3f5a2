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
    # Job workers in this process (jobs run at once): more than 1 only pays with a client that runs jobs in
    # parallel (serve --ray with several replicas sets it to the replica count). The extra workers follow their jobs
    # through the store like another node's would: progress events yes, previews no.
    workers: int = 1
    rate_limit_per_min: int = 0  # per API key (per client address without keys), state-changing requests; 0 = off
    # Operator caps, tighter than the engine's own bounds (None: the engine's): over them a request is a 422.
    max_steps: int | None = None
    max_pixels: int | None = None  # width * height
    max_batch: int | None = None
    # Access (SECURITY 29, 30): names served besides the loopback ones ("*": any), and the proxies whose
    # X-Forwarded-For / Forwarded headers are believed (none: uvicorn's proxy_headers stay off).
    allowed_hosts: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    public_url: str | None = None  # base of absolute URLs in responses; default: the local address answered on
    # Connections (SECURITY 33): a request's head and body must arrive within this; idle keep-alive after it.
    request_read_timeout_s: float = 30.0
    keep_alive_s: int = 5
    max_connections: int = 512  # beyond it uvicorn answers 503 at once (no unbounded fds)
    # Uploads (SECURITY 34): kept this long after their last use, and at most this many bytes in all.
    upload_ttl_s: float = 24 * 3600.0
    upload_quota_bytes: int = 2 << 30
    # Worker liveness (SECURITY 32): a running job's lease, renewed by its worker every lease_s / 5.
    lease_s: float = 30.0
    # The job/preset store: None = SQLite in the home; "postgresql://user@host/db" = a database several nodes share.
    store_url: str | None = field(default=None, repr=False)  # repr=False: a URL may carry a password
    # Several models (service/scheduling.py): jobs for a loaded model may pass an older job for another model at most
    # this many times in a row, and never once it has waited affinity_max_wait_s.
    affinity_max_consecutive: int = 4
    affinity_max_wait_s: float = 30.0
    # serve --ray (service/ray_client.py): engine replicas, fixed or autoscaled between the bounds (Ray Serve's
    # autoscaling_config), GPUs per replica (None: 1 when the cluster has GPUs, else one CPU slot).
    ray_replicas: int = 1
    ray_min_replicas: int | None = None
    ray_max_replicas: int | None = None
    ray_gpus_per_replica: float | None = None

    @classmethod
    def with_keys(cls, keys: tuple[str, ...] | list[str] = (), **kw) -> ServiceConfig:
        """Build a config from raw keys, keeping only their hashes."""
        return cls(api_key_hashes=tuple(hash_key(k) for k in keys if k), **kw)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes)

    def host_allowed(self, host_header: str | None) -> bool:
        """The Host header names this server: loopback names, the bound address, or an operator-added name."""
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        allowed = {h.lower().strip("[]") for h in self.allowed_hosts}
        if self.host not in ("0.0.0.0", "::", ""):
            allowed.add(self.host.lower().strip("[]"))
        return name in allowed or is_loopback(name)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind without an API key (SECURITY.md 14)."""
        from .errors import UnsafeBind

        if not is_loopback(self.host) and not self.auth_enabled:
            raise UnsafeBind(
                f"refusing to listen on {self.host} without an API key: set QWENSTUDIO_API_KEY or --api-key-file, "
                "or bind 127.0.0.1"
            )
