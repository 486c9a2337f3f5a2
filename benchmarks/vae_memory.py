"""The VAE decode's peak working memory per output pixel, measured on the CPU: the real-width Qwen-Image VAE (random
weights, fp32) decodes one image per size in a fresh process and the resident-set growth is read from the kernel
(``ru_maxrss`` against the RSS before the decode). The marginal bytes per pixel between two sizes is the constant
``engine/footprints.py`` uses (``VAE_ELEMS_PER_PIXEL_PER_BASE``: 21 x base width 96 x 4 bytes = 8.06 kB/pixel).

Usage: OMP_NUM_THREADS=1 python benchmarks/vae_memory.py [--sizes 256 512]   (~2.5 GB RAM at 512²)
Measured here: 256² +661 MiB, 512² +2165 MiB -> 8.02 kB per pixel (fp32), i.e. 20.9 x base width x 4 bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_CHILD = """
import os, resource, sys, torch
from diffusers import AutoencoderKLQwenImage
from qwenstudio.engine.formats.comfy import QWEN_IMAGE_VAE_CONFIG
size = int(sys.argv[1])
vae = AutoencoderKLQwenImage.from_config(QWEN_IMAGE_VAE_CONFIG).eval()
with torch.inference_mode():
    vae.decode(torch.randn(1, 16, 1, 8, 8))
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
with torch.inference_mode():
    vae.decode(torch.randn(1, 16, 1, size // 8, size // 8))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=(256, 512))
    args = ap.parse_args()
    grown = {}
    for size in args.sizes:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(size)], capture_output=True, text=True, check=True)
        grown[size] = int(out.stdout.strip().splitlines()[-1])
        print(f"{size}x{size}: +{grown[size] / 2**20:.0f} MiB")
    a, b = args.sizes
    per_pixel = (grown[b] - grown[a]) / (b * b - a * a)
    print(f"marginal: {per_pixel / 1000:.2f} kB per output pixel (fp32) = {per_pixel / (96 * 4):.1f} x base width x 4 B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
