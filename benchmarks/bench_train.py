"""Time per training step of the WeCLIP decoder, exact and cached-feature modes, ViT-B/16 random weights.

Official recipe sizes (batch 4, 320 crops, 256-wide decoder with 3 layers) on voc-mini; prints the
median step time of each mode (after the first step), the one-off feature-caching time per image,
and the per-image adaptation step time in the Predictor.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rfm  # noqa: E402
from rfm.backbone import random_clip  # noqa: E402
from rfm.data import load_image, voc_samples  # noqa: E402
from rfm.params import RefineParams  # noqa: E402
from rfm.text import VOC  # noqa: E402
from rfm.params import TrainConfig  # noqa: E402
from rfm.train import FeatureCache, train  # noqa: E402

VOC_MINI = ROOT.parent / "shared" / "data" / "voc-mini"


def step_times(out: Path) -> list[float]:
    with (out / "log.csv").open() as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    return [b - a for a, b in zip(seconds, seconds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    clip = random_clip(device=args.device)
    samples = voc_samples(VOC_MINI, labels_from="mask")
    params = RefineParams()
    print(f"ViT-B/16 random weights on {args.device}, {torch.get_num_threads()} threads; batch 4, crop 320, "
          f"decoder 256×3 layers; voc-mini ({len(samples)} images)")
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            out = Path(tmp) / ("cached" if cached else "exact")
            config = TrainConfig(steps=args.steps, switch_step=1, cache_features=cached, save_every=10**9)
            if cached:
                cache = FeatureCache(out / "feature_cache", clip, VOC, config.cache_side, "")
                t0 = time.perf_counter()
                cache.build(samples, progress=False)
                per_image = (time.perf_counter() - t0) / len(samples)
                print(f"feature cache: {per_image:.2f} s per image (once), "
                      f"{sum(p.stat().st_size for p in (out / 'feature_cache').glob('*.npy')) / len(samples) / 2**20:.1f} "
                      f"MB per image on disk at long side {config.cache_side}")
            train(samples, clip, VOC, params, config, out, progress=False)
            times = step_times(out)
            print(f"{'cached' if cached else 'exact '} mode: {statistics.median(times):.2f} s per step "
                  f"(median of {len(times)}; RFM on)")

    predictor = rfm.Predictor(clip, device=args.device)
    predictor.set_image(load_image(samples[0].image), labels=list(samples[0].labels))
    t0 = time.perf_counter()
    predictor.adapt_decoder(steps=20, params=params)
    print(f"adapt_decoder: {(time.perf_counter() - t0) / 20 * 1000:.0f} ms per step "
          f"(one {load_image(samples[0].image).shape[1]}×{load_image(samples[0].image).shape[0]} image, "
          f"pseudo label every 5 steps)")


if __name__ == "__main__":
    main()
