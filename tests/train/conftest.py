"""A synthetic training set (8 images of one red/yellow checker pattern, shifted, with captions) and one training
run on the tiny model shared by the tests that only read its outputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

STEPS = 40


def write_dataset(folder, n: int = 8, size: int = 64):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[...] = (220, 40, 40)
        yy, xx = np.mgrid[:size, :size]
        a[((yy // 8 + xx // 8 + i) % 2) == 0] = (240, 200, 30)
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red and yellow checker pattern, tile {i}")
    return folder


def tiny_config(dataset, out, model, **kw):
    from qwenstudio.train import TrainConfig

    base = dict(dataset=str(dataset), out=str(out), model=str(model), variant="tiny", steps=STEPS, rank=4,
                learning_rate=1e-2, resolution=64, bucket_step=16, device="cpu", seed=7)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """The tiny model's ops are microseconds long: on a shared 2-core machine intra-op threads only spin (measured
    here: 21 steps + load 4 s wall with one thread, ~5x the CPU time with two). Restored for the other tests."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("train") / "checker")


@pytest.fixture(scope="session")
def trained(dataset, tiny_folder, tmp_path_factory):
    """(config, result, events) of one 40-step run with a checkpoint every 20 steps and samples at steps 0 and 40."""
    from qwenstudio.train import train_lora

    out = tmp_path_factory.mktemp("train-out") / "checker.safetensors"
    cfg = tiny_config(dataset, out, tiny_folder, save_every=20, sample_every=STEPS, sample_steps=3, sample_cfg=1.0,
                      sample_prompts=("a red and yellow checker pattern",), sample_seeds=(11,))
    events = []
    result = train_lora(cfg, on_event=events.append)
    return cfg, result, events
