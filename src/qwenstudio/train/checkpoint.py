"""Resumable checkpoints without pickle: a folder of safetensors + JSON, replaced atomically.

    <out>.ckpt/
      lora.safetensors        the trainable factors (fp32, our own names)
      optimizer.safetensors   every tensor of ``optimizer.state_dict()`` as ``state.<param id>.<name>``, plus the
                              global RNG states (``rng.cpu``, ``rng.cuda``)
      state.json              step, loss history, the TrainConfig, the optimizer's param groups and non-tensor
                              state values (the JSON index of optimizer.safetensors)

Batches, noise and timesteps are drawn from generators seeded by (seed, step), so the step alone positions a resumed
run on the same data; the RNG states are kept for anything else that draws from the global generator.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest

STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    step: int
    losses: list[float]
    config: dict
    lora: dict
    optimizer: dict  # a state dict ready for optimizer.load_state_dict
    rng: dict


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".ckpt")


def save_checkpoint(folder: str | Path, *, step: int, losses: list[float], config, lora, optimizer) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(lora.state_tensors(), str(tmp / "lora.safetensors"))
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "losses": losses, "config": config.to_dict(), "param_groups": sd["param_groups"],
             "scalars": scalars, "optimizer_class": type(optimizer).__name__}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_checkpoint(folder: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        lora = load_file(str(folder / "lora.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise InvalidRequest(f"cannot resume from '{folder}': not a complete qwenstudio checkpoint ({e})",
                             code="bad_checkpoint") from None
    opt_state: dict = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = t
    for pid, values in state["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(values)
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return Checkpoint(step=int(state["step"]), losses=[float(x) for x in state["losses"]], config=state["config"],
                      lora=lora, optimizer={"state": opt_state, "param_groups": state["param_groups"]}, rng=rng)
