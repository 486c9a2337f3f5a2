"""Settings as a dataclass, read from the environment once by whoever starts the program (never at import)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path.home() / ".qwenstudio")
    models_dirs: tuple[Path, ...] = ()
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: engine/precision.py decides (bf16 on CUDA; on a CPU from the weights and the CPU)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        env = os.environ
        home = Path(env["QWENSTUDIO_HOME"]) if env.get("QWENSTUDIO_HOME") else Path.home() / ".qwenstudio"
        dirs = tuple(Path(p) for p in env.get("QWENSTUDIO_MODELS_DIR", "").split(os.pathsep) if p)
        base = cls(home=home, models_dirs=dirs, device=env.get("QWENSTUDIO_DEVICE") or None,
                   dtype=env.get("QWENSTUDIO_DTYPE") or None)
        return cls(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"
