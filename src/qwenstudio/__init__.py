"""qwenstudio: run the Qwen-Image family fast, from every file format people download.

The public API is ``__all__``. Heavy modules (torch, diffusers) load on first use, not at import.
"""

from __future__ import annotations

from . import errors
from .errors import (  # noqa: F401  (re-exported: __all__ includes errors.__all__)
    Cancelled,
    CorruptFile,
    GenerationFailed,
    IncompatibleWeights,
    InsufficientMemory,
    InvalidRequest,
    ModelNotFound,
    QwenStudioError,
    UnsupportedFormat,
)

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("qwenstudio.engine.engine", "Engine"),
    "Progress": ("qwenstudio.engine.engine", "Progress"),
    "GenerateRequest": ("qwenstudio.engine.requests", "GenerateRequest"),
    "GenerateResult": ("qwenstudio.engine.requests", "GenerateResult"),
    "GeneratedImage": ("qwenstudio.engine.requests", "GeneratedImage"),
    "EditRequest": ("qwenstudio.engine.editing", "EditRequest"),
    "Control": ("qwenstudio.engine.editing", "Control"),
    "LoraRef": ("qwenstudio.engine.requests", "LoraRef"),
    "ModelSpec": ("qwenstudio.engine.specs", "ModelSpec"),
    "SPECS": ("qwenstudio.engine.specs", "SPECS"),
    "Settings": ("qwenstudio.config", "Settings"),
    "save_png": ("qwenstudio.outputs", "save_png"),
    "read_png_metadata": ("qwenstudio.outputs", "read_png_metadata"),
}

__all__ = ["__version__", *_LAZY, *errors.__all__]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qwenstudio' has no attribute '{name}'")
