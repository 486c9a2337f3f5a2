"""Trainable LoRA branches on the engine's side-branch wrapper (``engine.lora.adapters.LoraLinear``).

``LoraLinear(base)`` computes ``base(x) + scale * up(down(x))`` and never reads the base's weight itself, so the
same wrapper works on a float, fp8 (``FP8Linear``) or GGUF (``GGUFLinear``) base. Training only makes ``down``
and ``up`` ``nn.Parameter``s (fp32 masters, cast to the activation dtype inside the wrapper, which autograd
follows); the base stays frozen: its forward is a functional matmul with a dequantized weight that does not
require grad, so autograd flows to the input (and on to earlier LoRA branches) but never builds a weight grad.
Initialisation as PEFT: ``down`` Kaiming-uniform, ``up`` zeros, so step 0 is exactly the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.lora.adapters import LoraLinear
from ..engine.lora.keys import linear_targets
from ..errors import InvalidRequest


def match_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Module names (sorted) of the DiT's linears that end with one of ``targets`` (e.g. ``attn.to_q``) or equal
    one exactly. A target that matches nothing is an error: a typo must not train a LoRA on fewer modules."""
    names = sorted(linear_targets(model))
    picked, unused = set(), []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            unused.append(t)
        picked.update(hits)
    if unused:
        raise InvalidRequest(f"LoRA target modules match no linear of the DiT: {', '.join(unused)} (examples of "
                             f"names: {', '.join(names[:4])})", code="bad_train_config")
    return sorted(picked)


class TrainableLora(nn.Module):
    """The trainable factors of one LoRA, keyed by the DiT's module names (``.`` -> ``/`` inside the dicts, since
    parameter names cannot hold dots)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, *, seed: int):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        g = torch.Generator().manual_seed(seed)
        for name in sorted(shapes):
            fan_in, fan_out = shapes[name]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
            d = (torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound
            self.down[_key(name)] = nn.Parameter(d)
            self.up[_key(name)] = nn.Parameter(torch.zeros(fan_out, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def module_names(self) -> list[str]:
        return [_name(k) for k in self.down.keys()]

    def factors(self):
        """(module name, down [r, in], up [out, r]) per module."""
        for k in self.down.keys():
            yield _name(k), self.down[k], self.up[k]

    def install(self, model: nn.Module) -> None:
        """Wrap each targeted module in a LoraLinear whose only branch is this LoRA's (trainable) factors."""
        for name, down, up in self.factors():
            module = model.get_submodule(name)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                _set_module(model, name, module)
            module.branches = [(down, up, self.scale, None)]  # (down, up, scale, bias): no bias delta trained

    def remove(self, model: nn.Module) -> None:
        for name in self.module_names:
            module = model.get_submodule(name)
            if isinstance(module, LoraLinear):
                _set_module(model, name, module.base)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat fp32 tensors for checkpoints (our own names; the export formats live in export.py)."""
        out = {}
        for name, down, up in self.factors():
            out[f"{name}.down"] = down.detach().float().cpu().contiguous()
            out[f"{name}.up"] = up.detach().float().cpu().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        want = set(self.state_tensors())
        if set(tensors) != want:
            missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
            raise InvalidRequest(f"checkpoint LoRA does not match this run (missing {missing[:3]}, extra "
                                 f"{extra[:3]}): same targets and model?", code="bad_checkpoint")
        with torch.no_grad():
            for name, down, up in self.factors():
                down.copy_(tensors[f"{name}.down"])
                up.copy_(tensors[f"{name}.up"])


def attach_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, *, seed: int) -> TrainableLora:
    """Freeze ``model``, create the LoRA for its matching linears on the model's device and install it."""
    model.requires_grad_(False)
    shapes = linear_targets(model)
    names = match_targets(model, targets)
    lora = TrainableLora({n: shapes[n] for n in names}, rank, alpha, seed=seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lora.to(device)
    lora.install(model)
    return lora


def _key(name: str) -> str:
    return name.replace(".", "/")


def _name(key: str) -> str:
    return key.replace("/", ".")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
