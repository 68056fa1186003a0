"""Cost of `rfm sweep` against one `rfm export` over the same images (issue: a 60-setting sweep without PAR
within 3× of one export), on voc-mini with a ViT-B/16-sized random CLIP and a random WeCLIP decoder.

The sweep is α 1..4 × N0 5..9 × λ 0.3/0.4/0.5 = 60 settings with --par-iterations 0; the export uses the
defaults (PAR on), png + npy. Both run in a fresh process on the CPU; the figures include model loading.

    .venv/bin/python benchmarks/bench_sweep.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rfm.backbone import random_clip_state_dict  # noqa: E402
from rfm.decoder import Decoder  # noqa: E402

VOC_MINI = ROOT.parent / "shared" / "data" / "voc-mini"
GRID = ["--alpha", "1:4", "--n0", "5:9", "--box-threshold", "0.3,0.4,0.5", "--par-iterations", "0"]


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rfm", *args], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(random_clip_state_dict(seed=0), tmp / "clip.pt")  # ViT-B/16 shapes
        torch.manual_seed(0)
        Decoder().save(tmp / "decoder.safetensors")
        common = ["--voc", str(VOC_MINI), "--labels-from", "mask", "--clip", str(tmp / "clip.pt"), "--decoder",
                  str(tmp / "decoder.safetensors"), "--device", "cpu"]
        export = timed(["export", *common, "--format", "png,npy", "--workers", "0", "--out", str(tmp / "pl")])
        sweep = timed(["sweep", *common, *GRID, "--no-progress", "--out", str(tmp / "sweep")])
        images, settings = 11, 60
        print(f"voc-mini ({images} images), ViT-B/16 random, CPU ({os.cpu_count()} cores):")
        print(f"  rfm export (defaults, PAR on, png+npy): {export:.1f} s")
        print(f"  rfm sweep, {settings} settings, PAR off:   {sweep:.1f} s  = {sweep / export:.2f}× the export")
        print(f"  ≈ {1000 * (sweep - export) / (settings * images):.0f} ms per setting and image beyond what one "
              f"export costs (both pay one CLIP pass per image and the model loading)")


if __name__ == "__main__":
    main()
