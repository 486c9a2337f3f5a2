"""``qwenstudio train-lora``: a folder of captioned images -> a LoRA file (registered in ``cli/main.py``).

Thin: options -> ``TrainConfig`` -> ``train_lora``; a rich progress bar with loss and ETA on a terminal, one JSON
line per event with ``--json``. Errors print one line and exit 2; Ctrl-C stops after the current step, keeps the
checkpoint and says how to resume (exit 130).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def train_lora_command(
    dataset: Path = typer.Argument(..., help="Folder of images (png/jpg/webp) with same-name .txt captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Output LoRA file (.safetensors); beside it: NAME.json "
                             "(config), NAME.ckpt/ (resumable checkpoint), NAME.loss.png, NAME.samples/."),
    model: str = typer.Option("tiny", "--model", "-m", help="Base model: name, diffusers folder or DiT file "
                              "(bf16, fp8, fp8-scaled or GGUF; the LoRA trains on top of the quantized weights)."),
    variant: str | None = typer.Option(None, help="Recipe (text-to-image variants only)."),
    text_encoder: str | None = typer.Option(None, "--text-encoder", help="Text encoder name (single-file DiTs)."),
    vae: str | None = typer.Option(None, "--vae", help="VAE name (single-file DiTs)."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per step (one bucket size per batch)."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    rank: int = typer.Option(16, help="LoRA rank."),
    alpha: float | None = typer.Option(None, help="LoRA alpha (default: = rank, scale 1)."),
    target: list[str] = typer.Option([], "--target", help="Module name suffix to train (repeatable; default: the "
                                     "attention and MLP linears of every block)."),
    resolution: int = typer.Option(1024, help="Bucket area = resolution²; sides multiples of --bucket-step."),
    bucket_step: int = typer.Option(64, "--bucket-step", help="Bucket side granularity (multiple of 16)."),
    repeats: int = typer.Option(1, help="Times each image appears per epoch."),
    trigger: str | None = typer.Option(None, help="Trigger word: replaces [trigger] in captions, else prepended."),
    timestep_sampling: str = typer.Option("shift", "--timestep-sampling", help="shift (musubi default), qwen_shift "
                                          "(resolution-dependent, as inference), uniform."),
    shift: float = typer.Option(2.2, help="Shift for --timestep-sampling shift (musubi's Qwen-Image default 2.2)."),
    seed: int = typer.Option(42, help="Seed of LoRA init, batch order, noise and timesteps."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint (and LoRA file) every N steps."),
    sample_every: int = typer.Option(0, "--sample-every", help="Sample images every N steps (and at step 0)."),
    sample_prompt: list[str] = typer.Option([], "--sample-prompt", help="Prompt for samples (repeatable)."),
    sample_seed: list[int] = typer.Option([], "--sample-seed", help="Fixed seed for samples (repeatable; "
                                          "default 42)."),
    sample_steps: int | None = typer.Option(None, "--sample-steps", help="Denoising steps of samples."),
    sample_cfg: float | None = typer.Option(None, "--sample-cfg", help="CFG of samples."),
    sample_size: int | None = typer.Option(None, "--sample-size", help="Side of square samples."),
    lora_format: str = typer.Option("peft", "--format", help="Key style of the output: peft (diffusers), comfy, "
                                    "kohya."),
    optimizer: str = typer.Option("auto", help="auto (8-bit AdamW on CUDA with bitsandbytes), adamw, adamw8bit."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto (bf16 autocast on CUDA), bf16, no."),
    device: str | None = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
    dtype: str | None = typer.Option(None, help="Compute dtype (default: bf16 on CUDA, fp32 on CPU)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue from a checkpoint folder (NAME.ckpt)."),
    config: Path | None = typer.Option(None, "--config", help="Take every setting from a saved NAME.json "
                                       "(the dataset argument and --out still apply)."),
    no_preflight: bool = typer.Option(False, "--no-preflight", help="Run even if the memory estimate says it "
                                      "will not fit."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per event, no progress bar."),
) -> None:
    """Train a LoRA. Example: qwenstudio train-lora my_images/ --model qwen-image --out my.safetensors"""
    from ..errors import QwenStudioError
    from ..train import TrainConfig, train_lora

    try:
        fields = dict(
            dataset=str(dataset), out=str(out), model=model, variant=variant, text_encoder=text_encoder, vae=vae,
            models_dirs=tuple(str(d) for d in models_dir), steps=steps, batch_size=batch_size, learning_rate=lr,
            weight_decay=weight_decay, rank=rank, alpha=alpha, resolution=resolution, bucket_step=bucket_step,
            repeats=repeats, trigger=trigger, timestep_sampling=timestep_sampling, shift=shift, seed=seed,
            save_every=save_every, sample_every=sample_every, sample_prompts=tuple(sample_prompt),
            sample_steps=sample_steps, sample_cfg=sample_cfg, sample_size=sample_size, format=lora_format,
            optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            device=device, dtype=dtype, resume=str(resume) if resume else None, preflight=not no_preflight,
        )
        if target:
            fields["targets"] = tuple(target)
        if sample_seed:
            fields["sample_seeds"] = tuple(sample_seed)
        if config is not None:
            saved = TrainConfig.from_file(config).to_dict()
            fields = {**saved, "dataset": str(dataset), "out": str(out), "resume": fields["resume"]}
        cfg = TrainConfig(**fields)
        if as_json or not sys.stderr.isatty():
            result = train_lora(cfg, on_event=_json_events if as_json else _plain_events)
        else:
            result = _with_bar(cfg, train_lora)
    except QwenStudioError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # Ctrl-C while loading/caching, before any step: nothing to keep yet
        typer.echo("error: interrupted before training started; nothing was written", err=True)
        raise typer.Exit(130) from None
    summary = {"out": str(result.out), "steps": result.steps, "interrupted": result.interrupted,
               "checkpoint": str(result.checkpoint), "loss_plot": str(result.loss_plot),
               "final_loss": result.losses[-1] if result.losses else None, "samples": [str(p) for p in result.samples],
               "seconds": round(result.seconds, 2)}
    if as_json:
        typer.echo(json.dumps({"event": "result", **summary}))
    else:
        typer.echo(f"wrote {result.out} ({result.steps} steps, loss plot {result.loss_plot})")
        typer.echo(f"use it: qwenstudio generate \"PROMPT\" --model {cfg.model} --lora {result.out}")
    if result.interrupted:
        typer.echo(f"stopped at step {result.steps}; resume with --resume {result.checkpoint}", err=True)
        raise typer.Exit(130)


def _json_events(e) -> None:
    if e.kind in ("step", "caching") and e.step not in (1, e.total) and e.step % 50:
        return
    typer.echo(json.dumps({"event": e.kind, "step": e.step, "total": e.total, "loss": e.loss, "message": e.message}))


def _plain_events(e) -> None:
    if e.kind in ("preflight", "warning", "checkpoint", "sample", "done"):
        typer.echo(f"{e.kind}: {e.message}", err=True)


def _with_bar(cfg, train):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("training", total=cfg.steps, loss="-")

        def on_event(e):
            if e.kind == "step":
                bar.update(task, completed=e.step, loss=f"{e.loss:.4f}")
            elif e.kind == "start":
                bar.update(task, completed=e.step)
            elif e.kind == "caching":
                bar.update(task, description=f"caching {e.message} {e.step}/{e.total}")
                if e.message == "captions" and e.step == e.total:
                    bar.update(task, description="training")
            else:
                bar.console.print(f"{e.kind}: {e.message}")

        return train(cfg, on_event=on_event)
