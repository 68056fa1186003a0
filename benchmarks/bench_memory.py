"""Peak memory of `rfm run` against the upload's size (DESIGN: bounded by max_side, not by the upload).

Writes smooth JPEG photos-to-be of 2000², 5000² and 10000² pixels (a gradient with a disc and
noise, so the encoder has work), runs `python -m rfm run` on each in a fresh process with the
built-in model (`--clip synthetic`, its decoder, 3 classes' outputs: label, cams, overlays,
figure), and prints each child's peak RSS (ru_maxrss) and its ratio to the smallest. Goal: the
ratios stay within 1.3×. `--clip PATH` measures another CLIP (e.g. a random ViT-B/16 file).

    .venv/bin/python benchmarks/bench_memory.py [--sides 2000,5000,10000] [--clip synthetic]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_photo(path: Path, side: int) -> None:
    """A side² JPEG built a band at a time, so the benchmark itself stays small."""
    image = Image.new("RGB", (side, side))
    rng = np.random.default_rng(side)
    band = 500
    xs = np.arange(side)[None, :]
    for y0 in range(0, side, band):
        ys = np.arange(y0, min(side, y0 + band))[:, None]
        disc = ((xs - side / 2) ** 2 + (ys - side / 2) ** 2) < (side / 4) ** 2
        rgb = np.stack([xs * 255 // side + 0 * ys, ys * 255 // side + 0 * xs, np.where(disc, 220, 40)], -1)
        rgb = np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
        image.paste(Image.fromarray(rgb), (0, y0))
    image.save(path, quality=90)


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `rfm run` in a child process that is the only child alive."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    # a fresh interpreter per run: RUSAGE_CHILDREN reports the largest child so far, so runs go
    # from the smallest image up and each one's figure is its own as long as it is the largest
    proc = subprocess.run([sys.executable, "-m", "rfm", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", default="2000,5000,10000")
    p.add_argument("--clip", default="synthetic")
    p.add_argument("--labels", default="ball,house,tree")
    args = p.parse_args()
    sides = sorted(int(s) for s in args.sides.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for side in sides:
            photo = Path(tmp) / f"photo{side}.jpg"
            write_photo(photo, side)
            labels = args.labels if args.clip == "synthetic" else "cat"
            mb, seconds = peak_rss_mb(["run", str(photo), "--labels", labels, "--clip", args.clip,
                                       "--out", str(Path(tmp) / f"out{side}"), "--device", "cpu"])
            label = Image.open(Path(tmp) / f"out{side}" / "label.png")
            assert label.size == (side, side), label.size
            rows.append((side, photo.stat().st_size / 2**20, mb, seconds))
        print(f"rfm run --clip {args.clip} (label.png and cams.npy at full size), peak RSS per process:")
        print("| image | JPEG MB | peak RSS MB | × smallest | seconds |")
        print("|---|---|---|---|---|")
        for side, size, mb, seconds in rows:
            print(f"| {side}×{side} | {size:.1f} | {mb:.0f} | {mb / rows[0][2]:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
