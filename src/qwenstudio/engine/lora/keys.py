"""Every LoRA key style in the wild, read into ONE canonical form keyed by the DiT's own module names.

Trainers disagree only on spelling: diffusers/PEFT write ``transformer.<module>.lora_A.weight`` (DiffSynth drops the
prefix and keeps PEFT's ``.default`` adapter name), ComfyUI/ai-toolkit/lightx2v write ``diffusion_model.<module>.``
with ``lora_down``/``lora_up`` or ``lora_A``/``lora_B`` (+ ``.alpha``), and kohya/musubi flatten the module path into
``lora_unet_transformer_blocks_0_attn_to_q``. The flattened form is ambiguous in general (``to_out_0`` vs
``to.out.0``), so it is resolved by matching against the underscore-joined names of the *model's actual modules*,
never by guessing where the dots went. LyCORIS LoKr/LoHa keep their factors; the full delta is built only when a
branch is first needed (``LoraWeights.delta``).

Canonical scale convention: ``scale = alpha / rank`` (alpha absent -> 1.0), the convention of kohya, PEFT and
ComfyUI alike, so ``delta = scale * up @ down``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CorruptFile, IncompatibleWeights, UnsupportedFormat
from ..loading import iter_safetensors, read_safetensors_header

# Prefixes in front of a dotted module path (most specific first).
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
# Prefixes in front of a kohya-style underscore-flattened module path.
FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "lora_")

_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>"
    r"lora_(?:A|B)(?:\.[^.]+)?\.weight|lora_(?:down|up)\.weight|lora\.(?:down|up)\.weight"
    r"|lora_linear_layer\.(?:down|up)\.weight|lora_mid\.weight|alpha|dora_scale|diff|diff_b|lora_B(?:\.[^.]+)?\.bias"
    r"|lokr_(?:w1_a|w1_b|w2_a|w2_b|w1|w2|t2)|hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2))$"
)


def _role(suffix: str) -> str:
    """Suffix -> canonical role: down, up, alpha, or the LyCORIS tensor name itself."""
    if suffix.endswith(".bias"):
        return "bias"
    head = suffix.split(".")[0]
    if head in ("lora_A", "lora_down") or suffix in ("lora.down.weight", "lora_linear_layer.down.weight"):
        return "down"
    if head in ("lora_B", "lora_up") or suffix in ("lora.up.weight", "lora_linear_layer.up.weight"):
        return "up"
    return head  # alpha, dora_scale, diff, diff_b, lora_mid, lokr_*, hada_*


@dataclass
class LoraWeights:
    """One module's adapter. kind "lora": ``down`` [r, in], ``up`` [out, r]; "lokr"/"loha"/"full": the factors
    (or the full ``diff``) in ``factors``; the full delta is built on demand by ``delta()``."""

    kind: str
    down: Any = None
    up: Any = None
    alpha: float | None = None
    factors: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        if self.kind == "lora":
            return int(self.down.shape[0])
        if self.kind == "loha":
            return int(self.factors["hada_w1_b"].shape[0])
        if self.kind == "lokr":  # ComfyUI: the factorised side sets the rank, w2's winning over w1's
            for k in ("lokr_w2_b", "lokr_w1_b"):
                if k in self.factors:
                    return int(self.factors[k].shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; 1.0 when there is no alpha (or no rank, e.g. an unfactorised LoKr or a full diff)."""
        rank = self.rank
        return 1.0 if self.alpha is None or not rank else self.alpha / rank

    def delta(self, dtype=None, device=None):
        """The full weight delta [out, in], scale included, computed in fp32 then cast (why: kron/product of bf16
        factors loses precision we do not need to lose)."""
        import torch

        f = {k: v.to(device=device, dtype=torch.float32) for k, v in self.factors.items()}
        if self.kind == "lora":
            d = self.up.to(device=device, dtype=torch.float32) @ self.down.to(device=device, dtype=torch.float32)
        elif self.kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        elif self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            d = torch.kron(w1, w2)
        else:
            d = f["diff"]
        d = d * self.scale
        return d.to(dtype) if dtype is not None else d

    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta, without building it."""
        if self.kind == "lora":
            return int(self.up.shape[0]), int(self.down.shape[1])
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_a"].shape[0]), int(f["hada_w1_b"].shape[1])
        if self.kind == "lokr":
            def dims(p):
                if f"{p}" in f:
                    return tuple(f[p].shape)
                return int(f[f"{p}_a"].shape[0]), int(f[f"{p}_b"].shape[1])

            (a, b), (c, d) = dims("lokr_w1"), dims("lokr_w2")
            return a * c, b * d
        return tuple(f["diff"].shape)  # type: ignore[return-value]


@dataclass(eq=False)
class LoraFile:
    """A parsed LoRA: canonical weights per module, keys that matched no module, the file's metadata. Compared and
    hashed by identity (a loaded file is a cache entry, not a value)."""

    path: Path
    weights: dict[str, LoraWeights]
    unmatched: list[str]
    metadata: dict[str, str]
    style: str

    @property
    def name(self) -> str:
        return self.path.stem


def linear_targets(model) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) for every linear-like module (nn.Linear or anything exposing
    ``in_features``/``out_features``, e.g. quantized linears; a LoraLinear wrapper stands for its base)."""
    out: dict[str, tuple[int, int]] = {}
    skip: set[str] = set()
    for name, m in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        base = getattr(m, "base", None) if type(m).__name__ == "LoraLinear" else None
        if base is not None:
            skip.add(name)
            m = base
        i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if isinstance(i, int) and isinstance(o, int):
            out[name] = (i, o)
    return out


def _resolve(module: str, targets: dict[str, tuple[int, int]], flat: dict[str, str | None]) -> tuple[str | None, str]:
    """A key's module part -> (model module name or None, style hint)."""
    for p in DOTTED_PREFIXES:
        if module.startswith(p) and module[len(p):] in targets:
            return module[len(p):], p.rstrip(".")
    if module in targets:
        return module, "bare"
    for p in FLAT_PREFIXES:
        if module.startswith(p):
            hit = flat.get(module[len(p):])
            if hit:
                return hit, "kohya"
    return None, ""


def convert_state_dict(
    state: dict[str, Any], targets: dict[str, tuple[int, int]], *, source: str = "LoRA"
) -> tuple[dict[str, LoraWeights], list[str], str]:
    """Canonicalise a LoRA state dict against the model's linear modules.
    Returns (weights per module, unmatched keys, detected style). Raises IncompatibleWeights when nothing matches or
    a shape disagrees with the model, UnsupportedFormat for adapter types that need the base weight (DoRA)."""
    flat_all: dict[str, list[str]] = defaultdict(list)
    for name in targets:
        flat_all[name.replace(".", "_")].append(name)
    flat = {k: (v[0] if len(v) == 1 else None) for k, v in flat_all.items()}  # ambiguous flat names never match

    groups: dict[str, dict[str, Any]] = defaultdict(dict)
    unmatched: list[str] = []
    styles: set[str] = set()
    for key, tensor in state.items():
        m = _SUFFIX.match(key)
        target, style = _resolve(m.group("module"), targets, flat) if m else (None, "")
        if target is None:
            unmatched.append(key)
            continue
        styles.add(style)
        groups[target][_role(m.group("suffix"))] = tensor
        groups[target].setdefault("_keys", []).append(key)

    weights: dict[str, LoraWeights] = {}
    for target, g in groups.items():
        keys = g.pop("_keys")
        if "dora_scale" in g:
            raise UnsupportedFormat(f"{source}: DoRA ('{keys[0]}') needs the base weight's norm; not supported")
        alpha = float(g.pop("alpha").float().reshape(-1)[0]) if "alpha" in g else None
        if {"down", "up"} <= g.keys() and not g.keys() - {"down", "up", "bias"}:
            if "bias" in g:  # a bias delta on the up projection (some lightx2v exports); not applied, reported
                unmatched.extend(k for k in keys if k.endswith(".bias"))
            w = LoraWeights("lora", down=_as_2d(g["down"]), up=_as_2d(g["up"]), alpha=alpha)
            if w.up.shape[1] != w.down.shape[0]:
                raise CorruptFile(f"{source}: '{keys[0]}': up {tuple(w.up.shape)} and down {tuple(w.down.shape)} ranks differ")
        elif g and all(k.startswith("hada_w") for k in g) and len(g) == 4:
            w = LoraWeights("loha", alpha=alpha, factors=dict(g))
        elif g and all(k.startswith("lokr_w") for k in g) and _lokr_complete(g):
            w = LoraWeights("lokr", alpha=alpha, factors=dict(g))
        elif set(g) == {"diff"} or set(g) == {"diff", "diff_b"}:
            if "diff_b" in g:
                unmatched.extend(k for k in keys if k.endswith(".diff_b"))
            w = LoraWeights("full", alpha=None, factors={"diff": g["diff"]})
        else:  # incomplete pair, LoCon mid, Tucker factors: never half-apply
            unmatched.extend(keys)
            continue
        want_in, want_out = targets[target]
        if w.shape() != (want_out, want_in):
            raise IncompatibleWeights(
                f"{source}: module '{target}' delta has shape {w.shape()}, the model's is {(want_out, want_in)} "
                "— is this LoRA for another model size or architecture?"
            )
        weights[target] = w

    if not weights:
        shown = ", ".join(list(state)[:3]) + (" ..." if len(state) > 3 else "")
        raise IncompatibleWeights(
            f"{source}: none of its {len(state)} keys match a module of this model ({shown}); "
            "is it a LoRA for another architecture (or for the text encoder)?",
            detail={"unmatched": unmatched[:50]},
        )
    style = "+".join(sorted(styles))
    return weights, sorted(unmatched), style


def _lokr_complete(g: dict) -> bool:
    def has(p: str) -> bool:
        return p in g or (f"{p}_a" in g and f"{p}_b" in g)

    return has("lokr_w1") and has("lokr_w2")


def _as_2d(t):
    """Conv-style [r, in, 1, 1] LoRA factors from some exporters -> [r, in]."""
    while t.ndim > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.ndim != 2:
        raise UnsupportedFormat(f"LoRA factor of shape {tuple(t.shape)} is not a linear LoRA")
    return t


def read_lora_file(path: str | Path, targets: dict[str, tuple[int, int]]) -> LoraFile:
    """Read a safetensors LoRA (by content: pickle is refused) and canonicalise it against ``targets``."""
    path = Path(path)
    header = read_safetensors_header(path)
    metadata = dict(header.get("__metadata__") or {})
    state = dict(iter_safetensors([path]))
    weights, unmatched, style = convert_state_dict(state, targets, source=str(path.name))
    return LoraFile(path=path, weights=weights, unmatched=unmatched, metadata=metadata, style=style)
