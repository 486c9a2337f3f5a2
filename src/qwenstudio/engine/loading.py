"""Load a diffusers-format Qwen-Image folder: build each model on the meta device, fill it from safetensors.

Why not ``from_pretrained``: we need one loading path for every file layout (diffusers folders here, ComfyUI single
files and GGUF later) with our own key maps, dtype policy and no pickle fallback. Models are built with
``accelerate.init_empty_weights`` (parameters on meta, buffers real: RoPE tables are computed at init), then every
tensor is read from the memory-mapped file, cast to the target dtype/device one at a time and assigned, so peak RAM
stays near one component, never the sum.

Progress: inside ``with load_progress(total_bytes, callback)`` every tensor ``fill_module`` assigns (whatever the file
layout: diffusers, ComfyUI, GGUF, 4-bit — they all fill through it) adds its bytes, and ``callback`` gets the fraction
done, at most every ``every`` (5 %) and once at 1.0. The reporter is a ``ContextVar`` (set for the duration of one
load on the loading thread, nothing shared), so no loader signature changes to carry it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CorruptFile, IncompatibleWeights, ModelNotFound, UnsupportedFormat

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """Everything the engine needs, loaded and ready, plus where it came from."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    device: Any
    dtype: Any
    identity: dict = field(default_factory=dict)


def default_dtype(device) -> Any:
    """bf16 on CUDA (what the weights are trained and shipped in), fp32 on CPU (bf16 matmuls are slow and lossy there)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- safetensors files -----------------------------------------------------------------------------------------

def looks_like_pickle(head: bytes, size: int) -> bool:
    """Zip (torch.save) or pickle protocol 2-5 (``\\x80 <proto>``). A safetensors header length can also start with
    byte 0x80, so a plausible length followed by ``{`` wins."""
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def read_safetensors_header(path: Path) -> dict:
    """Parse the JSON header of a safetensors file by content (8-byte little-endian length + JSON), validating that
    every tensor's byte range lies inside the file. Anything else (pickle, zip, truncated) is a typed error."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            if looks_like_pickle(head, size):
                raise UnsupportedFormat(
                    f"{path}: this is a pickle/zip checkpoint; it is never unpickled. Convert it to safetensors."
                )
            if len(head) < 9:
                raise CorruptFile(f"{path}: file is too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head[:8])
            if n < 2 or n > min(size - 8, 100 * 2**20):
                raise CorruptFile(f"{path}: not a valid safetensors file (header length {n}, file size {size})")
            raw = head[8:] + f.read(n - 1)
    except OSError as e:
        raise ModelNotFound(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptFile(f"{path}: safetensors header is not valid JSON") from None
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info.get("data_offsets", (0, -1))
        if not 0 <= start <= end <= data_len:
            raise CorruptFile(f"{path}: tensor '{key}' lies outside the file (truncated download?)")
    return header


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder (sharded or not). Pickle-only folders are refused."""
    if not folder.is_dir():
        raise ModelNotFound(f"missing component folder: {folder}")
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise UnsupportedFormat(
                f"{folder}: only pickle weights ({', '.join(pickles)}); qwenstudio loads safetensors only — "
                "convert them (e.g. with diffusers' save_pretrained(safe_serialization=True))"
            )
        raise ModelNotFound(f"{folder}: no .safetensors weights found")
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ModelNotFound(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def fingerprint(files: list[Path]) -> str:
    """Cheap identity of a set of weight files: hash of their headers and sizes (not the GBs of data)."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, 100 * 2**20)))
    return h.hexdigest()[:16]


def iter_safetensors(files: list[Path]):
    """Yield (key, tensor) from memory-mapped safetensors files, one tensor at a time."""
    from safetensors import safe_open

    for p in files:
        read_safetensors_header(p)
        try:
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, (CorruptFile, UnsupportedFormat)):
                raise
            raise CorruptFile(f"{p}: cannot read tensors ({e})") from None


# ---- building and filling ----------------------------------------------------------------------------------------

LOAD_REPORTER: ContextVar[Callable[[int], None] | None] = ContextVar("qwenstudio_load_reporter", default=None)


@contextmanager
def load_progress(total_bytes: int, callback: Callable[[float], Any] | None, every: float = 0.05):
    """Report to ``callback`` the fraction of ``total_bytes`` filled in by ``fill_module`` (see the module doc)."""
    if callback is None:
        yield
        return
    done, last = [0], [0.0]

    def add(nbytes: int) -> None:
        done[0] += nbytes
        fraction = min(1.0, done[0] / total_bytes) if total_bytes > 0 else 1.0
        if fraction - last[0] >= every or (fraction >= 1.0 > last[0]):
            last[0] = fraction
            callback(fraction)

    token = LOAD_REPORTER.set(add)
    try:
        yield
    finally:
        LOAD_REPORTER.reset(token)
    if last[0] < 1.0:  # loaded (not on an error): headers may over-count what a layout skips
        callback(1.0)


def build_empty(factory: Callable[[], Any]):
    """Run ``factory`` with parameters created on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def fill_module(
    module,
    tensors,
    *,
    dtype,
    device,
    name: str,
    key_map: Callable[[str], str | None] = lambda k: k,
    optional: tuple[str, ...] = (),
) -> None:
    """Assign tensors into a meta-built module. ``key_map`` renames file keys to module keys (None = skip key).
    Shape mismatches and missing keys are IncompatibleWeights naming the component; ``optional`` prefixes may be
    absent (they are then dropped from the module, e.g. an unused LM head)."""
    import torch

    expected = dict(module.state_dict(keep_vars=True))
    seen: set[str] = set()
    report = LOAD_REPORTER.get()
    for key, tensor in tensors:
        mkey = key_map(key)
        if mkey is None:
            continue
        target = expected.get(mkey)
        if target is None:
            raise IncompatibleWeights(f"{name}: unexpected tensor '{key}' — is this file for another model?")
        if tuple(target.shape) != tuple(tensor.shape):
            raise IncompatibleWeights(
                f"{name}: tensor '{key}' has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        cast = dtype if tensor.is_floating_point() and target.is_floating_point() else tensor.dtype
        # copy=True: never keep zero-copy views into the mmapped file — they pin the file and their alignment
        # differs between layouts, which changes CPU kernel rounding (bit-exactness across formats needs a copy).
        value = tensor.to(device=device, dtype=cast, copy=True)
        assign_tensor(module, mkey, value)
        seen.add(mkey)
        if report is not None:
            report(value.numel() * value.element_size())
    missing = [k for k, v in expected.items() if k not in seen and v.device.type == "meta"]
    required = [k for k in missing if not k.startswith(optional)]
    if required:
        shown = ", ".join(required[:5]) + (" ..." if len(required) > 5 else "")
        raise IncompatibleWeights(f"{name}: {len(required)} tensor(s) missing from the weights: {shown}")
    for k in missing:  # optional and absent: drop the parameter rather than leave a meta tensor behind
        assign_tensor(module, k, torch.empty(0, device=device, dtype=dtype))
    # Buffers built at init (RoPE tables) live on CPU: move them with the module, keeping their dtype.
    for mod in module.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.device != torch.device(device):
                setattr(mod, bname, buf.to(device))  # Module.__setattr__ keeps it a (non-)persistent buffer


def assign_tensor(module, key: str, value) -> None:
    import torch

    *path, leaf = key.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    if leaf in dict(mod.named_parameters(recurse=False)):
        setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))
    elif leaf in dict(mod.named_buffers(recurse=False)):
        setattr(mod, leaf, value)
    else:
        mod.register_buffer(leaf, value)


def text_encoder_key_map(key: str) -> str | None:
    """Checkpoint names of Qwen2.5-VL (as saved on the Hub and by ComfyUI) -> transformers 5 module names."""
    for old, new in (
        ("model.layers.", "model.language_model.layers."),
        ("model.embed_tokens.", "model.language_model.embed_tokens."),
        ("model.norm.", "model.language_model.norm."),
        ("visual.", "model.visual."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    return key


# ---- the diffusers folder ------------------------------------------------------------------------------------------

def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelNotFound(f"missing {what}: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptFile(f"{path}: not valid JSON") from None


def load_tokenizer(folder: Path):
    from transformers import Qwen2Tokenizer

    if not folder.is_dir() or not any(folder.glob("tokenizer*.json")) and not (folder / "vocab.json").exists():
        raise ModelNotFound(f"missing tokenizer: {folder} (needs tokenizer.json or vocab.json + merges.txt)")
    return Qwen2Tokenizer.from_pretrained(str(folder))


def check_diffusers_folder(root: Path) -> dict:
    """Cheap structural check (model_index.json and every component folder); returns the index."""
    if not root.is_dir():
        raise ModelNotFound(f"model folder not found: {root}")
    index = read_json(root / "model_index.json", "model_index.json (is this a diffusers folder?)")
    absent = [c for c in COMPONENTS if not (root / c).is_dir()]
    if absent:
        raise ModelNotFound(f"{root}: missing component folder(s): {', '.join(absent)}")
    return index


def load_diffusers_folder(path: str | Path, *, device=None, dtype=None, keep_lm_head: bool = False,
                          vae_dtype=None) -> Components:
    """Load transformer, VAE, text encoder, tokenizer and scheduler config from a diffusers folder.
    ``keep_lm_head`` loads the text encoder's LM head too (only the stock-pipeline benchmark needs it)."""
    import torch

    root = Path(path)
    index = check_diffusers_folder(root)
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    transformer = load_folder_transformer(root, device=device, dtype=dtype)
    parts = load_folder_companions(root, device=device, dtype=dtype, keep_lm_head=keep_lm_head, vae_dtype=vae_dtype)
    files = [f for c in ("transformer", "vae", "text_encoder") for f in component_files(root / c)]
    quant = folder_transformer_quant(read_json(root / "transformer" / "config.json", "transformer config"))
    identity = {"name": root.name, "format": "diffusers", "class": index.get("_class_name"),
                "fingerprint": fingerprint(files), **({"quant": quant} if quant else {})}
    return Components(transformer=transformer.eval(), device=device, dtype=dtype, identity=identity, **parts)


def folder_transformer_quant(t_cfg: dict) -> str | None:
    """``bnb_nf4`` / ``bnb_fp4`` for a transformer saved by diffusers' bitsandbytes 4-bit quantizer (its config's
    ``quantization_config``), else None. 8-bit bitsandbytes and other quantizers are refused by name."""
    q = t_cfg.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit", q.get("_load_in_4bit")):
        return f"bnb_{q.get('bnb_4bit_quant_type', 'fp4')}"
    kind = q.get("quant_method", "?") + (" 8-bit" if q.get("load_in_8bit") else "")
    raise UnsupportedFormat(f"transformer/config.json: a {kind} quantized transformer; qwenstudio reads "
                            "bitsandbytes 4-bit (nf4/fp4) folders, GGUF, fp8 and its own int4 files")


def load_folder_transformer(root: Path, *, device, dtype):
    from diffusers import QwenImageTransformer2DModel

    t_cfg = read_json(root / "transformer" / "config.json", "transformer config")
    if folder_transformer_quant(t_cfg) is not None:  # saved by diffusers' bitsandbytes quantizer
        from .formats.detect import detect
        from .formats.four_bit import load_dit_bnb

        first, *rest = (detect(f) for f in component_files(root / "transformer"))
        return load_dit_bnb(first, device=device, dtype=dtype, config=t_cfg, shards=tuple(rest))
    transformer = build_empty(lambda: QwenImageTransformer2DModel.from_config(t_cfg))
    fill_module(transformer, iter_safetensors(component_files(root / "transformer")), dtype=dtype, device=device,
                name="transformer")
    return transformer


def load_folder_companions(root: Path, *, device, dtype, keep_lm_head: bool = False, vae_dtype=None) -> dict:
    """A diffusers folder's VAE, text encoder, tokenizer and scheduler config — also the companions of a
    single-file DiT (GGUF/fp8) when the models home has the official folder but no separate TE/VAE files."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = load_tokenizer(root / "tokenizer")  # fail fast, before the big files
    v_cfg = read_json(root / "vae" / "config.json", "vae config")
    vae = build_empty(lambda: AutoencoderKLQwenImage.from_config(v_cfg))
    fill_module(vae, iter_safetensors(component_files(root / "vae")), dtype=vae_dtype or dtype, device=device,
                name="vae")

    te_cfg = Qwen2_5_VLConfig.from_dict(read_json(root / "text_encoder" / "config.json", "text encoder config"))
    text_encoder = build_empty(lambda: Qwen2_5_VLForConditionalGeneration(te_cfg))
    # The LM head (vocab x hidden, ~1 GB at full size) is never used to encode prompts: skip it.
    fill_module(
        text_encoder,
        iter_safetensors(component_files(root / "text_encoder")),
        dtype=dtype,
        device=device,
        name="text_encoder",
        key_map=lambda k: None if k.startswith("lm_head.") and not keep_lm_head else text_encoder_key_map(k),
        optional=("lm_head.",),
    )
    sched = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer, "scheduler_config": sched}
