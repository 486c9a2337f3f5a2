"""The memory planner at small GPU caps (issue 12): full-size Qwen-Image footprints from header-only stand-ins of the
real files (keys and shapes of the real classes, each file kind's bytes), the placement picked at 24/16/12/8 GB, and
every placement run end to end on the tiny model on the CPU against a simulated budget, pixel-identical to resident."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qwenstudio import Engine, InsufficientMemory
from qwenstudio.cli.main import app
from qwenstudio.engine.memory import GiB, MemoryInfo, Plan, plan_memory
from qwenstudio.outputs import read_png_metadata
from qwenstudio.testing.headers import DIT_KINDS, qwen_image_footprints, qwen_image_shapes

GB = 10**9
# strategy (text encoder mode) per cap at 1328² (the largest Qwen-Image size, what Engine.load plans for), CFG batched
EXPECTED = {
    24: {"bf16": "group_offload/visit", "fp8": "model_offload/visit", "q8_0": "model_offload/visit",
         "q4_k_m": "model_offload/visit"},
    16: {"bf16": "group_offload/visit", "fp8": "group_offload/visit", "q8_0": "group_offload/visit",
         "q4_k_m": "model_offload/visit"},
    12: {k: "group_offload/leaf" for k in DIT_KINDS},
    8: {k: "group_offload/leaf" for k in DIT_KINDS},
}


@pytest.fixture(scope="module")
def full_size():
    shapes = qwen_image_shapes()
    return {kind: qwen_image_footprints(kind, shapes=shapes) for kind in DIT_KINDS}


def _plan(fps, cap_gib, size=1328, **kw):
    info = MemoryInfo(120 * GiB, 128 * GiB, int(cap_gib * GiB), int(cap_gib * GiB))
    return plan_memory(fps, info, device="cuda", width=size, height=size, compute_itemsize=2, **kw)


def test_full_size_footprints_match_the_real_files(full_size):
    dit = {k: v["transformer"] for k, v in full_size.items()}
    assert 40.5 * GB < dit["bf16"].total < 41.3 * GB and dit["bf16"].blocks == 60  # 20.4B params
    assert 0.6 * GB < dit["bf16"].block < 0.72 * GB and dit["bf16"].outside < 0.1 * GB  # ~0.34B params a block
    assert 20 * GB < dit["fp8"].total < 21 * GB and 11.5 * GB < dit["q4_k_m"].total < 13.5 * GB
    assert dit["bf16"].width == 3072 and dit["bf16"].mlp == 12288
    te = full_size["bf16"]["text_encoder"]
    assert 15 * GB < te.total < 16 * GB and te.blocks == 28 and te.width == 3584 and te.mlp == 18944
    assert full_size["bf16"]["vae"].width == 96


@pytest.mark.parametrize("cap", sorted(EXPECTED, reverse=True))
def test_placement_per_cap(full_size, cap):
    for kind, expected in EXPECTED[cap].items():
        plan = _plan(full_size[kind], cap)
        assert f"{plan.strategy}/{plan.mode('text_encoder')}" == expected, (cap, kind, plan.reason)
        assert plan.vram_needed <= cap * GiB and plan.mode("vae") == "visit"
        assert plan.reason.startswith("resident needs") and plan.strategy in plan.reason  # says why


def test_smallest_gpus_tile_the_decode_then_refuse_with_numbers(full_size):
    plan = _plan(full_size["fp8"], 6)  # the untiled 1328² decode (~7 GiB) does not fit beside the VAE
    assert plan.strategy == "group_offload" and plan.vae_tiling and plan.vae_tile_above < 1328 * 1328
    assert not _plan(full_size["fp8"], 8).vae_tiling
    lean = _plan(full_size["bf16"], 2.1, size=512)  # a step's activations + 2 blocks no longer fit: layer by layer
    assert lean.strategy == "leaf_offload" and lean.vram_needed <= 2.1 * GiB
    with pytest.raises(InsufficientMemory) as err:
        _plan(full_size["q4_k_m"], 1)
    needed = err.value.detail["needed"]
    assert set(needed) == {"resident", "model_offload", "group_offload", "leaf_offload"}
    assert all(v[0] > GiB for v in needed.values()) and "free: 1.0 GiB GPU" in str(err.value)


def test_batch_and_cfg_batching_count(full_size):
    one = _plan(full_size["q4_k_m"], 16)
    assert one.strategy == "model_offload"
    assert _plan(full_size["q4_k_m"], 16, batch=4).strategy == "group_offload"  # 4 images x the CFG pair
    assert _plan(full_size["q4_k_m"], 16, batch=2, cfg_batched=False).vram_needed < _plan(
        full_size["q4_k_m"], 16, batch=2).vram_needed


def test_pinned_ram_only_when_it_fits(full_size):
    fps = full_size["bf16"]
    roomy = plan_memory(fps, MemoryInfo(120 * GiB, 128 * GiB, 8 * GiB, 8 * GiB), device="cuda", width=1024,
                        height=1024, compute_itemsize=2)
    tight = plan_memory(fps, MemoryInfo(60 * GiB, 64 * GiB, 8 * GiB, 8 * GiB), device="cuda", width=1024,
                        height=1024, compute_itemsize=2)
    assert roomy.pin_memory and roomy.ram_needed > 90 * GiB  # the pinned copy is made before the first is freed
    assert not tight.pin_memory and tight.ram_needed < 60 * GiB and tight.strategy == "group_offload"


# ---- the placements run: the tiny model on the CPU, a simulated accelerator ---------------------------------------

KW = {"prompt": "a red fox", "seed": 3, "steps": 3, "cfg": 3.0, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def resident(tiny_folder):
    return Engine.load(tiny_folder, variant="tiny", device="cpu").generate(**KW)


def _same(a, b):
    assert np.array_equal(np.asarray(a.images[0].image), np.asarray(b.images[0].image))
    assert float((a.latents - b.latents).abs().max()) <= 1e-5


@pytest.mark.parametrize("strategy", ["model_offload", "group_offload", "leaf_offload"])
def test_forced_placements_give_the_resident_pixels(tiny_folder, resident, strategy):
    with pytest.warns(UserWarning, match=f"memory plan .*{strategy}"):
        engine = Engine.load(tiny_folder, variant="tiny", device="cpu", offload=strategy, vram_budget=1)
    got = engine.generate(**KW)
    _same(got, resident)
    memory = got.images[0].metadata["model"]["memory"]
    assert memory["strategy"] == strategy and memory["simulated"] and memory["vram_budget_gib"] == 1
    hooked = [m for m in engine.components.transformer.modules() if getattr(m, "_diffusers_hook", None)]
    assert (len(hooked) > 0) == (strategy != "model_offload")  # the DiT really streams


def test_every_component_streamed_gives_the_resident_pixels(tiny_folder, resident):
    base = Engine.load(tiny_folder, variant="tiny", device="cpu")
    plan = Plan("leaf_offload", 0, 0, modes={"text_encoder": "leaf", "transformer": "block", "vae": "visit"})
    _same(Engine(base.components, base.spec, plan=plan).generate(**KW), resident)


def test_auto_pick_under_a_budget_runs(tiny_folder, resident):
    with pytest.raises(InsufficientMemory) as err:
        Engine.load(tiny_folder, variant="tiny", device="cpu", vram_budget=1e-6)
    needed = err.value.detail["needed"]
    budget = (needed["model_offload"][0] + 16) / GiB  # what model_offload needs (resident, even tiled, needs more)
    assert needed["resident"][0] > needed["model_offload"][0] + 16
    with pytest.warns(UserWarning, match="memory plan"):
        engine = Engine.load(tiny_folder, variant="tiny", device="cpu", vram_budget=budget)
    assert engine.plan.strategy == "model_offload" and engine.plan.simulated
    _same(engine.generate(**KW), resident)
    assert Engine.load(tiny_folder, variant="tiny", device="cpu", vram_budget=1).plan.strategy == "resident"


def test_cli_vram_budget(tiny_folder, tmp_path):
    cli = CliRunner()
    out = tmp_path / "x.png"
    r = cli.invoke(app, ["generate", "a fox", "--model", str(tiny_folder), "--variant", "tiny", "--steps", "2",
                         "--vram-budget", "1", "--offload", "group_offload", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    memory = read_png_metadata(out)["model"]["memory"]
    assert memory["strategy"] == "group_offload" and memory["components"]["transformer"] == "block"
    assert json.loads(r.stdout)["images"][0]["model"]["memory"] == memory
    r = cli.invoke(app, ["generate", "a fox", "--steps", "1", "--vram-budget", "-2"])
    assert r.exit_code == 2 and "--vram-budget" in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.fixture(scope="module")
def lora_file(tiny_folder, tmp_path_factory):
    from qwenstudio.testing.loras import write_lora

    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    write_lora(path, Engine.load(tiny_folder, variant="tiny", device="cpu").components.transformer, "comfy", seed=1)
    return path


@pytest.mark.parametrize("strategy", ["group_offload", "leaf_offload"])
def test_streamed_dit_with_fp8_layers_and_a_lora(tiny_folder, lora_file, strategy):
    """Streaming is set up at the first stage, after the load-time fp8 layer swap; LoRA side branches ride along."""
    kw = {**KW, "loras": [(str(lora_file), 0.8)]}
    ref = Engine.load(tiny_folder, variant="tiny", device="cpu", quant="fp8").generate(**kw)
    with pytest.warns(UserWarning, match="memory plan"):
        engine = Engine.load(tiny_folder, variant="tiny", device="cpu", quant="fp8", offload=strategy, vram_budget=1)
    assert engine.acceleration["fp8_layers_quantized"] > 0
    with_lora = engine.generate(**kw)
    _same(with_lora, ref)
    plain = engine.generate(**KW)
    _same(plain, Engine.load(tiny_folder, variant="tiny", device="cpu", quant="fp8").generate(**KW))
    assert float((with_lora.latents - plain.latents).abs().max()) > 1e-3  # the LoRA did apply
