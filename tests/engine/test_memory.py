"""Memory planning: strategy choice from measured free memory, and refusal before loading anything."""

from __future__ import annotations

import pytest

from qwenstudio import Engine, InsufficientMemory, InvalidRequest
from qwenstudio.engine.memory import GiB, MemoryInfo, plan_memory

# Real Qwen-Image in bf16: DiT 20.4B params, Qwen2.5-VL-7B without LM head, VAE.
REAL = {"transformer": int(40.9 * GiB), "text_encoder": int(15.4 * GiB), "vae": int(0.25 * GiB)}


def _plan(vram_free_gib, ram_free_gib=120, **kw):
    info = MemoryInfo(int(ram_free_gib * GiB), 128 * GiB, int(vram_free_gib * GiB), 80 * GiB)
    return plan_memory(REAL, info, device="cuda", width=1328, height=1328, compute_itemsize=2, **kw)


def test_gpu_strategies_follow_free_vram():
    assert _plan(78).strategy == "resident"
    assert _plan(48).strategy == "model_offload"
    assert _plan(24).strategy == "group_offload"


def test_refusal_names_needed_free_and_alternatives():
    with pytest.raises(InsufficientMemory) as err:
        _plan(1.5)  # below even one streamed block + a step's activations
    msg = str(err.value)
    assert "free: 1.5 GiB GPU" in msg and "resident:" in msg and "leaf_offload:" in msg and "--device cpu" in msg
    with pytest.raises(InsufficientMemory, match="fp8 or GGUF"):
        _plan(1.5, ram_free_gib=30)  # not even the CPU would fit
    with pytest.raises(InsufficientMemory, match="--offload group_offload would fit"):
        _plan(24, prefer="resident")
    with pytest.raises(InsufficientMemory):
        _plan(48, ram_free_gib=10)  # offloading needs the weights in RAM


def test_forced_and_invalid_strategies():
    assert _plan(78, prefer="group_offload").strategy == "group_offload"
    with pytest.raises(InvalidRequest, match="valid: auto, resident"):
        _plan(78, prefer="swap")
    info = MemoryInfo(64 * GiB, 64 * GiB)
    with pytest.raises(InvalidRequest, match="needs a CUDA device"):
        plan_memory(REAL, info, device="cpu", width=64, height=64, compute_itemsize=4, prefer="model_offload")


def test_vae_tiling_above_threshold():
    assert not _plan(78).vae_tiling
    info = MemoryInfo(120 * GiB, 128 * GiB, 78 * GiB, 80 * GiB)
    big = plan_memory(REAL, info, device="cuda", width=2560, height=2560, compute_itemsize=2)
    assert big.vae_tiling


def test_tiny_folder_plans_cpu_from_headers(tiny_folder):
    from qwenstudio.engine.sources import ModelSource, component_sizes

    sizes = component_sizes(ModelSource("t", "tiny", folder=tiny_folder), itemsize=4)
    assert set(sizes) == {"transformer", "text_encoder", "vae"} and all(0 < v < 2**27 for v in sizes.values())
    info = MemoryInfo(ram_free=64 * GiB, ram_total=64 * GiB)
    plan = plan_memory(sizes, info, device="cpu", width=64, height=64, compute_itemsize=4)
    assert plan.strategy == "cpu" and plan.ram_needed > sum(sizes.values())
    with pytest.raises(InsufficientMemory, match="not enough memory"):
        plan_memory(sizes, MemoryInfo(1024, 1024), device="cpu", width=64, height=64, compute_itemsize=4)


def test_engine_refuses_before_loading(tiny_folder, monkeypatch):
    import qwenstudio.engine.memory as memory

    monkeypatch.setattr(memory, "measure", lambda device: MemoryInfo(ram_free=1024, ram_total=1024))
    loaded = []
    import qwenstudio.engine.sources as sources

    monkeypatch.setattr(sources, "load_source", lambda *a, **k: loaded.append(1))
    with pytest.raises(InsufficientMemory):
        Engine.load(tiny_folder, variant="tiny", device="cpu")
    assert loaded == []
