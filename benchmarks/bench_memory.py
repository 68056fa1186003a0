"""Peak memory of `rfm run` and `rfm export` against the upload's size, and of the app over many tabs
(DESIGN: bounded by max_side, not by the upload).

Writes smooth JPEG photos-to-be of 2000², 5000² and 10000² pixels (a gradient with a disc and
noise, so the encoder has work), runs `rfm run` (label, cams, overlays, figure) and `rfm export`
(label PNG, cams .npy, COCO) on each in a fresh process with the built-in model (`--clip
synthetic`, its decoder, 3 classes), and prints each process's peak RSS (ru_maxrss, workers
included) and its ratio to the smallest; goal: within 1.3×. Then a studio opens, analyses,
exports and closes 20 tabs and prints its RSS after the first and the last. `--clip PATH`
measures another CLIP (e.g. a random ViT-B/16 file).

    .venv/bin/python benchmarks/bench_memory.py [--sides 2000,5000,10000] [--commands run,export] [--sessions 20]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
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


# The child reports its own peak (and its workers'), so each figure is that run's whatever ran before it.
PEAK = ("import resource, sys; from rfm.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, "
        "resource.RUSAGE_CHILDREN)), file=sys.stderr); sys.exit(code)")


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one rfm command in a fresh interpreter."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak = next(line for line in proc.stderr.splitlines() if line.startswith("PEAK "))
    return int(peak.split()[1]) / 1024, time.perf_counter() - t0


def command(kind: str, photo: Path, out: Path, clip: str, labels: str) -> list[str]:
    """`rfm run` on the photo, or `rfm export` of a folder holding only it (label PNG, CAMs, COCO)."""
    if kind == "run":
        return ["run", str(photo), "--labels", labels, "--clip", clip, "--out", str(out), "--device", "cpu"]
    csv = photo.with_suffix(".csv")
    csv.write_text(f"image,labels\n{photo.name},{labels.replace(',', ' ')}\n")
    return ["export", "--images", str(photo.parent), "--labels", str(csv), "--format", "png,npy,coco", "--clip", clip,
            "--out", str(out), "--device", "cpu"]


SESSIONS = """
import resource, sys
from rfm.render import Display
from rfm.session import Controls, Models
from rfm.ui import Studio
studio = Studio(Models.load("synthetic", None, "cpu"))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
for n in range(1, int(sys.argv[2]) + 1):
    tab = type("Request", (), {"session_hash": f"tab-{n}"})()
    session = studio.open_tab(tab)
    studio.analyse(session, {"image": sys.argv[1], "boxes": []}, ["ball"], "Synthetic", "", "", None, Controls(),
                   Display("ball", False))
    studio.export_label(session)
    studio.close_tab(tab)
    if n == 1:
        first = rss()
print(f"{first:.0f} {rss():.0f}")
"""


def app_sessions(photo: Path, count: int) -> tuple[float, float]:
    """RSS (MB) of a studio after the first of ``count`` tabs (open, analyse, export, close) and after the last."""
    proc = subprocess.run([sys.executable, "-c", SESSIONS, str(photo), str(count)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    first, last = proc.stdout.split()
    return float(first), float(last)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", default="2000,5000,10000")
    p.add_argument("--commands", default="run,export", help="which of run,export to measure")
    p.add_argument("--sessions", type=int, default=20, help="app tabs to open and close (0: skip)")
    p.add_argument("--clip", default="synthetic")
    p.add_argument("--labels", default="ball,house,tree")
    args = p.parse_args()
    sides = sorted(int(s) for s in args.sides.split(","))
    labels = args.labels if args.clip == "synthetic" else "cat"
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.commands.split(","):
            rows = []
            for side in sides:
                folder = Path(tmp) / kind / str(side)
                folder.mkdir(parents=True)
                photo = folder / f"photo{side}.jpg"
                write_photo(photo, side)
                out = Path(tmp) / kind / f"out{side}"
                mb, seconds = peak_rss_mb(command(kind, photo, out, args.clip, labels))
                label_file = out / "label.png" if kind == "run" else out / "SegmentationClass" / f"photo{side}.png"
                with warnings.catch_warnings():  # a 10000² label is past Pillow's bomb warning, and expected
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    assert Image.open(label_file).size == (side, side)
                rows.append((side, photo.stat().st_size / 2**20, mb, seconds))
            print(f"\nrfm {kind} --clip {args.clip} (label and CAMs at full size), peak RSS per process:")
            print("| image | JPEG MB | peak RSS MB | × smallest | seconds |")
            print("|---|---|---|---|---|")
            for side, size, mb, seconds in rows:
                print(f"| {side}×{side} | {size:.1f} | {mb:.0f} | {mb / rows[0][2]:.2f} | {seconds:.1f} |")
        if args.sessions:
            photo = Path(tmp) / "app.jpg"
            write_photo(photo, 2000)
            first, last = app_sessions(photo, args.sessions)
            print(f"\napp: RSS after 1 tab {first:.0f} MB, after {args.sessions} tabs opened, analysed, exported "
                  f"and closed {last:.0f} MB ({(last - first) / max(1, args.sessions - 1):.1f} MB per tab)")


if __name__ == "__main__":
    main()
