"""4-bit DiT files: nunchaku SVDQuant (see nunchaku.py), our portable groupwise int4, bitsandbytes NF4/FP4.

Our int4 file (``qwenstudio convert SRC DST --to int4``) keeps the diffusers names; each quantized Linear stores
``<layer>.weight_int4`` (uint8 [out, in/2], two codes per byte), ``<layer>.weight_scale`` and ``<layer>.weight_zero``
(bf16 [out, in/64]) and its bias; the small sensitive layers of ``FP8_KEEP_HIGH_PRECISION`` stay bf16. It loads and
runs on any device (quant/int4.py). bitsandbytes files (``*.weight.quant_state.bitsandbytes__nf4``, as diffusers'
bitsandbytes quantizer saves them) need the ``bitsandbytes`` package and CUDA or a CPU (quant/nf4.py): they are
recognised everywhere and refused with the reason where they cannot run.
"""

from __future__ import annotations

from ...errors import IncompatibleWeights, UnsupportedFormat
from .detect import FileInfo
from .keymaps import infer_dit_config, strip_dit_prefix

INT4_SUFFIXES = (".weight_int4", ".weight_scale", ".weight_zero")
BNB_MARKER = ".weight.quant_state.bitsandbytes__"


def load_dit_four_bit(info: FileInfo, *, device, dtype):
    """Dispatch on the detected 4-bit flavour."""
    if info.quant.startswith("svdq_"):
        from .nunchaku import load_dit_svdquant

        return load_dit_svdquant(info.path, device=device, dtype=dtype)
    if info.quant.startswith("int4"):
        return load_dit_int4(info, device=device, dtype=dtype)
    return load_dit_bnb(info, device=device, dtype=dtype)


def load_dit_int4(info: FileInfo, *, device, dtype):
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from ..loading import build_empty
    from ..quant.int4 import Int4WeightLinear

    layers = sorted({k[: -len(".weight_int4")] for k in info.shapes if k.endswith(".weight_int4")})
    shapes = {strip_dit_prefix(k): s for k, s in info.shapes.items()}
    for layer in layers:  # the logical weight shape, for config inference
        n, half = info.shapes[layer + ".weight_int4"]
        shapes[strip_dit_prefix(layer) + ".weight"] = (n, half * 2)
    try:
        config = infer_dit_config(shapes, info.metadata)
    except (KeyError, ValueError, IndexError) as e:
        raise IncompatibleWeights(f"{info.path}: cannot infer the DiT configuration (missing {e})") from None
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    handled: set[str] = set()
    with safe_open(str(info.path), framework="pt") as f:
        for layer in layers:
            name = strip_dit_prefix(layer)
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise IncompatibleWeights(f"{info.path}: '{name}' has no place in a Qwen-Image DiT") from None
            packed, scale, zero = (f.get_tensor(layer + s).to(device) for s in INT4_SUFFIXES)
            if tuple(packed.shape) != (old.out_features, old.in_features // 2):
                raise IncompatibleWeights(f"{info.path}: '{name}' has shape {tuple(packed.shape)} (packed), the "
                                          f"model expects {(old.out_features, old.in_features // 2)}")
            bias = f.get_tensor(layer + ".bias").to(device=device, dtype=dtype) if old.bias is not None else None
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Int4WeightLinear.from_tensors(packed, scale, zero, bias))
            handled |= {layer + s for s in INT4_SUFFIXES} | {layer + ".bias"}

    return fill_unhandled(model, info, handled, device=device, dtype=dtype)


def load_dit_bnb(info: FileInfo, *, device, dtype, config: dict | None = None, shards: tuple[FileInfo, ...] = ()):
    """A pre-quantized bitsandbytes NF4/FP4 DiT (what diffusers' bitsandbytes quantizer saves with
    ``save_pretrained``; double-quantized statistics too): each Linear with a ``.weight.quant_state.bitsandbytes__*``
    entry becomes ``bnb.nn.Linear4bit`` rebuilt from its stored codes and statistics, computing in ``dtype``.
    ``config``: the transformer config; by default the ``config.json`` diffusers wrote beside the file, else one
    inferred from the tensors (the 4-bit layers' logical shapes are in their quant-state blobs). ``shards``: the
    other files of a sharded transformer folder (a layer's statistics may sit in another shard than its codes)."""
    from ..quant.nf4 import nf4_support

    reason = nf4_support(device)
    if reason is not None:
        raise UnsupportedFormat(f"{info.path}: {info.quant} (bitsandbytes) weights cannot be loaded on {device}: "
                                f"{reason}. `qwenstudio convert SRC DST --to int4` makes a 4-bit file that runs "
                                "anywhere.")
    from contextlib import ExitStack

    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from ..loading import build_empty
    from ..quant.nf4 import import_bitsandbytes, keep_codes_as_stored

    bnb = import_bitsandbytes()

    infos = [info, *shards]
    where = {k: i.path for i in infos for k in i.shapes}  # key -> its file
    layers = sorted({k.split(BNB_MARKER)[0] for k in where if BNB_MARKER in k})
    config = config or bnb_dit_config(info, layers)
    config = {k: v for k, v in config.items() if k != "quantization_config" and not k.startswith("_")}
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    handled: set[str] = set()
    with ExitStack() as stack:
        files = {i.path: stack.enter_context(safe_open(str(i.path), framework="pt")) for i in infos}

        def get(key):
            return files[where[key]].get_tensor(key)

        for layer in layers:
            name = strip_dit_prefix(layer)
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise IncompatibleWeights(f"{info.path}: '{name}' has no place in a Qwen-Image DiT") from None
            head = layer + ".weight."
            stats = {k[len(head):]: get(k) for k in where if k.startswith(head)}
            handled |= {layer + ".weight", layer + ".bias"} | {head + s for s in stats}  # from_prequantized pops
            weight = bnb.nn.Params4bit.from_prequantized(get(layer + ".weight"), stats, requires_grad=False,
                                                         device=device)
            if tuple(weight.quant_state.shape) != (old.out_features, old.in_features):
                raise IncompatibleWeights(f"{info.path}: '{name}' holds a {tuple(weight.quant_state.shape)} weight, "
                                          f"the model expects {(old.out_features, old.in_features)}")
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                    quant_type=weight.quant_type, device="meta")
            new.weight = weight
            if old.bias is not None:
                new.bias = torch_parameter(get(layer + ".bias").to(device=device, dtype=dtype))
            keep_codes_as_stored(new)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)

    return fill_unhandled(model, info, handled, device=device, dtype=dtype, paths=[i.path for i in infos])


def bnb_dit_config(info: FileInfo, layers: list[str]) -> dict:
    """The config of a bitsandbytes DiT file: diffusers' ``config.json`` beside it (it holds what the tensors
    cannot say, e.g. the RoPE axes of a non-standard head size), else inferred from the tensors."""
    import json

    beside = info.path.parent / "config.json"
    if beside.is_file():
        try:
            config = json.loads(beside.read_text())
        except (OSError, ValueError):
            config = {}
        if config.get("_class_name") == "QwenImageTransformer2DModel":
            return config
    from safetensors import safe_open

    shapes = {strip_dit_prefix(k): s for k, s in info.shapes.items()}
    with safe_open(str(info.path), framework="pt") as f:
        for layer in layers:  # packed weights are [n*k/2, 1]: the logical shape is in the quant-state JSON blob
            blob = next(k for k in info.shapes if k.startswith(layer + BNB_MARKER))
            state = json.loads(bytes(f.get_tensor(blob).tolist()).decode("utf-8"))
            shapes[strip_dit_prefix(layer) + ".weight"] = tuple(state["shape"])
    try:
        return infer_dit_config(shapes, info.metadata)
    except (KeyError, ValueError, IndexError) as e:
        raise IncompatibleWeights(f"{info.path}: cannot infer the DiT configuration (missing {e})") from None


def fill_unhandled(model, info: FileInfo, handled: set[str], *, device, dtype, paths=None):
    """Every tensor of the file (or ``paths``) the 4-bit layers did not take (norms, embeddings, kept layers)."""
    from ..loading import fill_module, iter_safetensors

    rest = ((key, t) for key, t in iter_safetensors(paths or [info.path]) if key not in handled)
    fill_module(model, rest, dtype=dtype, device=device, name=f"transformer ({info.path.name})",
                key_map=strip_dit_prefix)
    return model.eval()


def torch_parameter(t):
    import torch

    return torch.nn.Parameter(t, requires_grad=False)
