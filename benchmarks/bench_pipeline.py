"""Pipeline timings against DESIGN.md's budgets: ViT-B/16 with random weights, a VOC-sized image (500×375).

Prints: the bare open_clip image forward at the same input size, ``set_image`` for K = 1..5 classes
and its ratio to the bare forward (budget ≤ 1.5×), and ``refine`` after a parameter change with and
without PAR (budgets 0.5 s / 0.1 s), both for the call and with every image-size output materialised.

    .venv/bin/python benchmarks/bench_pipeline.py [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rfm  # noqa: E402
from rfm.backbone import network_size, random_clip, resize_image, resize_positional_embedding, to_tensor  # noqa: E402
from rfm.decoder import Decoder  # noqa: E402

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-mini" / "JPEGImages" / "2008_004430.jpg"


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_open_clip_forward(clip, image: np.ndarray, device):
    """open_clip's own VisionTransformer.forward (fused attention, no attention maps kept) at the same size."""
    size = network_size(image.shape[:2], 512, clip.patch_size)
    visual = copy.deepcopy(clip.model.visual)
    grid = (size[0] // clip.patch_size, size[1] // clip.patch_size)
    visual.positional_embedding = torch.nn.Parameter(
        resize_positional_embedding(visual.positional_embedding.detach(), grid), requires_grad=False)
    x = to_tensor(resize_image(image, size), clip.mean, clip.std, device)

    def run():
        with torch.no_grad():
            visual(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)

    if PHOTO.is_file():
        image = resize_image(rfm.data.load_image(PHOTO), (375, 500))
    else:
        image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    print(f"device {device}, torch threads {torch.get_num_threads()}, image 500×375 → tokens 32×24")
    clip = random_clip(device=device)  # ViT-B/16 shapes, random weights
    torch.manual_seed(0)
    decoder = Decoder().eval()  # WeCLIP VOC decoder shapes, random weights

    bare = timed(bare_open_clip_forward(clip, image, device), args.repeats)
    print(f"bare open_clip image forward: {bare * 1000:7.1f} ms")

    for use_decoder in (False, True):
        predictor = rfm.Predictor(clip, vocabulary="voc", decoder=decoder if use_decoder else None, device=device)
        for k in range(1, 6):
            labels = list(range(k))
            t = timed(lambda: predictor.set_image(image, labels=labels), args.repeats)
            tag = "with decoder   " if use_decoder else "without decoder"
            print(f"set_image K={k} {tag}: {t * 1000:7.1f} ms  ratio to bare forward {t / bare:4.2f}")

    predictor = rfm.Predictor(clip, vocabulary="voc", decoder=decoder, device=device)
    predictor.set_image(image, labels=["cat", "dog"])
    variants = [rfm.RefineParams(alpha=a, n0=n) for a in (1, 2, 3) for n in (5, 7, 9)]
    box = rfm.RefineParams(boxes={"cat": [(50, 40, 300, 280)]})
    for par_iterations in (20, 0):
        state = {"i": 0}

        def call(materialise: bool):
            p = variants[state["i"] % len(variants)]
            state["i"] += 1
            p = rfm.RefineParams(alpha=p.alpha, n0=p.n0, par_iterations=par_iterations, boxes=box.boxes)
            result = predictor.refine(p)
            if materialise:
                _ = (result.cam_initial, result.cam_static, result.cam_rfm, result.label)

        name = "with PAR (20 it.)" if par_iterations else "without PAR      "
        t_call = timed(lambda: call(False), args.repeats * 2)
        t_all = timed(lambda: call(True), args.repeats * 2)
        print(f"refine {name}: {t_call * 1000:7.1f} ms call, {t_all * 1000:7.1f} ms with all image-size maps")


if __name__ == "__main__":
    main()
