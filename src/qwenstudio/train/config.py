"""The whole training run as one dataclass: what the CLI parses, what is saved beside the LoRA, what resume checks.

Defaults follow musubi-tuner's documented Qwen-Image recipe (docs/qwen_image.md at kohya-ss/musubi-tuner@30c658c:
``--timestep_sampling shift --discrete_flow_shift 2.2 --weighting_scheme none``, AdamW(8-bit), gradient
checkpointing, bf16), with a smaller default rank and a learning rate typical for rank-16 image LoRAs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import InvalidRequest

# The DiT's attention and MLP linears inside every transformer block (diffusers module names, relative to the block).
# Modulation (img_mod/txt_mod) and the embedders stay frozen: that is what the peers train by default too.
DEFAULT_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
TIMESTEP_SAMPLINGS = ("shift", "qwen_shift", "uniform")
FORMATS = ("peft", "comfy", "kohya")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
MIXED_PRECISIONS = ("auto", "bf16", "no")
# Fields that must agree between a checkpoint and the run resuming it (others, e.g. steps or sample settings,
# may change on resume).
RESUME_FIXED = ("dataset", "model", "rank", "alpha", "targets", "resolution", "bucket_step", "repeats", "trigger",
                "batch_size", "seed", "timestep_sampling", "shift", "sigmoid_scale", "learning_rate", "weight_decay")


@dataclass
class TrainConfig:
    """One LoRA training run. Paths are strings so the config round-trips through JSON unchanged."""

    dataset: str
    out: str
    model: str = "tiny"
    variant: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    models_dirs: tuple[str, ...] = ()
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    resolution: int = 1024  # bucket area = resolution², sides multiples of bucket_step
    bucket_step: int = 64
    repeats: int = 1
    trigger: str | None = None
    timestep_sampling: str = "shift"
    shift: float = 2.2
    sigmoid_scale: float = 1.0
    seed: int = 42
    save_every: int = 0  # checkpoint every N steps (0: only at the end / on Ctrl-C)
    sample_every: int = 0  # sample images every N steps (0: never)
    sample_prompts: tuple[str, ...] = ()
    sample_seeds: tuple[int, ...] = (42,)
    sample_steps: int | None = None
    sample_cfg: float | None = None
    sample_size: int | None = None
    format: str = "peft"
    optimizer: str = "auto"
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    device: str | None = None
    dtype: str | None = None
    resume: str | None = None
    preflight: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.models_dirs = tuple(str(d) for d in self.models_dirs)
        self.targets = tuple(self.targets)
        self.sample_prompts = tuple(self.sample_prompts)
        self.sample_seeds = tuple(int(s) for s in self.sample_seeds)
        self.check()

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def check(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise InvalidRequest(msg, code="bad_train_config")

        need(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(1 <= self.rank <= 1024, f"rank must be in 1..1024 (got {self.rank})")
        need(self.alpha is None or self.alpha > 0, f"alpha must be > 0 (got {self.alpha})")
        need(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate})")
        need(self.repeats >= 1, f"repeats must be >= 1 (got {self.repeats})")
        need(self.bucket_step >= 16 and self.bucket_step % 16 == 0,
             f"bucket_step must be a multiple of 16 (got {self.bucket_step})")
        need(self.resolution >= self.bucket_step and self.resolution % 16 == 0,
             f"resolution must be a multiple of 16 and >= bucket_step (got {self.resolution})")
        need(self.timestep_sampling in TIMESTEP_SAMPLINGS,
             f"timestep_sampling '{self.timestep_sampling}' unknown; valid: {', '.join(TIMESTEP_SAMPLINGS)}")
        need(self.shift > 0, f"shift must be > 0 (got {self.shift})")
        need(self.format in FORMATS, f"format '{self.format}' unknown; valid: {', '.join(FORMATS)}")
        need(self.optimizer in OPTIMIZERS, f"optimizer '{self.optimizer}' unknown; valid: {', '.join(OPTIMIZERS)}")
        need(self.mixed_precision in MIXED_PRECISIONS,
             f"mixed_precision '{self.mixed_precision}' unknown; valid: {', '.join(MIXED_PRECISIONS)}")
        need(bool(self.targets), "targets must name at least one module")
        need(self.save_every >= 0 and self.sample_every >= 0, "save_every and sample_every must be >= 0")
        need(not self.sample_every or bool(self.sample_prompts), "sample_every needs at least one sample prompt")
        need(bool(self.sample_seeds), "sample_seeds must not be empty")
        need(str(self.out).endswith(".safetensors"), f"out must be a .safetensors file (got '{self.out}')")

    # ---- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown training config keys: {', '.join(unknown)}", code="bad_train_config")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A plain config JSON, or the ``NAME.json`` written beside a LoRA (``{"config": {...}, "step": ...}``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"cannot read training config {path}: {e}", code="bad_train_config") from None
        return cls.from_dict(data["config"] if isinstance(data.get("config"), dict) else data)

    def fixed_differences(self, other: TrainConfig) -> list[str]:
        """The RESUME_FIXED fields where ``other`` differs (a checkpoint from another run must not be resumed)."""
        a, b = self.to_dict(), other.to_dict()
        for d in (a, b):  # the same folder or file given by another spelling is the same run
            for k in ("dataset", "model"):
                if Path(d[k]).expanduser().exists():
                    d[k] = str(Path(d[k]).expanduser().resolve())
        return [f"{k}: {b[k]!r} -> {a[k]!r}" for k in RESUME_FIXED if a[k] != b[k]]
