"""``train_lora(TrainConfig)``: from a folder of captioned images to a LoRA file, in one call.

The story: check the dataset (every bad file at once) -> load the model (components in RAM on a GPU run) ->
preflight (does it fit? what to change) -> cache latents and caption embeddings, then drop the text encoder (and
the VAE unless samples are wanted) -> move the DiT to the device, freeze it, attach trainable LoRA branches ->
flow-matching steps (see timesteps.py) with checkpoints, samples and a loss plot -> write the LoRA.

Every random draw of step ``s`` (batch order, noise, timesteps) comes from generators seeded by (seed, s), so a
run resumed at step s continues exactly where it stopped. Ctrl-C (SIGINT) finishes the current step, writes the
checkpoint and the LoRA, and returns with ``interrupted=True``.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InsufficientMemory, InvalidRequest
from .config import TrainConfig


@dataclass
class TrainEvent:
    kind: str  # preflight, caching, start, step, sample, checkpoint, done
    step: int = 0
    total: int = 0
    loss: float | None = None
    message: str = ""
    data: Any = None


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    steps: int  # steps done in total (including those before a resume)
    losses: list[float]
    interrupted: bool
    loss_plot: Path
    samples: list[Path] = field(default_factory=list)
    preflight: Any = None
    seconds: float = 0.0
    base: dict = field(default_factory=dict)  # the base model as the engine describes it (variant, quant, dtype)


def sample_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".samples")


def loss_plot_path(out: Path) -> Path:
    return out.with_name(out.stem + ".loss.png")


def train_lora(config: TrainConfig, *, on_event: Callable[[TrainEvent], Any] | None = None,
               handle_sigint: bool = True) -> TrainResult:
    """Train a LoRA as ``config`` says; see the module docstring. ``on_event`` receives progress (return False from
    it to stop cleanly, as Ctrl-C does)."""
    from .checkpoint import checkpoint_dir, load_checkpoint
    from .dataset import scan

    cfg = config
    emit = on_event or (lambda e: None)
    items = scan(cfg.dataset, resolution=cfg.resolution, bucket_step=cfg.bucket_step, trigger=cfg.trigger)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        diffs = cfg.fixed_differences(TrainConfig.from_dict({**ckpt.config, "resume": None}))
        if diffs:
            raise InvalidRequest(f"cannot resume from '{cfg.resume}': the run differs in {'; '.join(diffs)}",
                                 code="bad_checkpoint")
        if ckpt.step >= cfg.steps:
            raise InvalidRequest(f"checkpoint '{cfg.resume}' is already at step {ckpt.step} of {cfg.steps}; raise "
                                 "--steps to train further", code="bad_checkpoint")
    if cfg.format == "peft" and cfg.lora_alpha != cfg.rank:
        emit(TrainEvent("warning", message=f"alpha {cfg.lora_alpha:g} != rank {cfg.rank}: the peft format keeps alpha "
                        "in lora_adapter_metadata, which diffusers and qwenstudio read but ComfyUI ignores (it "
                        "applies scale 1); use --format comfy or kohya for ComfyUI"))
    out = Path(cfg.out)
    run = _Run(cfg, items, emit)
    t0 = time.perf_counter()
    run.setup(ckpt)
    stop = threading.Event()
    previous = None
    if handle_sigint and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        interrupted = run.train(stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    run.save(final=True)
    emit(TrainEvent("done", run.step, cfg.steps, run.losses[-1] if run.losses else None,
                    "stopped early" if interrupted else "finished"))
    return TrainResult(out=out, checkpoint=checkpoint_dir(out), steps=run.step, losses=run.losses,
                       interrupted=interrupted, loss_plot=loss_plot_path(out), samples=run.samples,
                       preflight=run.estimate, seconds=time.perf_counter() - t0, base=run.engine.describe())


class _Run:
    """The state of one run; methods are the stages of ``train_lora``."""

    def __init__(self, cfg: TrainConfig, items, emit):
        self.cfg, self.items, self.emit = cfg, items, emit
        self.losses: list[float] = []
        self.samples: list[Path] = []
        self.step = 0
        self.estimate = None
        self._epochs: dict[int, list[list[int]]] = {}

    # ---- setup ----------------------------------------------------------------------------------------------
    def setup(self, ckpt) -> None:
        import torch

        from ..engine.engine import Engine
        from ..engine.loading import default_device
        from ..engine.memory import Plan
        from .caching import cache_dataset, free_text_encoder
        from .lora_modules import attach_lora

        cfg = self.cfg
        device = torch.device(cfg.device or default_device())
        on_gpu = device.type == "cuda"
        self.device = device
        loaded = Engine.load(cfg.model, variant=cfg.variant, device=str(device), dtype=cfg.dtype,
                             text_encoder=cfg.text_encoder, vae=cfg.vae, models_dirs=tuple(cfg.models_dirs),
                             offload="model_offload" if on_gpu else "cpu")
        if loaded.spec.image_template:
            raise InvalidRequest(f"training LoRAs for the edit variant '{loaded.spec.name}' is not supported; "
                                 "train on a text-to-image model", code="bad_train_config")
        # One engine for caching and samples whose stages never move the DiT (it will live on the device).
        engine = Engine(loaded.components, loaded.spec, plan=Plan("resident" if on_gpu else "cpu", 0, 0))
        engine.registry = loaded.registry
        del loaded  # its prompt encoder holds the text encoder too: gone before free_text_encoder empties the cache
        self.engine = engine
        c = engine.components
        self.dtype = c.dtype
        self.run_preflight(engine, device)

        self.emit(TrainEvent("caching", 0, len(self.items), message=f"encoding {len(self.items)} images and captions"))
        self.cache = cache_dataset(engine, self.items, device,
                                   on_item=lambda what, i, n: self.emit(TrainEvent("caching", i, n, message=what)))
        self.sample_requests = self.prepare_samples(engine) if cfg.sample_every else []
        free_text_encoder(engine)
        if not cfg.sample_every:
            c.vae = None
        else:
            c.vae.to(device)
        c.transformer.to(device)
        if cfg.gradient_checkpointing:
            c.transformer.enable_gradient_checkpointing()
        self.lora = attach_lora(c.transformer, cfg.targets, cfg.rank, cfg.lora_alpha, seed=cfg.seed)
        self.optimizer = make_optimizer(self.lora.parameters(), cfg, device)
        if ckpt is not None:
            self.lora.load_state_tensors(ckpt.lora)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.step, self.losses = ckpt.step, list(ckpt.losses)
            if "cpu" in ckpt.rng:
                torch.set_rng_state(ckpt.rng["cpu"])
            if "cuda" in ckpt.rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(ckpt.rng["cuda"])
        self.autocast = on_gpu and cfg.mixed_precision in ("auto", "bf16")

    def run_preflight(self, engine, device) -> None:
        from ..engine.memory import measure
        from .lora_modules import match_targets
        from .preflight import dit_shape, preflight

        cfg, c = self.cfg, self.engine.components
        dit = c.transformer
        shapes = {n: (m.in_features, m.out_features) for n, m in dit.named_modules() if hasattr(m, "in_features")}
        lora_params = sum(cfg.rank * (shapes[n][0] + shapes[n][1]) for n in match_targets(dit, cfg.targets))
        shape = dit_shape(dit, lora_params)
        itemsize = _itemsize(c.dtype)
        caption_tokens = max(engine.prompts.count_tokens(it.caption) for it in self.items)
        tokens = max((w // 16) * (h // 16) for w, h in {it.size for it in self.items}) + caption_tokens
        info = measure(device)
        on_gpu = device.type == "cuda"
        # On the CPU the DiT is already in the RAM we measure; on a GPU nothing is on the device yet.
        free = info.vram_free if on_gpu else info.ram_free + shape.resident_bytes
        from importlib.util import find_spec

        bnb = find_spec("bitsandbytes") is not None  # not imported: its CPU backend logs at import
        self.estimate = preflight(
            shape, device=str(device), free=free, tokens=tokens, batch=cfg.batch_size, compute_itemsize=itemsize,
            gradient_checkpointing=cfg.gradient_checkpointing, optimizer_8bit=use_8bit(cfg, device),
            keep_vae_bytes=module_bytes(c.vae) if cfg.sample_every else 0,
            text_encoder_bytes=module_bytes(c.text_encoder), vae_bytes=module_bytes(c.vae),
            resolution=cfg.resolution, bitsandbytes_available=bnb)
        self.emit(TrainEvent("preflight", message=self.estimate.describe(), data=self.estimate))
        if not self.estimate.fits and cfg.preflight:
            raise InsufficientMemory(self.estimate.describe() + " (--no-preflight runs anyway)",
                                     code="insufficient_memory")

    def prepare_samples(self, engine) -> list:
        """Prepared requests for every (prompt, seed); their prompt embeddings go into the engine's prompt cache
        now, while the text encoder is still here."""
        from ..engine.requests import GenerateRequest

        cfg = self.cfg
        reqs = []
        for i, prompt in enumerate(cfg.sample_prompts):
            for seed in cfg.sample_seeds:
                size = cfg.sample_size
                req = engine.prepare(GenerateRequest(prompt=prompt, seed=seed, steps=cfg.sample_steps,
                                                     cfg=cfg.sample_cfg, width=size, height=size))
                engine.prompts.encode(req.full_prompt())
                if req.cfg > 1.0:
                    engine.prompts.encode(req.negative_prompt)
                reqs.append((i, req))
        return reqs

    # ---- training -------------------------------------------------------------------------------------------
    def batch_for(self, step: int) -> list[int]:
        if not self._epochs:
            self._epochs[0] = self._batches(0)
        per_epoch = len(self._epochs[0])
        epoch = step // per_epoch
        if epoch not in self._epochs:
            self._epochs = {0: self._epochs[0], epoch: self._batches(epoch)}
        return self._epochs[epoch][step % per_epoch]

    def _batches(self, epoch: int):
        from .dataset import epoch_batches

        cfg = self.cfg
        return epoch_batches(self.items, repeats=cfg.repeats, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch)

    def train(self, stop: threading.Event) -> bool:
        """Steps until ``cfg.steps`` or a stop request; True when stopped early."""
        cfg = self.cfg
        if cfg.sample_every and self.step == 0:
            self.sample()
        self.emit(TrainEvent("start", self.step, cfg.steps))
        while self.step < cfg.steps:
            loss = self.train_step(self.step)
            self.step += 1
            self.losses.append(loss)
            if self.emit(TrainEvent("step", self.step, cfg.steps, loss)) is False:
                stop.set()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample()
            if stop.is_set():
                return self.step < cfg.steps
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        return False

    def train_step(self, step: int) -> float:
        import torch

        from ..engine import latents as L
        from .timesteps import noisy_input, sample_t, velocity_target

        cfg, dit = self.cfg, self.engine.components.transformer
        idx = self.batch_for(step)
        x0 = torch.stack([self.cache[i].latents for i in idx])
        b, _, lh, lw = x0.shape
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(b, method=cfg.timestep_sampling, shift=cfg.shift, sigmoid_scale=cfg.sigmoid_scale,
                     image_seq_len=(lh // 2) * (lw // 2), generator=g)
        xt = L.pack(noisy_input(x0, noise, t)).to(self.device, self.dtype)
        target = L.pack(velocity_target(x0, noise)).to(self.device)
        embeds, mask = _pad_embeds([self.cache[i].embeds for i in idx])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            pred = dit(hidden_states=xt, timestep=t.to(self.device), encoder_hidden_states=embeds.to(self.device,
                       self.dtype), encoder_hidden_states_mask=None if mask is None else mask.to(self.device),
                       img_shapes=[[(1, lh // 2, lw // 2)]] * b, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.lora.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if value != value:
            raise InvalidRequest(f"the loss became NaN at step {step + 1}; lower --lr", code="non_finite")
        return value

    # ---- outputs --------------------------------------------------------------------------------------------
    def sample(self) -> None:
        from ..outputs import save_png

        folder = sample_dir(Path(self.cfg.out))
        for i, req in self.sample_requests:
            result = self.engine.generate(req)
            img = result.images[0]
            meta = {**img.metadata, "train_step": self.step, "lora": "in-training"}
            path = save_png(img.image, meta, folder / f"step{self.step:06d}-p{i}-s{req.seed}.png")
            self.samples.append(path)
            self.emit(TrainEvent("sample", self.step, self.cfg.steps, message=str(path), data=path))

    def save(self, final: bool = False) -> None:
        from .checkpoint import checkpoint_dir, save_checkpoint
        from .export import save_lora
        from .plot import plot_losses

        out = Path(self.cfg.out)
        folder = save_checkpoint(checkpoint_dir(out), step=self.step, losses=self.losses, config=self.cfg,
                                 lora=self.lora, optimizer=self.optimizer)
        save_lora(out, self.lora, self.cfg.format, self.cfg, self.step)
        plot_losses(self.losses, loss_plot_path(out), title=f"{out.stem} loss")
        self.emit(TrainEvent("checkpoint", self.step, self.cfg.steps, message=str(folder), data=folder))


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def use_8bit(cfg: TrainConfig, device) -> bool:
    if cfg.optimizer == "adamw" or str(device).split(":")[0] != "cuda":
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(params, cfg: TrainConfig, device):
    """AdamW; bitsandbytes' 8-bit AdamW on CUDA when installed (``auto``) or asked for (``adamw8bit``)."""
    import torch

    params = list(params)
    if cfg.optimizer == "adamw8bit" and not use_8bit(cfg, device):
        raise InvalidRequest("--optimizer adamw8bit needs CUDA and the bitsandbytes package (pip install "
                             "bitsandbytes); use --optimizer adamw", code="bad_train_config")
    if use_8bit(cfg, device):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _pad_embeds(embeds: list):
    """Stack [L_i, D] caption embeddings into [B, L, D]; a bool mask only when lengths differ (the engine passes no
    mask for a single prompt, and the DiT's masked attention path is slower)."""
    import torch

    n = max(e.shape[0] for e in embeds)
    if all(e.shape[0] == n for e in embeds):
        return torch.stack(embeds), None
    out = torch.zeros(len(embeds), n, embeds[0].shape[1], dtype=embeds[0].dtype)
    mask = torch.zeros(len(embeds), n, dtype=torch.bool)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask


def _itemsize(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()
