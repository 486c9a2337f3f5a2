"""Model-switch cost on one server: a job for a model that must be loaded (evicting the other) vs a job for a
resident one, through MultiModelEngineClient (service/model_pool.py) on two tiny models with different weights.

Two runs of the same alternating sequence: ``--max-resident 1`` (every job switches: load + evict + run) and
``--max-resident 2`` (both stay loaded: run only). Prints the median job time of each, the median load time and the
ratio switch / resident. Real weights load in tens of seconds (the DiT alone is 40 GB in bf16); tiny shows the
fixed overhead of a switch (file reads, module construction, collection of the evicted engine).
Usage: python benchmarks/model_switch.py [--jobs 8] [--steps 2] [--size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import os

    from qwenstudio.config import Settings
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.engine.requests import GenerateRequest
    from qwenstudio.service.engine_client import LoadEvent
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog, MultiModelEngineClient
    from qwenstudio.testing.tiny import TinySpec, write_diffusers_folder

    root = Path(tempfile.mkdtemp(prefix="qwenstudio-switch-"))
    os.environ["HF_HUB_CACHE"] = str(root / "hf-empty")
    for name, seed in (("tiny-a", 0), ("tiny-b", 1)):
        write_diffusers_folder(root / "models" / name, TinySpec(seed=seed))
    settings = Settings(home=root / "home", models_dirs=(root / "models",), device="cpu")
    out = {}
    for resident in (1, 2):
        client = MultiModelEngineClient(ModelCatalog(settings, "tiny-a", LoadOptions(device="cpu")),
                                        max_resident=resident)
        client.wait_ready(600)
        if resident == 2:  # both loaded before timing
            client.submit(EngineJob("warm", "tiny-b", GenerateRequest(prompt="warm", seed=0, steps=1,
                                                                      width=args.size, height=args.size)),
                          lambda e: True)
        times, switching = [], []
        for i in range(args.jobs):
            model = ("tiny-b", "tiny-a")[i % 2]
            req = GenerateRequest(prompt="a red fox", seed=i, steps=args.steps, width=args.size, height=args.size)
            marks: dict[str, float] = {}

            def on_event(e, marks=marks):
                if isinstance(e, LoadEvent):
                    marks[e.phase] = time.perf_counter()
                return True

            t0 = time.perf_counter()
            client.submit(EngineJob(f"j{i}", model, req), on_event)
            times.append(time.perf_counter() - t0)
            if "start" in marks:
                switching.append(marks["done"] - marks["start"])  # evict + load
        loads = [s for _, s in client.loads[1:]]  # after the preload
        out[resident] = {"job_median_s": statistics.median(times), "loads": len(loads),
                         "load_median_s": statistics.median(loads) if loads else 0.0,
                         "evict_and_load_median_s": statistics.median(switching) if switching else 0.0}
        client.close()
    switch, stay = out[1]["job_median_s"], out[2]["job_median_s"]
    print(f"tiny, {args.steps} steps, {args.size}x{args.size}, {args.jobs} alternating jobs (CPU)")
    print(f"  every job switches (--max-resident 1): {switch:.3f} s/job, load {out[1]['load_median_s']:.3f} s "
          f"({out[1]['loads']} loads), evict + load {out[1]['evict_and_load_median_s']:.3f} s; the rest is the first "
          "run on a freshly loaded engine (cold)")
    print(f"  both resident      (--max-resident 2): {stay:.3f} s/job ({out[2]['loads']} loads)")
    print(f"  switch / resident: {switch / stay:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"max_resident_1": out[1], "max_resident_2": out[2],
                                         "ratio": switch / stay}, indent=2))


if __name__ == "__main__":
    main()
