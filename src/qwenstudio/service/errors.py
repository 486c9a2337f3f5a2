"""Service-level errors: branches of the one ``qwenstudio.errors`` tree, each with its HTTP status and stable code."""

from __future__ import annotations

import re

from ..errors import GenerationFailed, InvalidRequest, QwenStudioError


class NotFound(QwenStudioError):
    code = "not_found"
    status = 404


class Conflict(QwenStudioError):
    code = "conflict"
    status = 409


class QueueFull(QwenStudioError):
    code = "queue_full"
    status = 429

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailable(QwenStudioError):
    code = "unavailable"
    status = 503


class Unauthorized(QwenStudioError):
    code = "unauthorized"
    status = 401


class Forbidden(QwenStudioError):
    code = "forbidden"
    status = 403


class PayloadTooLarge(QwenStudioError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(QwenStudioError):
    code = "unsupported_media_type"
    status = 415


class OutputWriteFailed(QwenStudioError):
    code = "output_write_failed"
    status = 500


class UnsafeBind(QwenStudioError):
    code = "unsafe_bind"
    status = 500


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s'\":,;/\\]+[/\\])+([^\s'\":,;]*)")


def redact_paths(message: str) -> str:
    """Keep only the file name of any absolute path in a message: errors from loaders name their files, and the
    server's directory layout is nobody's business (SECURITY 6)."""
    return _PATH.sub(lambda m: m.group(1) or "<path>", message)


class MalformedBody(InvalidRequest):
    """A body no route should even look at: not JSON, numbers past the digit cap, nesting past the depth cap,
    text that is not valid Unicode (lone surrogates). 422 like every bad request (400 on /v1, OpenAI's way)."""

    code = "invalid_json"


class UploadQuotaExceeded(QwenStudioError):
    code = "upload_quota_exceeded"
    status = 507


class MisdirectedRequest(QwenStudioError):
    code = "host_not_allowed"
    status = 421


class StoreUnavailable(QwenStudioError):
    """The job/preset database cannot be opened (PostgreSQL down or refusing us, psycopg missing)."""

    code = "store_unavailable"
    status = 503


class ReplicaFailed(GenerationFailed):
    """A Ray replica died running the job, and so did the one it was retried on (service/ray_client.py): the job
    failed for the cluster, not for its request; submitting it again may work."""

    code = "replica_failed"
    status = 503
