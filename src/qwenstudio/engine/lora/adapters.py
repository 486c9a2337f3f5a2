"""LoRAs applied as low-rank side branches, switchable between requests without touching the base weights.

Why side branches rather than merging: the base may be quantized (fp8, GGUF) so there is no float weight to add
into, merging + un-merging drifts in bf16, and switching stacks per request must not reload 20B of weights. Each
targeted module is wrapped in ``LoraLinear(base)``, whose forward only *calls* ``base(x)`` (never reads its
``.weight``) and adds ``scale_i * up_i(down_i(x))``. Modules no active LoRA targets are unwrapped again, so with an
empty stack the model is exactly the original module tree. ``fuse()`` is the opt-in speed path for a stack used
repeatedly on a float model, with a bit-exact ``unfuse()``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InvalidRequest
from .keys import LoraFile, linear_targets, read_lora_file

MAX_WEIGHT = 10.0
# (down [r, in], up [out, r], scale, bias [out] or None), or (None, delta [out, in] or None, weight, bias or None);
# the output gains scale * (up(down(x)) + bias).
Branch = tuple[Any, Any, float, Any]


class LoraLinear(nn.Module):
    """``y = base(x) + sum_i scale_i * ((x @ down_i.T) @ up_i.T + bias_i)``, computed in x's dtype on x's device."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches: list[Branch] = []

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        if not self.branches:
            return y
        extra = None
        for down, up, scale, bias in self.branches:
            # .to() is a no-op when dtype/device already match (why: survives model.to(fp32) retries).
            b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
            if up is None:  # a bias-only adapter (ComfyUI diff_b)
                h = b.expand(*y.shape[:-1], b.shape[0])
            else:
                up = up.to(device=x.device, dtype=x.dtype)
                h = nn.functional.linear(x, up, b) if down is None else nn.functional.linear(
                    nn.functional.linear(x, down.to(device=x.device, dtype=x.dtype)), up, b
                )
            h = h * scale
            extra = h if extra is None else extra + h
        return y + extra.to(y.dtype)


class LoraManager:
    """Owns the LoRA state of one DiT. The engine calls ``set_stack`` at the start of each request; the same stack
    twice is a no-op, another stack rebuilds only the side branches. Loaded files are cached by path + mtime + size
    (``max_files`` most recent), already moved to the model's device and dtype."""

    def __init__(self, model: nn.Module, *, device=None, dtype=None, max_files: int = 8):
        # The compute dtype is that of a regular float parameter (fp8 weights or GGUF bytes would be wrong targets).
        p = next((q for q in model.parameters() if q.dtype in (torch.float32, torch.bfloat16, torch.float16)), None)
        self.model = model
        self.device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        self.dtype = dtype or (p.dtype if p is not None else torch.float32)
        self.max_files = max_files
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._prepared: dict[tuple, Branch] = {}
        self._stack: list[tuple[LoraFile, float]] = []
        self._fused: dict[str, tuple] | None = None  # module name -> original (weight, bias or None), CPU copies

    # ---- files -------------------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> LoraFile:
        """Parse (or fetch from cache) a LoRA file for this model. A file that is only partly applied (keys matching
        no module, text-encoder keys) warns once, and says what in ``LoraFile.report`` (a ``LoraMatchReport``)."""
        path = Path(path).expanduser().resolve()
        st = path.stat() if path.exists() else None
        key = (str(path), st.st_mtime_ns if st else 0, st.st_size if st else 0)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        lf = read_lora_file(path, linear_targets(self.model))
        if lf.report is not None and lf.report.warning():
            warnings.warn(lf.report.warning(), stacklevel=2)  # partial matches are never silent
        self._files[key] = lf
        while len(self._files) > self.max_files:
            self._files.popitem(last=False)
        self._prune()
        return lf

    def _prune(self) -> None:
        """Forget device copies of files neither cached nor active."""
        keep = set(self._files.values()) | {f for f, _ in self._stack}
        self._prepared = {k: v for k, v in self._prepared.items() if k[0] in keep}

    @property
    def stack(self) -> list[tuple[LoraFile, float]]:
        return list(self._stack)

    @property
    def fused(self) -> bool:
        return self._fused is not None

    # ---- the active stack ----------------------------------------------------------------------------------------
    def set_stack(self, stack: Sequence[tuple[LoraFile | str | Path, float]]) -> None:
        """Make exactly ``stack`` active (a list of (file or path, weight)). Weight 0 entries are dropped so they
        have exactly no effect. If a fused stack is active and the new one differs, it is unfused first."""
        resolved: list[tuple[LoraFile, float]] = []
        for item, weight in stack:
            weight = check_weight(weight)
            lf = item if isinstance(item, LoraFile) else self.load(item)
            if weight != 0.0:
                resolved.append((lf, weight))
        if _same(resolved, self._stack):
            return
        if self._fused is not None:
            self.unfuse(reinstall=False)
        self._stack = resolved
        self._install()
        self._prune()

    def clear(self) -> None:
        """No LoRA at all: unfuse if fused and unwrap every module."""
        self.set_stack([])

    def _install(self) -> None:
        wanted: dict[str, list[Branch]] = {}
        for lf, weight in self._stack:
            for name in lf.weights:
                wanted.setdefault(name, []).append(self._branch(lf, name, weight))
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLinear) and name not in wanted:
                _set_module(self.model, name, module.base)
        for name, branches in wanted.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                _set_module(self.model, name, module)
            module.branches = branches

    def _branch(self, lf: LoraFile, name: str, weight: float) -> Branch:
        key = (lf, name)
        if key not in self._prepared:
            w = lf.weights[name]
            kw = {"device": self.device, "dtype": self.dtype}
            if w.kind == "lora":  # bias in units of the branch scale: scale * (up(down(x)) + bias) = the PEFT output
                bias = None if w.bias is None else (w.bias_delta() / w.scale if w.scale else None)
                self._prepared[key] = (w.down.to(**kw), w.up.to(**kw), w.scale, None if bias is None else bias.to(**kw))
            else:  # LoKr/LoHa/full/bias-only: the dense delta, built once per file and module, when first activated
                bias = w.bias_delta(**kw)
                self._prepared[key] = (None, w.delta(**kw), 1.0, bias)
        down, up, scale, bias = self._prepared[key]
        return down, up, scale * weight, bias

    # ---- fuse / unfuse -----------------------------------------------------------------------------------------
    def fuse(self) -> None:
        """Add the active stack's deltas into the base weights (fp32 sum, cast back) and drop the side branches.
        Only for float ``nn.Linear`` bases: a quantized weight cannot take an exact float delta."""
        if self._fused is not None or not self._stack:
            return
        names = sorted({n for lf, _ in self._stack for n in lf.weights})
        bad = []
        for n in names:
            m = self.model.get_submodule(n)
            base = m.base if isinstance(m, LoraLinear) else m
            if type(base) is not nn.Linear or not base.weight.is_floating_point():
                bad.append(f"{n} ({type(base).__name__}, {getattr(getattr(base, 'weight', None), 'dtype', '?')})")
        if bad:
            raise InvalidRequest(
                "cannot fuse LoRAs into quantized or non-Linear modules (their weights are not plain float tensors; "
                f"the side branches keep working unfused): {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
            )
        originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for n in names:
                m = self.model.get_submodule(n)
                base = m.base if isinstance(m, LoraLinear) else m
                W, B = base.weight, base.bias
                delta = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
                bdelta = None
                for lf, weight in self._stack:
                    if n in lf.weights:
                        down, up, scale, bias = self._branch(lf, n, weight)
                        if up is not None:
                            d = up.float() if down is None else up.float() @ down.float()
                            delta += d.to(W.device) * scale
                        if bias is not None:
                            if B is None:
                                raise InvalidRequest(f"cannot fuse a bias delta into '{n}', which has no bias "
                                                     "(the side branches keep working unfused)")
                            bd = bias.float().to(W.device) * scale
                            bdelta = bd if bdelta is None else bdelta + bd
                originals[n] = (W.detach().to("cpu", copy=True),
                                None if bdelta is None else B.detach().to("cpu", copy=True))
                W.copy_((W.float() + delta).to(W.dtype))
                if bdelta is not None:
                    B.copy_((B.float() + bdelta).to(B.dtype))
                if isinstance(m, LoraLinear):
                    _set_module(self.model, n, base)
        self._fused = originals

    def unfuse(self, *, reinstall: bool = True) -> None:
        """Restore the original weights bit-exactly (copied back in place: same storage), then put the side branches
        back so the active stack keeps its effect."""
        if self._fused is None:
            return
        with torch.no_grad():
            for n, (orig, orig_bias) in self._fused.items():
                m = self.model.get_submodule(n)
                base = m.base if isinstance(m, LoraLinear) else m
                base.weight.copy_(orig)
                if orig_bias is not None:
                    base.bias.copy_(orig_bias)
        self._fused = None
        if reinstall:
            self._install()


def _same(a: list[tuple[LoraFile, float]], b: list[tuple[LoraFile, float]]) -> bool:
    return len(a) == len(b) and all(x is y and wx == wy for (x, wx), (y, wy) in zip(a, b))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


# ---- stack specs -------------------------------------------------------------------------------------------------

def check_weight(weight: Any) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise InvalidRequest(f"LoRA weight '{weight}' is not a number") from None
    if not math.isfinite(w) or not -MAX_WEIGHT <= w <= MAX_WEIGHT:
        raise InvalidRequest(f"LoRA weight {weight} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return w


def parse_lora_arg(text: str) -> tuple[str, float]:
    """CLI ``name[:weight]`` (weight defaults to 1.0). The weight is split at the LAST colon and only if it parses
    as a number, so Windows paths like ``C:\\loras\\x.safetensors`` stay whole."""
    text = text.strip()
    if text.startswith("<lora:") and text.endswith(">"):  # prompt-tag form <lora:name:weight>
        text = text[len("<lora:"):-1]
    name, sep, tail = text.rpartition(":")
    weight: Any = 1.0
    try:
        weight = float(tail) if sep else 1.0  # "nan"/"inf" parse here and are then refused by check_weight
    except ValueError:
        name = text
    if not sep:
        name = text
    if not name.strip():
        raise InvalidRequest(f"empty LoRA name in '{text}'")
    return name.strip(), check_weight(weight)


def parse_stack_spec(text: str) -> list[tuple[str, float]]:
    """Several ``name : weight`` entries separated by commas or newlines (SwarmUI's LoRA text; ``<lora:..>`` tags
    also accepted). Blank entries are ignored."""
    return [parse_lora_arg(part) for part in re.split(r"[,\n]", text) if part.strip()]
