"""VAE decode alone: our decode stage vs stock diffusers' ``vae.decode`` on the shape-true bench's VAE, CPU-seconds.

The bench (``qwenstudio bench --shape wide``) times stock's ``vae.decode`` call and our whole decode stage; this
script times the pieces of ours separately (latent unpack + de-normalisation, ``vae.decode``, float -> PIL) against
the bare ``vae.decode`` stock calls, each in CPU-seconds (process time: stable on a loaded machine), and optionally
prints a torch profile of each side.

Usage: OMP_NUM_THREADS=1 python benchmarks/vae_decode_profile.py [--size 256] [--vae tiny|real] [--repeats 5]
       [--stop-checks] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--vae", default="tiny", help="the wide bench's VAE: tiny (its default) or real")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stop-checks", action="store_true", help="ours with a should_stop (cancel checks installed)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables (top ops by CPU time)")
    ap.add_argument("--in-context", type=int, default=0, metavar="STEPS",
                    help="also time vae.decode inside full runs (stock pipeline vs our generate, CFG 4, STEPS steps)")
    args = ap.parse_args()
    import torch

    from qwenstudio.engine import latents as L
    from qwenstudio.engine.engine import Engine
    from qwenstudio.engine.pipeline import decode
    from qwenstudio.engine.specs import get_spec
    from qwenstudio.engine.stopping import stage_modules, stop_checks
    from qwenstudio.testing.wide import WideSpec, build_wide_components

    c = build_wide_components(WideSpec(layers=1, vae=args.vae))
    engine = Engine(c, get_spec("qwen-image"))
    lh, lw = L.latent_hw(args.size, args.size)
    packed = L.pack(torch.randn(1, 16, lh, lw, generator=torch.Generator().manual_seed(0)))
    cfg = c.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    stock_in = L.unpack(packed, lh, lw).unsqueeze(2) * std + mean  # what stock hands to vae.decode

    def stock():
        with torch.no_grad():  # QwenImagePipeline.__call__ runs under no_grad
            return c.vae.decode(stock_in, return_dict=False)[0]

    def ours():
        should_stop = (lambda: False) if args.stop_checks else None
        with torch.inference_mode(), stop_checks(should_stop, stage_modules(c)):
            return decode(engine, packed, lh, lw, args.size * args.size)

    def ours_vae_only():
        with torch.inference_mode():
            return L.decode(c.vae, L.unpack(packed, lh, lw))

    def cpu_seconds(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return statistics.median(times)

    rows = {"stock vae.decode (no_grad)": cpu_seconds(stock), "ours L.decode (inference_mode)": cpu_seconds(
        ours_vae_only), "ours decode stage (+ to PIL)": cpu_seconds(ours)}
    a = (stock().float() / 2 + 0.5).clamp(0, 1)[:, :, 0]
    with torch.inference_mode():
        b = L.decode(c.vae, L.unpack(packed, lh, lw))
    print(f"VAE {args.vae}, {args.size}x{args.size}, threads {torch.get_num_threads()}, median of {args.repeats}, "
          f"CPU-seconds; max |ours - stock| = {float((a - b).abs().max()):.2e}")
    base = rows["stock vae.decode (no_grad)"]
    for name, s in rows.items():
        print(f"  {name:34s} {s:8.4f} s  {s / base:5.2f}x")
    if args.in_context:
        in_context(c, engine, args)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("stock", stock), ("ours", ours)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


def in_context(c, engine, args) -> None:
    """``vae.decode`` CPU-seconds inside whole runs: what follows a denoise loop (allocator state, caches) counts."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from qwenstudio.bench import NEGATIVE, PROMPT

    spent: dict[str, list] = {"stock": [], "ours": []}
    orig = c.vae.decode
    side = ["stock"]

    def timed(*a, **k):
        t, w = time.process_time(), time.perf_counter()
        out = orig(*a, **k)
        spent[side[0]].append((time.process_time() - t, time.perf_counter() - w))
        return out

    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
                             text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer)
    pipe.set_progress_bar_config(disable=True)
    c.vae.decode = timed
    stage = []
    try:
        for i in range(args.repeats):
            for name in (("stock", "ours") if i % 2 == 0 else ("ours", "stock")):
                side[0] = name
                if name == "stock":
                    pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=args.size, width=args.size,
                         num_inference_steps=args.in_context, generator=torch.Generator().manual_seed(0),
                         output_type="pt")
                else:
                    engine.prompts.clear()
                    t = time.process_time()
                    r = engine.generate(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                                        steps=args.in_context, cfg=4.0, seed=0)
                    stage.append((r.timings["vae_decode"], time.process_time() - t))
    finally:
        del c.vae.decode
    print(f"in context ({args.in_context} steps, CFG 4), vae.decode per run, CPU-seconds (wall):")
    for name, v in spent.items():
        print(f"  {name:6s} median {statistics.median(c for c, _ in v):.4f} ({statistics.median(w for _, w in v):.4f})"
              f"  all {[(round(c, 3), round(w, 3)) for c, w in v]}")
    print(f"  ours decode stage wall (timings['vae_decode']): {[round(s[0], 3) for s in stage]}")


if __name__ == "__main__":
    raise SystemExit(main())
