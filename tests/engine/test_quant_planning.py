"""The memory planner sizes a quantize-on-load run (``--quant fp8|int4|nf4`` on a float DiT file) at the size it runs
at, not at the file's: the bytes it plans are the bytes of the quantized modules, the placement follows (full-size
Qwen-Image at 24/16 GB), the load-time RAM peak (the float DiT before quantizing) is in the plan, and on a budget that
fits only the quantized DiT the run is resident and gives the same pixels as without a budget."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenstudio import Engine
from qwenstudio.engine.footprints import safetensors_tensors
from qwenstudio.engine.memory import GiB, MemoryInfo, plan_memory
from qwenstudio.engine.quant.fp8 import quantize_model_fp8
from qwenstudio.engine.quant.int4 import quantize_model_int4
from qwenstudio.engine.sources import component_footprints, registry_for, resolve
from qwenstudio.testing.headers import qwen_image_footprints, qwen_image_shapes
from qwenstudio.testing.svdquant_files import build_source_dit, save_source_dit

KW = {"prompt": "a boat", "seed": 2, "steps": 2, "width": 64, "height": 64}
GB = 10**9


@pytest.fixture(scope="module")
def source():
    return build_source_dit()


@pytest.fixture(scope="module")
def models(tmp_path_factory, source, tiny_folder):
    from qwenstudio.testing.formats import write_comfy_models_dir

    root = tmp_path_factory.mktemp("quant-planning")
    write_comfy_models_dir(root, tiny_folder, variants=())
    save_source_dit(source, root / "diffusion_models" / "wide-fp32.safetensors", prefix="model.diffusion_model.")
    return root


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


QUANTIZERS = {"int4": lambda m: quantize_model_int4(m), "fp8": lambda m: quantize_model_fp8(m)}


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_planned_bytes_are_the_quantized_modules_bytes(quant, models, source):
    """From the file header alone, the planner's DiT bytes equal the bytes of the modules the quantizer builds."""
    path = models / "diffusion_models" / "wide-fp32.safetensors"
    model = copy.deepcopy(source).float()
    QUANTIZERS[quant](model)
    planned = sum(b for _, b in safetensors_tensors([path], 4, quant=quant).values())
    assert planned == _module_bytes(model)
    assert planned < 0.5 * sum(b for _, b in safetensors_tensors([path], 4).values())


def test_planned_bytes_for_nf4_are_the_bitsandbytes_layers_bytes(models, source):
    pytest.importorskip("bitsandbytes")
    from qwenstudio.engine.quant.nf4 import quantize_model_nf4

    path = models / "diffusion_models" / "wide-fp32.safetensors"
    model = copy.deepcopy(source).float()
    quantize_model_nf4(model, device="cpu", compute_dtype=torch.float32)
    # the absmax per block lives in the weight's quant_state (not a parameter or buffer); its 16-entry code table,
    # 64 bytes a layer, is left out of the plan
    absmax = sum(m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
                 for m in model.modules() if type(m).__name__ == "Linear4bit")
    planned = sum(b for _, b in safetensors_tensors([path], 4, quant="nf4").values())
    assert planned == _module_bytes(model) + absmax


@pytest.fixture(scope="module")
def full_size_shapes():
    return qwen_image_shapes()


def _plan(fps, cap_gib, **kw):
    info = MemoryInfo(120 * GiB, 128 * GiB, int(cap_gib * GiB), int(cap_gib * GiB))
    return plan_memory(fps, info, device="cuda", width=1328, height=1328, compute_itemsize=2, **kw)


def test_full_size_bf16_file_with_quant_is_planned_at_its_quantized_size(full_size_shapes):
    """Full-size Qwen-Image (header stand-ins): a bf16 file streams block by block at 24 and 16 GB; with
    ``--quant int4`` its 11.6 GB DiT visits the GPU whole (model offload), and fp8 does at 24 GB."""
    plain = qwen_image_footprints("bf16", shapes=full_size_shapes)
    fps = {q: qwen_image_footprints("bf16", shapes=full_size_shapes, quant=q) for q in ("fp8", "int4", "nf4")}
    assert 11.3 * GB < fps["int4"]["transformer"].total < 11.8 * GB
    assert fps["nf4"]["transformer"].total == fps["int4"]["transformer"].total  # both 0.5 B + 4 B per 64 weights
    # fp8 keeps the MLP's second layer in bf16 (its activations are not fp8-safe): 22.8 GB, not the fp8 file's 20.4
    assert 22.5 * GB < fps["fp8"]["transformer"].total < 23 * GB
    load_ram = sum(fp.total for fp in plain.values())
    expected = {24: {None: "group_offload", "fp8": "model_offload", "int4": "model_offload"},
                16: {None: "group_offload", "fp8": "group_offload", "int4": "model_offload"}}
    for cap, by_quant in expected.items():
        assert _plan(plain, cap).strategy == by_quant[None]
        for quant in ("fp8", "int4"):
            plan = _plan(fps[quant], cap, load_ram=load_ram)
            assert plan.strategy == by_quant[quant], (cap, quant, plan.reason)
            own = _plan(fps[quant], cap).ram_needed  # what the placement itself holds (pinned copies included)
            assert plan.ram_needed == max(own, load_ram)
            assert ("the float DiT before it is quantized" in plan.reason) == (load_ram > own)
    assert _plan(fps["int4"], 80, load_ram=load_ram).strategy == "resident"


def test_load_ram_that_does_not_fit_is_refused_before_loading(full_size_shapes):
    """24 GB GPU, 32 GB RAM: the int4 model runs there (model offload, 27 GB in RAM), but loading it holds the
    41 GB float DiT (57 GB with the text encoder and VAE) in RAM first: refused before loading, saying why."""
    from qwenstudio import InsufficientMemory

    fps = qwen_image_footprints("bf16", shapes=full_size_shapes, quant="int4")
    load_ram = sum(fp.total for fp in qwen_image_footprints("bf16", shapes=full_size_shapes).values())
    info = MemoryInfo(32 * GiB, 32 * GiB, 24 * GiB, 24 * GiB)
    kw = {"device": "cuda", "width": 1328, "height": 1328, "compute_itemsize": 2}
    assert plan_memory(fps, info, **kw).strategy == "model_offload"
    with pytest.raises(InsufficientMemory, match="float DiT before it is quantized"):
        plan_memory(fps, info, load_ram=load_ram, **kw)


def test_a_budget_only_the_quantized_dit_fits_runs_resident(models, tiny_folder):
    """On the CPU with a simulated accelerator: a budget between the int4 and the float run's needs. Without
    ``--quant`` the DiT must be offloaded; with it the run is resident, says so in the metadata, and gives the pixels
    of the same ``--quant int4`` run without any budget."""
    from qwenstudio.config import Settings

    settings = Settings.from_env()
    src = resolve("wide-fp32", registry_for(settings, (models,)), settings)
    needs = {}
    for quant in (None, "int4"):
        fps = component_footprints(src, 4, quant)
        plan = plan_memory(fps, MemoryInfo(100 * GiB, 100 * GiB), device="cpu", width=64, height=64,
                           compute_itemsize=4, vram_budget=1.0, text_tokens=1024)
        needs[quant] = plan.vram_needed
    assert needs["int4"] < needs[None]
    budget = (needs["int4"] + needs[None]) / 2 / GiB
    engine = Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny", quant="int4",
                         vram_budget=budget)
    assert engine.plan.strategy == "resident"
    assert Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny",
                       vram_budget=budget).plan.strategy != "resident"
    out = engine.generate(**KW)
    memory = out.images[0].metadata["model"]["memory"]
    assert memory["strategy"] == "resident" and memory["simulated"] is True
    assert memory["ram_needed_gib"] > 0  # the float DiT passes through RAM at load
    free = Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny", quant="int4")
    assert torch.equal(out.latents, free.generate(**KW).latents)


def test_the_server_sizes_a_quant_model_at_its_quantized_size(models, tmp_path):
    """``serve --quant int4``: the model pool's submit-time check and ``--max-resident`` count the int4 DiT; its
    load check also passes the float file's bytes as the load's RAM."""
    from dataclasses import replace

    from qwenstudio.config import Settings
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog

    settings = replace(Settings.from_env(), models_dirs=(models,), home=tmp_path)
    catalog = ModelCatalog(settings, "wide-fp32", LoadOptions(device="cpu", variant="tiny", speed={"quant": "int4"}))
    entry = next(e for e in catalog.entries() if e.id == "wide-fp32")
    src = resolve("wide-fp32", registry_for(settings), settings)
    assert catalog.sizes(entry)["transformer"] == component_footprints(src, 4, "int4")["transformer"].total
    assert catalog.sizes(entry, as_stored=True)["transformer"] == component_footprints(src, 4)["transformer"].total
    catalog.check_fits(entry)  # (the load-time RAM bound itself: test_load_ram_that_does_not_fit_...)
