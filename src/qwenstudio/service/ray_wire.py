"""The Ray link's typed errors as plain data (error class name + code + detail + status), re-raised on the other side
as the same ``qwenstudio.errors`` class. Jobs and results have their own wire form, in the engine:
``EngineJob.to_dict/from_dict`` and ``EngineResult.to_wire/from_wire`` (engine/job.py), so nothing but bytes and
JSON-able values crosses between the service and a replica."""

from __future__ import annotations

import importlib
from typing import Any

from .. import errors
from ..errors import QwenStudioError


def error_payload(e: QwenStudioError) -> dict:
    cls = type(e)
    return {"module": cls.__module__, "type": cls.__name__, "message": e.message, "code": e.code,
            "detail": dict(e.detail), "status": e.status}


def error_from_payload(p: dict) -> QwenStudioError:
    """The same typed error the replica raised (its class when it is a qwenstudio error class, else the base class
    with the code and status kept)."""
    cls: Any = None
    if p.get("module", "").startswith("qwenstudio"):
        try:
            cls = getattr(importlib.import_module(p["module"]), p["type"], None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, QwenStudioError)):
        cls = getattr(errors, p.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, QwenStudioError)):
        cls = QwenStudioError
    try:
        err = cls(p["message"], code=p["code"], detail=p.get("detail") or None)
    except TypeError:  # a subclass with its own constructor
        err = QwenStudioError(p["message"], code=p["code"], detail=p.get("detail") or None)
    if err.status != p.get("status", err.status):
        err.status = p["status"]
    return err

