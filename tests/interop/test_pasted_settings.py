"""Settings pasted from other tools, read from the peers' own files (tests/fixtures/peers: ComfyUI's SaveImage
output, SwarmUI's metadata and preset export format, A1111's infotext; see SOURCES.md there)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from qwenstudio.engine.requests import GenerateRequest
from qwenstudio.engine.specs import get_spec
from qwenstudio.errors import InvalidRequest
from qwenstudio.interop import (
    PastedSettings,
    a1111_short_hash,
    apply_prompt_template,
    export_swarmui_presets,
    import_swarmui_presets,
    parse_a1111_parameters,
    parse_swarmui_metadata,
    read_pasted_settings,
    sampler_name,
    scheduler_name,
    tensor_sha256,
)
from qwenstudio.outputs import a1111_parameters

PEERS = Path(__file__).parents[1] / "fixtures" / "peers"
COMFY, SWARM, A1111 = PEERS / "comfyui", PEERS / "swarmui", PEERS / "a1111"
COMFY_CONV = {"noise": "comfy", "cfg_norm": False}


def runnable(settings: PastedSettings) -> GenerateRequest:
    """What --from-image does with the fields: build the request and resolve it against the base model."""
    fields = {k: v for k, v in settings.fields.items() if k != "model"}
    return GenerateRequest.from_dict(fields).resolve(get_spec("qwen-image"))


# ------------------------------------------------------------------ ComfyUI (SaveImage PNGs)


def test_comfyui_t2i_template_png():
    s = read_pasted_settings(COMFY / "qwen_t2i_lightning.png")
    assert s.source == "comfyui" and s.unmapped == [] and s.warnings == []
    assert s.fields == {
        "prompt": 'A coffee shop entrance with a chalkboard sign reading "Qwen Coffee 😊 $2 per cup", neon light',
        "negative_prompt": "", "seed": 86754231, "steps": 8, "cfg": 1.0, "sampler": "euler", "scheduler": "simple",
        "shift": 3.1, "width": 1328, "height": 1328, "model": "qwen_image_fp8_e4m3fn.safetensors",
        "loras": [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 1.0}], **COMFY_CONV,
    }
    assert s.info["compat"] == "comfy"
    req = runnable(s)
    assert (req.steps, req.cfg, req.shift, req.noise, req.loras[0].name) == (8, 1.0, 3.1, "comfy",
                                                                           "Qwen-Image-Lightning-8steps-V1.1")


def test_comfyui_edit_graph_lists_what_it_cannot_carry():
    s = read_pasted_settings(COMFY / "qwen_edit_2509.png")
    assert s.fields["prompt"] == "Make the cat wear a red hat" and s.fields["shift"] == 3.0
    assert s.fields["seed"] == 1125488487853216 and "width" not in s.fields
    assert s.unmapped == [
        "node 76 (CFGNorm): ComfyUI's per-channel clamped norm is not our cfg-norm",
        "prompt: edit input image(s) image1 of node 111 (not in the PNG)",
        "negative_prompt: edit input image(s) image1 of node 110 (not in the PNG)",
        "latent_image: node 88 (VAEEncode), not an empty latent",
    ]


def test_comfyui_advanced_sampler_primitives_and_lora_stack():
    s = read_pasted_settings(COMFY / "ksampler_advanced.png")
    assert s.fields["seed"] == 42 and s.fields["prompt"] == "an ink wash painting of a crane\nmisty"
    assert s.fields["loras"] == [{"name": "ink_wash", "weight": 0.8}, {"name": "detail", "weight": 0.5}]
    assert (s.fields["width"], s.fields["height"], s.fields["batch"]) == (1008, 1472, 2)
    assert s.fields["shift"] == 1.15 and "sampler" not in s.fields  # dpmpp_2m_sde_gpu: a different noise device
    assert s.unmapped == ["sampler_name: dpmpp_2m_sde_gpu (no such sampler here)"]
    assert "no ModelSamplingAuraFlow node: ComfyUI's built-in Qwen-Image shift 1.15" in s.warnings
    assert "width 1000 rounded to 1008 (a multiple of 16)" in s.warnings
    assert any("strength_clip 0.8 not applied" in w for w in s.warnings)


def test_comfyui_graph_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="no KSampler") as e:
        read_pasted_settings(json.dumps({"1": {"class_type": "SamplerCustomAdvanced", "inputs": {}}}))
    assert e.value.code == "unmapped_workflow"
    info = PngInfo()
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    p = tmp_path / "ui_only.png"
    Image.new("RGB", (4, 4)).save(p, pnginfo=info)
    with pytest.raises(InvalidRequest, match="only a ComfyUI UI workflow") as e:
        read_pasted_settings(p)
    assert e.value.code == "unmapped_workflow"


# ------------------------------------------------------------------ SwarmUI


def test_swarmui_png_lightning():
    """Written by SwarmUI's own GenRawMetadata (harness, see SOURCES.md): images=1 is not in it (IgnoreIf), the
    empty negative prompt is (prompt parsing writes it back), specials are JSON-escaped, the model keeps its folder."""
    s = read_pasted_settings(SWARM / "swarmui_qwen_lightning.png")
    assert s.source == "swarmui"
    assert s.fields == {
        "prompt": 'a lighthouse on a cliff at dusk, "oil" painting \u2014 \u706f\u5854 \\ 100% {detail}',
        "negative_prompt": "", "seed": 1716538929, "steps": 8, "cfg": 1.0, "shift": 3.1, "sampler": "euler", "scheduler": "simple",
        "width": 1344, "height": 768, "model": "Qwen-Image/qwen_image_fp8_e4m3fn",
        "loras": [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 1.0}], **COMFY_CONV,
    }
    assert s.unmapped == [] and s.warnings == []
    recorded = json.loads((SWARM / "harness_outputs.json").read_text("utf-8"))["sui_models_hashes"]
    assert s.info["models"][0] == {"name": "Qwen-Image/qwen_image_fp8_e4m3fn.safetensors", "param": "model",
                                   "hash": recorded["Qwen-Image/qwen_image_fp8_e4m3fn.safetensors"]}
    assert s.info["swarm_version"] == "0.9.8.2"
    runnable(s)


def test_swarmui_png_custom_size_non_ascii_and_unused_params():
    s = read_pasted_settings(SWARM / "swarmui_custom_size.png")
    assert s.fields["prompt"] == "一只戴着红帽子的猫, watercolor\nsoft light"  # SwarmUI writes it \u-escaped
    assert (s.fields["sampler"], s.fields["scheduler"]) == ("dpmpp_2m", "karras")
    assert (s.fields["width"], s.fields["height"]) == (1008, 1472)
    assert "width 1000 rounded to 1008 (a multiple of 16)" in s.warnings
    assert s.fields["loras"] == [{"name": "ink_wash", "weight": 0.8},
                                 {"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 0.5}]
    # a param the backend never read is moved out of sui_image_params by SwarmUI itself
    assert s.unmapped == [] and s.info["extra_data"]["unused_parameters"] == ["refinerupscale"]
    assert runnable(s).sampler == "dpmpp_2m"


def test_swarmui_png_lora_prompt_tag():
    """SwarmUI's <lora:name:weight> handler (T2IPromptHandling, run by the harness) takes the tag out of the prompt,
    matches the name case-insensitively, and records loras + a section confinement; the typed prompt is kept aside."""
    s = read_pasted_settings(SWARM / "swarmui_lora_tag.png")
    assert s.fields["prompt"] == "a koi pond in autumn , soft light"  # SwarmUI leaves the space before the comma
    assert s.fields["loras"] == [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 0.75}]
    assert s.unmapped == []  # confinement to section 0 = the whole image
    extra = s.info["extra_data"]
    assert extra["original_prompt"] == "a koi pond in autumn <lora:qwen-image-lightning-8steps-v1.1:0.75>, soft light"
    assert extra["prompted_loras"] == ["Qwen-Image-Lightning-8steps-V1.1"]
    confined = parse_swarmui_metadata({"sui_image_params": {"loras": "a,b", "lorasectionconfinement": ["0", "11"]}})
    assert confined.unmapped == ["lorasectionconfinement: 0,11 (LoRAs confined to prompt sections; applied to the "
                                 "whole image here)"]


def test_swarmui_sizes_match_swarmuis_own_get_image_width_height():
    """Aspect ratio x side length (x the width/height also sent): the size SwarmUI's GetImageWidth/Height give
    (harness run; "3:4" and "Custom" are not in its reference table, so width/height apply)."""
    checks = json.loads((SWARM / "harness_outputs.json").read_text("utf-8"))["size_checks"]
    assert len(checks) == 24
    for c in checks:
        s = parse_swarmui_metadata({"sui_image_params": c["request"]})
        assert (s.fields["width"], s.fields["height"]) == (c["width"], c["height"]), c["request"]


def test_swarmui_png_side_length_wins_over_width_height():
    """SwarmUI renders at GetImageWidth/Height: side length + a known aspect beats the width/height it also records."""
    s = read_pasted_settings(SWARM / "swarmui_side_length.png")
    rendered = json.loads((SWARM / "harness_outputs.json").read_text("utf-8"))["image_sizes"]["swarmui_side_length"]
    assert [s.fields["width"], s.fields["height"]] == rendered == [1584, 1072]


def test_swarmui_preset_export_file_imports_every_preset():
    presets = import_swarmui_presets(json.loads((SWARM / "swarmui_presets.json").read_text("utf-8")))
    bodies = {b["name"]: (b, s) for b, s in presets}
    assert list(bodies) == ["Qwen Lightning 8", "Ink wash", "Poster"]
    light, light_s = bodies["Qwen Lightning 8"]
    assert light["params"] == {"model": "Qwen-Image/qwen_image_fp8_e4m3fn", "steps": 8, "cfg": 1.0, "sampler": "euler",
                               "scheduler": "simple", "shift": 3.1,
                               "loras": [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 1.0}]}
    assert "preview_image" not in light_s.info  # SwarmUI's "no image" placeholder path is not an image
    ink, ink_s = bodies["Ink wash"]
    assert ink["params"]["prompt"] == "{value}, ink wash painting, muted colors"
    assert (ink["params"]["width"], ink["params"]["height"]) == (1216, 832)
    assert ink["params"]["loras"] == [{"name": "ink_wash", "weight": 0.8}]
    assert "seed" not in ink["params"] and "seed -1 is SwarmUI's 'random': no seed set" in ink_s.warnings
    # SwarmUI's own T2IPreset.ApplyTo over a prompt (harness output) = our template fill
    applied = json.loads((SWARM / "harness_outputs.json").read_text("utf-8"))["preset_applies"]["ink_wash_over_prompt"]
    assert apply_prompt_template(ink["params"]["prompt"], "a heron in the reeds") == applied["prompt"]
    assert apply_prompt_template(ink["params"]["negative_prompt"], "blurry") == applied["negativeprompt"]
    assert apply_prompt_template("{value} at night", "a city <segment:sky> stars") == "a city at night <segment:sky> stars"
    assert apply_prompt_template("no placeholder", "ignored") == "no placeholder"
    poster, poster_s = bodies["Poster"]
    assert poster_s.unmapped == [] and poster["params"]["batch"] == 2
    assert (poster["params"]["sampler"], poster["params"]["scheduler"]) == ("dpmpp_2m", "karras")


def test_swarmui_export_is_swarmui_format_and_round_trips():
    ours = [b for b, _ in import_swarmui_presets(json.loads((SWARM / "swarmui_presets.json").read_text("utf-8")))]
    text = export_swarmui_presets(ours)
    data = json.loads(text)
    assert text.startswith('{\n    "Qwen Lightning 8": {\n        "author": "local"')  # JSON.stringify(.., 4)
    for title, preset in data.items():
        assert set(preset) == {"author", "title", "description", "preview_image", "is_starred", "param_map"}
        assert preset["title"] == title and all(isinstance(v, str) for v in preset["param_map"].values())
    assert data["Qwen Lightning 8"]["param_map"]["loraweights"] == "1"
    again = [b for b, _ in import_swarmui_presets(data)]
    assert [b["params"] for b in again] == [b["params"] for b in ours]


def test_our_swarmui_export_is_read_by_swarmui():
    """Our export of the real export's presets, imported by SwarmUI's own presets.js + AddNewPreset and applied
    by its T2IPreset.ApplyTo (harness run, tests/fixtures/peers/swarmui/qwenstudio_export.read_by_swarmui.json)."""
    ours = [b for b, _ in import_swarmui_presets(json.loads((SWARM / "swarmui_presets.json").read_text("utf-8")))]
    text = export_swarmui_presets(ours)
    assert text == (SWARM / "qwenstudio_export.json").read_text("utf-8")  # the file SwarmUI was given
    back = json.loads((SWARM / "qwenstudio_export.read_by_swarmui.json").read_text("utf-8"))
    assert all(r == {"success": True} for r in back["replies"].values()) and back["harness_logs"] == []
    exported = json.loads(text)
    assert {p["title"]: p["param_map"] for p in back["stored"]} == {t: p["param_map"] for t, p in exported.items()}
    for body in ours:
        applied = parse_swarmui_metadata({"sui_image_params": back["applied"][body["name"]]})
        want = dict(body["params"])
        if "batch" in want:  # image metadata has no batch; SwarmUI's "images" param holds it
            assert back["applied"][body["name"]]["images"] == want.pop("batch")
        if "prompt" in want:
            want["prompt"] = apply_prompt_template(want["prompt"], "a heron in the reeds")
        if "negative_prompt" in want:
            want["negative_prompt"] = apply_prompt_template(want["negative_prompt"], None)
        got = {k: v for k, v in applied.fields.items() if k in want}
        assert got == want, body["name"]
    # SwarmUI found our folder-less LoRA name in its list (GetBestInList)
    assert back["applied"]["Ink wash"]["loras"] == ["styles/ink_wash"]


# ------------------------------------------------------------------ A1111 / Forge


def test_forge_png_lora_tags_display_names_and_hashes():
    s = read_pasted_settings(A1111 / "forge_qwen.png")
    assert s.source == "a1111"
    assert s.fields["prompt"] == "a red fox in the snow, national geographic photo"  # tags removed
    assert s.fields["loras"] == [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 1.0},
                                 {"name": "fur_detail", "weight": 0.6}]
    assert (s.fields["sampler"], s.fields["scheduler"], s.fields["shift"]) == ("euler_ancestral", "simple", 3.1)
    assert (s.fields["steps"], s.fields["cfg"], s.fields["seed"]) == (8, 1.0, 3839105)
    assert s.info["lora_hashes"] == {"Qwen-Image-Lightning-8steps-V1.1": "2c6f1e3d5b7a", "fur_detail": "7e7e7e7e7e7e"}
    assert s.unmapped == ["Hires upscale: 1.5", "Hires steps: 4", "Denoising strength: 0.4"]
    assert "noise" not in s.fields  # A1111's own noise convention is not ComfyUI's: not assumed
    runnable(s)


def test_old_a1111_combined_sampler_name():
    s = read_pasted_settings(A1111 / "a1111_old_sampler_names.png")
    assert (s.fields["sampler"], s.fields["scheduler"]) == ("dpmpp_2m", "karras")
    assert s.unmapped == ["Clip skip: 2"]


@pytest.mark.parametrize(("name", "want"), [
    ("Euler", ("euler", None)), ("Euler a", ("euler_ancestral", None)), ("DPM++ 2M", ("dpmpp_2m", None)),
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("DPM++ 2M SDE", ("dpmpp_2m_sde", None)),
    ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")), ("DPM++ SDE", ("dpmpp_sde", None)),
    ("DDIM", ("ddim", None)), ("UniPC", ("uni_pc", None)), ("LCM", ("lcm", None)), ("Heun", ("heun", None)),
    ("uni_pc", ("uni_pc", None)), ("DPM++ 3M SDE", (None, None)), ("Restart", (None, None)),
])
def test_sampler_display_names(name, want):
    assert sampler_name(name) == want


def test_schedule_types():
    assert [scheduler_name(n) for n in ("Simple", "Karras", "Exponential", "SGM Uniform", "Beta", "Normal",
                                        "KL Optimal", "kl_optimal", "Align Your Steps")] == [
        "simple", "karras", "exponential", "sgm_uniform", "beta", "normal", "kl_optimal", "kl_optimal", None]
    s = parse_a1111_parameters("p\nSteps: 4, Sampler: Euler, Schedule type: Automatic, Seed: 1")
    assert "scheduler" not in s.fields and s.warnings == ["Schedule type: Automatic -> the model's default scheduler"]
    s = parse_a1111_parameters("p\nSteps: 4, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Seed: 1")
    assert s.fields["scheduler"] == "exponential" and "Schedule type is used" in s.warnings[0]


def test_lora_tag_forms():
    s = parse_a1111_parameters("x <lora:a> y <lora:b:0.5:0.25> <lyco:c:unet=0.7:te=1> <lora::1> z\n"
                               "Negative prompt: n <lora:d:0.3>\nSteps: 2, Seed: 1, CFG scale: 1")
    assert s.fields["prompt"] == "x y z"
    assert s.fields["negative_prompt"] == "n"
    assert s.fields["loras"] == [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 0.25},
                                 {"name": "c", "weight": 0.7}, {"name": "d", "weight": 0.3}]
    assert s.unmapped == ["prompt tag <lora::1>"]
    assert len([w for w in s.warnings if "text-encoder weight" in w]) == 2
    assert "<lora:d:0.3> in the negative prompt is applied, as A1111 does" in s.warnings


# ------------------------------------------------------------------ our own parameters chunk


def test_our_parameters_carry_loras_as_a1111_does(tmp_path):
    lora = tmp_path / "style.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(lora), metadata={"x": "y"})
    raw = lora.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert tensor_sha256(lora) == hashlib.sha256(raw[8 + n:]).hexdigest()  # = A1111 addnet = SwarmUI tensor hash
    meta = {
        "generator": "qwenstudio test",
        "request": {"prompt": "a fox, snow", "negative_prompt": "", "steps": 4, "sampler": "euler",
                    "scheduler": "simple", "cfg": 1.0, "seed": 3, "width": 64, "height": 64, "shift": None,
                    "noise": "diffusers", "loras": [{"name": "style", "weight": 0.8}, {"name": "other", "weight": 1.0}]},
        "model": {"name": "Qwen: Image", "fingerprint": "abc"},
        "loras": [{"name": "style", "weight": 0.8, "file": "style.safetensors", "hash": a1111_short_hash(lora)}],
    }
    text = a1111_parameters(meta)
    assert text.startswith("a fox, snow <lora:style:0.8> <lora:other:1>\n")
    assert f'Lora hashes: "style: {a1111_short_hash(lora)}"' in text and 'Model: "Qwen: Image"' in text
    back = read_pasted_settings(text)
    assert back.fields["loras"] == meta["request"]["loras"] and back.fields["prompt"] == "a fox, snow"
    assert back.fields["model"] == "Qwen: Image" and back.info["lora_hashes"] == {"style": a1111_short_hash(lora)}


def test_text_and_file_inputs(tmp_path):
    with pytest.raises(InvalidRequest, match="empty"):
        read_pasted_settings("   ")
    with pytest.raises(InvalidRequest, match="do not parse"):
        read_pasted_settings("{not json")
    with pytest.raises(InvalidRequest, match="neither SwarmUI"):
        read_pasted_settings('{"a": 1}')
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InvalidRequest, match="not a readable image"):
        read_pasted_settings(str(tmp_path / "x.png"))
    s = read_pasted_settings(json.dumps({"sui_image_params": {"prompt": "p", "seed": 5}}))
    assert s.fields == {"prompt": "p", "seed": 5, **COMFY_CONV}


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_exif_user_comment_of_jpeg_and_webp(tmp_path, ext):
    """A1111 and SwarmUI keep the same text in EXIF UserComment for JPEG/WebP (piexif 'UNICODE' = UTF-16 BE)."""
    text = "a fox\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, Seed: 9, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    path = tmp_path / f"x.{ext}"
    Image.new("RGB", (8, 8)).save(path, exif=exif.tobytes())
    s = read_pasted_settings(path)
    assert s.fields == {"prompt": "a fox", "negative_prompt": "fog", "steps": 3, "sampler": "euler_ancestral",
                        "seed": 9, "width": 64, "height": 64}
