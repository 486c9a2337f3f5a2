"""One exception tree for the whole project (modelled on httpx._exceptions).

    QwenStudioError                 base; every error has a stable ``code`` string and an HTTP ``status``
    ├── InvalidRequest              bad user input (size, steps, sampler, prompt too long ...)
    ├── ModelNotFound               a model/LoRA name or path that does not resolve
    ├── UnsupportedFormat           a file we refuse or do not understand (pickle, unknown layout)
    ├── CorruptFile                 truncated / malformed weights file
    ├── IncompatibleWeights         a readable file of another architecture or shape
    ├── InsufficientMemory          preflight says it will not fit
    │   └── ModelTooLarge           a server's model that cannot fit at all (422 at submit)
    ├── Cancelled                   the caller asked to stop
    └── GenerationFailed            the run itself failed (NaN/inf latents, OOM mid-run ...)

The service maps ``status`` and ``code`` straight to its JSON error bodies; the CLI prints ``str(err)`` on one line.
"""

from __future__ import annotations


class QwenStudioError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.detail = detail or {}

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **({"detail": self.detail} if self.detail else {})}


class InvalidRequest(QwenStudioError):
    code = "invalid_request"
    status = 422


class ModelNotFound(QwenStudioError):
    code = "model_not_found"
    status = 404


class UnsupportedFormat(QwenStudioError):
    code = "unsupported_format"
    status = 415


class CorruptFile(QwenStudioError):
    code = "corrupt_file"
    status = 422


class IncompatibleWeights(QwenStudioError):
    code = "incompatible_weights"
    status = 422


class InsufficientMemory(QwenStudioError):
    code = "insufficient_memory"
    status = 507


class Cancelled(QwenStudioError):
    code = "cancelled"
    status = 499


class GenerationFailed(QwenStudioError):
    code = "generation_failed"
    status = 500


class ModelTooLarge(InsufficientMemory):
    """A server asked for a model that cannot fit its memory even with every other model evicted: refused at
    submit time (a 4xx: the request names something this server cannot run), never queued."""

    code = "model_too_large"
    status = 422


class InputImageUnavailable(QwenStudioError):
    """An engine job's input image, named by content id (sha256), cannot be read as those bytes: the upload is gone
    (``input_missing``) or its bytes changed since submit (``input_changed``). Never run on a different image."""

    code = "input_missing"
    status = 409


__all__ = [
    "QwenStudioError",
    "InvalidRequest",
    "ModelNotFound",
    "UnsupportedFormat",
    "CorruptFile",
    "IncompatibleWeights",
    "InsufficientMemory",
    "ModelTooLarge",
    "Cancelled",
    "GenerationFailed",
    "InputImageUnavailable",
]
