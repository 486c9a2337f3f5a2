"""Time from a stop request to the run actually stopping, per stage (SECURITY 31), on the tiny model at one size.

Two figures per stage:
- ``worst gap``: the longest interval between two stop checks while the stage runs uncancelled — the worst case a
  cancel can wait for;
- ``cancel -> stop``: a real stop requested halfway through the stage (by wall time from an uncancelled run) and
  the time until ``Cancelled`` is raised.
For comparison, the stage's own duration is what a cancel waited before the checks existed (the stage ran to its
end: one uninterruptible call).
Usage: python benchmarks/cancel_latency.py [--size 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path

STAGES = ("text_encode", "vae_encode", "denoise", "vae_decode")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels (the operator's max)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from PIL import Image

    from qwenstudio import Engine
    from qwenstudio.engine.stopping import stage_modules, stop_checks
    from qwenstudio.errors import Cancelled
    from qwenstudio.testing.tiny import write_diffusers_folder

    folder = write_diffusers_folder(Path(tempfile.mkdtemp()) / "tiny")
    engine = Engine.load(folder, variant="tiny", device="cpu")
    side = args.size
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 200)).save(buf, format="PNG")
    image = buf.getvalue()
    long_prompt = " ".join(["a detailed lighthouse on a cliff at dusk"] * 40)

    def run(should_stop=None, tag=""):  # an img2img edit: every stage, text encode to decode
        return engine.edit(prompt=f"{long_prompt} {tag}", negative_prompt=f"blurry {tag}", cfg=4.0, images=[image],
                           strength=0.5, steps=2, seed=1, width=side, height=side, should_stop=should_stop)

    # 1. an uncancelled run, recording when each stage checks
    calls: dict[str, list[float]] = {s: [] for s in STAGES}

    def recorder(stage):
        def rec():
            calls[stage].append(time.perf_counter())
            return False
        return rec

    modules = stage_modules(engine.components)
    with (stop_checks(recorder("text_encode"), {"text_encode": modules["text_encode"]}),
          stop_checks(recorder("vae_encode"), {"vae_encode": modules["vae_encode"]}),
          stop_checks(recorder("denoise"), {"denoise": modules["denoise"]}),
          stop_checks(recorder("vae_decode"), {"vae_decode": modules["vae_decode"]})):
        t0 = time.perf_counter()
        run(tag="record")
        total = time.perf_counter() - t0
    report = {"size": side, "total_s": round(total, 3), "stages": {}}
    for stage in STAGES:
        ts = calls[stage]
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        report["stages"][stage] = {"duration_s": round(ts[-1] - ts[0], 3) if ts else 0.0, "checks": len(ts),
                                   "worst_gap_s": round(max(gaps), 4) if gaps else 0.0}

    # 2. a real stop halfway through each stage
    for stage in STAGES:
        ts = calls[stage]
        if len(ts) < 2:
            continue
        flag = {"on": False, "at": None}
        start = {}

        def arm(stage=stage, ts=ts, flag=flag, start=start):
            def on_first_check():
                if "t" not in start:
                    start["t"] = time.perf_counter()
                    delay = (ts[-1] - ts[0]) / 2

                    def fire():
                        flag["at"] = time.perf_counter()
                        flag["on"] = True
                    threading.Timer(delay, fire).start()
                return False
            return on_first_check

        with stop_checks(arm(), {stage: modules[stage]}):
            try:
                run(lambda flag=flag: flag["on"], tag=f"stop {stage}")
                latency = None
            except Cancelled as e:
                latency = time.perf_counter() - flag["at"]
                if e.detail.get("stage") != stage:  # the stage ended before the timer: not a measurement
                    latency = None
        report["stages"][stage]["cancel_to_stop_s"] = None if latency is None else round(latency, 4)

    print(f"cancel latency, tiny model on CPU, {side}x{side} img2img (2 steps), uncancelled run {total:.1f} s")
    print(f"{'stage':<12} {'stage s':>8} {'checks':>7} {'worst gap s':>12} {'cancel->stop s':>15}")
    for stage, r in report["stages"].items():
        print(f"{stage:<12} {r['duration_s']:>8.2f} {r['checks']:>7} {r['worst_gap_s']:>12.4f} "
              f"{r.get('cancel_to_stop_s') if r.get('cancel_to_stop_s') is not None else '-':>15}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
