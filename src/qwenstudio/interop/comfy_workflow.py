"""ComfyUI PNGs: the ``prompt`` text chunk is the API-format graph that ran (``{node_id: {class_type, inputs}}``,
an input being a literal or a link ``[node_id, output_index]``).

The sampler node (``KSampler`` / ``KSamplerAdvanced``) is the root: its seed/steps/cfg/sampler/scheduler, the
model chain behind its ``model`` input (``ModelSamplingAuraFlow`` shift, LoRA loaders, the UNET/checkpoint loader),
the text encodes behind ``positive``/``negative`` and the empty latent behind ``latent_image``.  Every node on
those paths that has no equivalent here is listed in ``unmapped``; nothing is inferred from a node we do not know.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from .names import sampler_name, scheduler_name
from .settings import PastedSettings, lora_name, set_size
from .swarmui import comfy_conventions

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
EMPTY_LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
TEXT_NODES = {"CLIPTextEncode": "text", "TextEncodeQwenImageEdit": "prompt", "TextEncodeQwenImageEditPlus": "prompt"}
MODEL_LOADERS = {"UNETLoader": "unet_name", "CheckpointLoaderSimple": "ckpt_name", "UnetLoaderGGUF": "unet_name"}
QWEN_DEFAULT_SHIFT = 1.15  # comfy/supported_models.py QwenImage sampling_settings: what runs without the node


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))


class _Graph:
    def __init__(self, nodes: dict[str, Any], out: PastedSettings) -> None:
        self.nodes, self.out = nodes, out

    def node(self, link: Any) -> tuple[str, dict[str, Any]] | None:
        if not _is_link(link) or str(link[0]) not in self.nodes:
            return None
        nid = str(link[0])
        return nid, self.nodes[nid]

    def literal(self, value: Any, what: str) -> Any:
        """A literal input, or the one value of a primitive node it links to (Primitive*, a seed node ...)."""
        if not _is_link(value):
            return value
        found = self.node(value)
        if found is not None:
            nid, node = found
            scalars = [v for v in node.get("inputs", {}).values() if not _is_link(v)]
            if len(scalars) == 1 and len(node.get("inputs", {})) == 1:
                return scalars[0]
            self.out.unmapped.append(f"{what}: from node {nid} ({node.get('class_type')})")
        else:
            self.out.unmapped.append(f"{what}: from a missing node {value[0]}")
        return None


def _pick_sampler(g: _Graph) -> tuple[str, dict[str, Any]]:
    samplers = [(nid, n) for nid, n in g.nodes.items() if n.get("class_type") in SAMPLER_NODES]
    others = sorted({str(n.get("class_type")) for n in g.nodes.values()
                     if "Sampler" in str(n.get("class_type")) and n.get("class_type") not in SAMPLER_NODES})
    if not samplers:
        hint = f" (it uses {', '.join(others)})" if others else ""
        raise InvalidRequest(f"ComfyUI workflow has no KSampler/KSamplerAdvanced node{hint}", code="unmapped_workflow")

    def from_empty(item):
        found = g.node(item[1].get("inputs", {}).get("latent_image"))
        return found is not None and found[1].get("class_type") in EMPTY_LATENTS

    first = [s for s in samplers if from_empty(s)] or samplers
    chosen = min(first, key=lambda s: (len(s[0]), s[0]))
    for nid, node in samplers:
        if nid != chosen[0]:
            g.out.unmapped.append(f"node {nid} ({node['class_type']}): a further sampling pass")
    return chosen


def _sampler_fields(g: _Graph, nid: str, node: dict[str, Any]) -> None:
    out, inputs = g.out, node.get("inputs", {})
    advanced = node["class_type"] == "KSamplerAdvanced"
    seed = g.literal(inputs.get("noise_seed" if advanced else "seed"), "seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        out.fields["seed"] = seed
    steps = g.literal(inputs.get("steps"), "steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        out.fields["steps"] = steps
    cfg = g.literal(inputs.get("cfg"), "cfg")
    if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
        out.fields["cfg"] = float(cfg)
    name = g.literal(inputs.get("sampler_name"), "sampler_name")
    if name is not None:
        sampler, _ = sampler_name(name)
        if sampler is None or sampler != name:
            out.unmapped.append(f"sampler_name: {name} (no such sampler here)")
        else:
            out.fields["sampler"] = sampler
    sched = g.literal(inputs.get("scheduler"), "scheduler")
    if sched is not None:
        if scheduler_name(sched) is None or sched == "reference":
            out.unmapped.append(f"scheduler: {sched} (no such scheduler here)")
        else:
            out.fields["scheduler"] = sched
    if advanced:
        if inputs.get("add_noise", "enable") != "enable":
            out.unmapped.append(f"node {nid}: add_noise {inputs.get('add_noise')}")
        start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
        if start != 0 or (isinstance(end, int) and isinstance(steps, int) and end < steps):
            out.unmapped.append(f"node {nid}: steps {start}..{end} of {steps} (a partial pass)")
    else:
        denoise = g.literal(inputs.get("denoise", 1.0), "denoise")
        if denoise != 1.0:
            out.unmapped.append(f"denoise: {denoise} (image-to-image strength; the input latent is not in the PNG)")


def _model_chain(g: _Graph, link: Any) -> None:
    out = g.out
    shift = None
    loras: list[dict[str, Any]] = []
    seen = set()
    while True:
        found = g.node(link)
        if found is None or found[0] in seen:
            break
        nid, node = found
        seen.add(nid)
        cls, inputs = node.get("class_type"), node.get("inputs", {})
        if cls == "ModelSamplingAuraFlow":
            value = g.literal(inputs.get("shift"), "shift")
            if shift is None and isinstance(value, (int, float)):
                shift = float(value)
        elif cls in ("LoraLoader", "LoraLoaderModelOnly"):
            name = g.literal(inputs.get("lora_name"), "lora_name")
            weight = g.literal(inputs.get("strength_model"), "strength_model")
            if isinstance(name, str) and isinstance(weight, (int, float)):
                loras.append({"name": lora_name(name, out), "weight": float(weight)})
                clip = inputs.get("strength_clip")
                if cls == "LoraLoader" and isinstance(clip, (int, float)) and clip != 0:
                    out.warnings.append(f"LoRA {name}: strength_clip {clip:g} not applied (our LoRAs patch the DiT)")
        elif cls in MODEL_LOADERS:
            name = g.literal(inputs.get(MODEL_LOADERS[cls]), "model")
            if isinstance(name, str):
                out.fields["model"] = name
            if inputs.get("weight_dtype", "default") != "default":
                out.info["weight_dtype"] = inputs["weight_dtype"]
            break
        elif cls == "CFGNorm":
            out.unmapped.append(f"node {nid} (CFGNorm): ComfyUI's per-channel clamped norm is not our cfg-norm")
        else:
            out.unmapped.append(f"node {nid} ({cls}) on the model path")
        link = inputs.get("model")
    if shift is None:
        out.warnings.append(f"no ModelSamplingAuraFlow node: ComfyUI's built-in Qwen-Image shift {QWEN_DEFAULT_SHIFT}")
        shift = QWEN_DEFAULT_SHIFT
    out.fields["shift"] = shift
    if loras:
        out.fields["loras"] = loras[::-1]  # loader nearest the UNET first, as they stack


def _text(g: _Graph, link: Any, field: str) -> None:
    out = g.out
    seen = set()
    while True:
        found = g.node(link)
        if found is None or found[0] in seen:
            out.unmapped.append(f"{field}: not a text encode")
            return
        nid, node = found
        seen.add(nid)
        cls, inputs = node.get("class_type"), node.get("inputs", {})
        if cls in TEXT_NODES:
            text = g.literal(inputs.get(TEXT_NODES[cls]), field)
            if isinstance(text, str):
                out.fields[field] = text
            images = [k for k in inputs if k.startswith("image") and _is_link(inputs[k])]
            if images:
                out.unmapped.append(f"{field}: edit input image(s) {', '.join(images)} of node {nid} (not in the PNG)")
            return
        if cls == "ConditioningZeroOut":
            out.unmapped.append(f"{field}: zeroed conditioning (node {nid}), not an encoded prompt")
            return
        if "conditioning" in inputs:  # pass-through conditioning nodes (ReferenceLatent, FluxGuidance, ...)
            out.unmapped.append(f"node {nid} ({cls}) on the {field} path")
            link = inputs["conditioning"]
            continue
        out.unmapped.append(f"{field}: node {nid} ({cls})")
        return


def _latent(g: _Graph, link: Any) -> None:
    found = g.node(link)
    if found is None:
        return
    nid, node = found
    inputs = node.get("inputs", {})
    if node.get("class_type") in EMPTY_LATENTS:
        for key in ("width", "height"):
            value = g.literal(inputs.get(key), key)
            if value is not None:
                set_size(g.out, key, value, key)
        batch = g.literal(inputs.get("batch_size", 1), "batch_size")
        if isinstance(batch, int) and batch > 1:
            g.out.fields["batch"] = batch
    else:
        g.out.unmapped.append(f"latent_image: node {nid} ({node.get('class_type')}), not an empty latent")


def parse_comfy_prompt(graph: Any) -> PastedSettings:
    """A ComfyUI API-format graph (the PNG's ``prompt`` chunk, decoded) -> request fields."""
    if not isinstance(graph, dict) or not graph or not all(
        isinstance(n, dict) and "class_type" in n for n in graph.values()
    ):
        raise InvalidRequest("not a ComfyUI API-format graph: expected {node_id: {class_type, inputs}}",
                             code="invalid_metadata")
    out = PastedSettings(source="comfyui")
    g = _Graph({str(k): v for k, v in graph.items()}, out)
    nid, node = _pick_sampler(g)
    out.info["sampler_node"] = nid
    _sampler_fields(g, nid, node)
    inputs = node.get("inputs", {})
    _model_chain(g, inputs.get("model"))
    _text(g, inputs.get("positive"), "prompt")
    _text(g, inputs.get("negative"), "negative_prompt")
    _latent(g, inputs.get("latent_image"))
    comfy_conventions(out)
    return out


__all__ = ["parse_comfy_prompt"]
