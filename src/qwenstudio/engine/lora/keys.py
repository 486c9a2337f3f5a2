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
    r"|lora_(?:up|down)\.bias|lokr_(?:w1_a|w1_b|w2_a|w2_b|w1|w2|t2)|hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2))$"
)
# Keys of text-encoder LoRAs (kohya ``lora_te*_``, diffusers ``text_encoder.``, ComfyUI LoraSave ``text_encoders.``):
# qwenstudio applies LoRAs to the DiT only, so these are reported by name, never dropped silently.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoders.",
                         "text_encoder_2.", "te.")
# safetensors metadata key diffusers (>= 0.35) writes with the PEFT LoraConfig: {"r", "lora_alpha", ...}.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def _role(suffix: str) -> str:
    """Suffix -> canonical role: down, up, alpha, or the LyCORIS tensor name itself."""
    if suffix.startswith("lora_down") and suffix.endswith(".bias"):
        return "down_bias"  # a bias on the down projection: not representable as a weight delta
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
    bias: Any = None  # [out]: PEFT ``lora_B.bias`` (times ``scale``) or ComfyUI ``diff_b`` (never scaled)
    bias_is_diff: bool = False  # True for ``diff_b``: added as is, alpha/rank does not apply

    @property
    def rank(self) -> int | None:
        if self.kind == "lora":
            return int(self.down.shape[0])
        if self.kind == "loha":
            return int(self.factors["hada_w1_b"].shape[0])
        if self.kind == "bias":
            return None
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
        if self.kind == "bias":
            return None
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

    def bias_delta(self, dtype=None, device=None):
        """The bias delta [out], scale included (``None`` if the adapter has no bias part)."""
        import torch

        if self.bias is None:
            return None
        d = self.bias.to(device=device, dtype=torch.float32).reshape(-1)
        d = d if self.bias_is_diff else d * self.scale
        return d.to(dtype) if dtype is not None else d

    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta, without building it (in = -1 for a bias-only adapter)."""
        if self.kind == "bias":
            return int(self.bias.numel()), -1
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


@dataclass
class LoraMatchReport:
    """What of a LoRA file was applied: a partial match is never silent. ``text_encoder``: keys for the text encoder
    (not applied: LoRAs act on the DiT only); ``unmatched``: every other key no module took (other architecture,
    norm ``.diff`` tensors, incomplete pairs, LoCon mids); ``alpha_source``: where the scale came from."""

    file: str
    total_keys: int
    applied_keys: int
    modules: int
    unmatched: list[str] = field(default_factory=list)
    text_encoder: list[str] = field(default_factory=list)
    alpha_source: str = "none"  # "tensors" (.alpha keys), "lora_adapter_metadata", "adapter_config.json", "none"

    @property
    def complete(self) -> bool:
        return not self.unmatched and not self.text_encoder

    def warning(self) -> str | None:
        """One line for the CLI / logs, or None when every key was applied."""
        if self.complete:
            return None
        parts = []
        if self.text_encoder:
            parts.append(f"{len(self.text_encoder)} text-encoder keys not applied (LoRAs act on the DiT only)")
        if self.unmatched:
            shown = ", ".join(self.unmatched[:3]) + (" ..." if len(self.unmatched) > 3 else "")
            parts.append(f"{len(self.unmatched)} keys matched no module ({shown})")
        return (f"LoRA {self.file}: applied {self.applied_keys} of {self.total_keys} keys to {self.modules} modules; "
                + "; ".join(parts))

    def as_metadata(self, limit: int = 50) -> dict:
        """JSON-able summary for result metadata (key lists capped at ``limit``)."""
        return {"file": self.file, "total_keys": self.total_keys, "applied_keys": self.applied_keys,
                "modules": self.modules, "alpha_source": self.alpha_source,
                "unmatched": self.unmatched[:limit], "unmatched_count": len(self.unmatched),
                "text_encoder_keys": self.text_encoder[:limit], "text_encoder_count": len(self.text_encoder)}


@dataclass(eq=False)
class LoraFile:
    """A parsed LoRA: canonical weights per module, keys that matched no module, the file's metadata and the match
    report (``report``: put ``report.as_metadata()`` in results, ``report.warning()`` on the console). Compared and
    hashed by identity (a loaded file is a cache entry, not a value)."""

    path: Path
    weights: dict[str, LoraWeights]
    unmatched: list[str]
    metadata: dict[str, str]
    style: str
    report: LoraMatchReport | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    def as_metadata(self, weight: float) -> dict:
        """The entry for a result's ``metadata["loras"]``: name, weight, file name, plus ``match`` (the report) when
        the file was only partly applied."""
        entry: dict = {"name": self.name, "weight": weight, "file": self.path.name}
        if self.report is not None and not self.report.complete:
            entry["match"] = self.report.as_metadata()
        return entry


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
    state: dict[str, Any], targets: dict[str, tuple[int, int]], *, source: str = "LoRA",
    default_alpha: float | None = None, alpha_pattern: dict[str, float] | None = None,
) -> tuple[dict[str, LoraWeights], list[str], str]:
    """Canonicalise a LoRA state dict against the model's linear modules.
    ``default_alpha`` / ``alpha_pattern`` (module-name suffix -> alpha): PEFT's ``lora_alpha`` for files that carry
    alpha in metadata rather than as ``.alpha`` tensors. Returns (weights per module, unmatched keys, detected
    style). Raises IncompatibleWeights when nothing matches or a shape disagrees with the model, UnsupportedFormat
    for adapter types that need the base weight (DoRA)."""
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

    dora = [k for g in groups.values() for k in g["_keys"] if k.endswith(".dora_scale")]
    if dora:
        raise UnsupportedFormat(
            f"{source}: DoRA ({len(dora)} modules, e.g. '{dora[0]}') rescales each column by the norm of the merged "
            "base weight, which the switchable side branches never read; not supported (merge it into the base "
            "with its trainer, or use a plain LoRA)"
        )
    weights: dict[str, LoraWeights] = {}
    for target, g in groups.items():
        keys = g.pop("_keys")
        alpha = float(g.pop("alpha").float().reshape(-1)[0]) if "alpha" in g else _pattern_alpha(
            target, default_alpha, alpha_pattern)
        if {"down", "up"} <= g.keys() and not g.keys() - {"down", "up", "bias", "diff_b"}:
            w = LoraWeights("lora", down=_as_2d(g["down"]), up=_as_2d(g["up"]), alpha=alpha)
            if w.up.shape[1] != w.down.shape[0]:
                raise CorruptFile(f"{source}: '{keys[0]}': up {tuple(w.up.shape)} and down {tuple(w.down.shape)} ranks differ")
            if "diff_b" in g and "bias" in g:  # two bias deltas with different scaling: never half-apply
                unmatched.extend(keys)
                continue
            if "diff_b" in g:  # ComfyUI LoraSave: an unscaled bias diff beside the low-rank weight
                w.bias, w.bias_is_diff = g["diff_b"], True
            elif "bias" in g:  # PEFT lora_bias=True: lora_B's bias, scaled like the weight
                w.bias = g["bias"]
        elif g and all(k.startswith("hada_w") for k in g) and len(g) == 4:
            w = LoraWeights("loha", alpha=alpha, factors=dict(g))
        elif g and all(k.startswith("lokr_w") for k in g) and _lokr_complete(g):
            w = LoraWeights("lokr", alpha=alpha, factors=dict(g))
        elif set(g) == {"diff"} or set(g) == {"diff", "diff_b"}:
            w = LoraWeights("full", alpha=None, factors={"diff": g["diff"]}, bias=g.get("diff_b"), bias_is_diff=True)
        elif set(g) == {"diff_b"}:
            w = LoraWeights("bias", alpha=None, bias=g["diff_b"], bias_is_diff=True)
        else:  # incomplete pair, LoCon mid, down-projection bias, Tucker factors: never half-apply
            unmatched.extend(keys)
            continue
        want_in, want_out = targets[target]
        shape = w.shape()
        if shape != (want_out, want_in) and not (w.kind == "bias" and shape[0] == want_out):
            raise IncompatibleWeights(
                f"{source}: module '{target}' delta has shape {shape}, the model's is {(want_out, want_in)} "
                "— is this LoRA for another model size or architecture?"
            )
        if w.bias is not None and int(w.bias.numel()) != want_out:
            raise IncompatibleWeights(f"{source}: module '{target}' bias delta has {w.bias.numel()} values, "
                                      f"the model's has {want_out}")
        weights[target] = w

    if not weights:
        te = [k for k in unmatched if k.startswith(TEXT_ENCODER_PREFIXES)]
        shown = ", ".join(list(state)[:3]) + (" ..." if len(state) > 3 else "")
        what = ("all of them are text-encoder keys (LoRAs act on the DiT only)" if te and len(te) == len(unmatched)
                else "is it a LoRA for another architecture (or for the text encoder)?")
        raise IncompatibleWeights(
            f"{source}: none of its {len(state)} keys match a module of this model ({shown}); {what}",
            detail={"unmatched": unmatched[:50]},
        )
    style = "+".join(sorted(styles))
    return weights, sorted(unmatched), style


def _pattern_alpha(target: str, default: float | None, pattern: dict[str, float] | None) -> float | None:
    """PEFT ``alpha_pattern``: the longest key that is the module name or a dotted suffix of it wins."""
    best = None
    for k, v in (pattern or {}).items():
        if (target == k or target.endswith("." + k)) and (best is None or len(k) > len(best[0])):
            best = (k, float(v))
    return best[1] if best else default


def match_report(source: str, state_keys, weights: dict[str, LoraWeights], unmatched: list[str],
                 alpha_source: str) -> LoraMatchReport:
    te = [k for k in unmatched if k.startswith(TEXT_ENCODER_PREFIXES)]
    other = [k for k in unmatched if not k.startswith(TEXT_ENCODER_PREFIXES)]
    total = len(list(state_keys))
    return LoraMatchReport(file=source, total_keys=total, applied_keys=total - len(unmatched), modules=len(weights),
                           unmatched=other, text_encoder=te, alpha_source=alpha_source)


def peft_alpha(metadata: dict[str, str], path: Path) -> tuple[float | None, dict[str, float], str]:
    """PEFT/diffusers alpha for files without ``.alpha`` tensors: the ``lora_adapter_metadata`` JSON in the
    safetensors header (diffusers' save_lora_weights), else an ``adapter_config.json`` beside the file (PEFT's
    save_pretrained). Returns (lora_alpha or None, alpha_pattern, where it came from)."""
    import json

    raw, where = metadata.get(ADAPTER_METADATA_KEY), "lora_adapter_metadata"
    if raw is None and (path.parent / "adapter_config.json").is_file():
        raw, where = (path.parent / "adapter_config.json").read_text(), "adapter_config.json"
    if raw is None:
        return None, {}, "none"
    try:
        conf = json.loads(raw)
    except ValueError:
        raise CorruptFile(f"{path.name}: {where} is not JSON") from None
    if isinstance(conf, dict) and "lora_alpha" not in conf:
        # diffusers' per-component layouts: {"transformer": {...}} or flat {"transformer.lora_alpha": ...}
        nested = [v for v in conf.values() if isinstance(v, dict) and "lora_alpha" in v]
        flat = sorted(k[: -len("lora_alpha")] for k in conf if k.endswith(".lora_alpha"))
        if nested:
            conf = nested[0]
        elif flat:
            pre = "transformer." if "transformer." in flat else flat[0]
            conf = {k[len(pre):]: v for k, v in conf.items() if k.startswith(pre)}
    if not isinstance(conf, dict) or "lora_alpha" not in conf:
        return None, {}, "none"
    return float(conf["lora_alpha"]), {str(k): float(v) for k, v in (conf.get("alpha_pattern") or {}).items()}, where


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
    has_alpha_tensors = any(k.endswith(".alpha") for k in state)
    alpha, pattern, alpha_source = (None, {}, "tensors") if has_alpha_tensors else peft_alpha(metadata, path)
    weights, unmatched, style = convert_state_dict(state, targets, source=str(path.name), default_alpha=alpha,
                                                   alpha_pattern=pattern)
    report = match_report(path.name, state, weights, unmatched, alpha_source)
    return LoraFile(path=path, weights=weights, unmatched=unmatched, metadata=metadata, style=style, report=report)
