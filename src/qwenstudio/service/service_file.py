"""``serve --config FILE``: service settings (operator caps, hosts, timeouts, quotas) from a TOML or JSON file, so a
deployment — or a fuzzing run — states its real limits in one reviewed file instead of a long command line.

Precedence: ServiceConfig defaults < the file < command-line options that differ from their defaults < explicit
overrides. Keys never go in this file (use QWENSTUDIO_API_KEY or --api-key-file). Example (TOML)::

    max_steps = 4
    max_pixels = 65536        # width * height
    max_batch = 2
    job_deadline_s = 20.0
    allowed_hosts = ["studio.lan"]
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .config import ServiceConfig

NOT_IN_FILE = {"api_key_hashes"}


def read_settings_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidRequest(f"cannot read the config file {path.name}: {e.strerror}", code="invalid_config") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"config file {path.name} does not parse: {e}", code="invalid_config") from None
    if isinstance(data, dict) and isinstance(data.get("service"), dict):
        data = data["service"]
    if not isinstance(data, dict):
        raise InvalidRequest(f"config file {path.name} must hold a table of settings", code="invalid_config")
    return data


def coerce_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check names and types against ServiceConfig (lists become tuples)."""
    known = {f.name: f for f in fields(ServiceConfig)}
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known or name in NOT_IN_FILE:
            hint = " (keys go in QWENSTUDIO_API_KEY or --api-key-file)" if "key" in name else ""
            raise InvalidRequest(f"{where}: unknown setting '{name}'{hint}", code="invalid_config")
        kind = str(known[name].type)  # "int", "float | None", "tuple[str, ...]", "str | None", "bool"
        if kind.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest(f"{where}: '{name}' must be a list of strings", code="invalid_config")
            value = tuple(value)
        elif value is None and "None" in kind:
            pass
        elif kind.startswith("bool"):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{where}: '{name}' must be true or false", code="invalid_config")
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{where}: '{name}' must be an integer", code="invalid_config")
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{where}: '{name}' must be a number", code="invalid_config")
            value = float(value)
        elif kind.startswith("str") and not isinstance(value, str):
            raise InvalidRequest(f"{where}: '{name}' must be a string", code="invalid_config")
        out[name] = value
    return out


def load_service_config(path: str | Path | None, keys: list[str], *, defaults: dict[str, Any] | None = None,
                        overrides: dict[str, Any] | None = None) -> ServiceConfig:
    base = ServiceConfig()
    merged: dict[str, Any] = {}
    if path is not None:
        merged.update(coerce_settings(read_settings_file(path), Path(path).name))
    for name, value in (defaults or {}).items():
        if value != getattr(base, name):  # a command-line option left at its default does not beat the file
            merged[name] = value
    merged.update(overrides or {})
    return ServiceConfig.with_keys(keys, **merged)
