"""Time `rfm.par.par_refine` on a VOC-sized image (500×375), 20 iterations, default dilations.

Prints the median wall time per call for C = 2, 3, 6 channels. Budget (DESIGN.md): PAR is part
of the 0.5 s `refine()` budget on the 2-core build machine; the target for C = 3 is ≈ 0.35 s.

    python -m benchmarks.bench_par [--device cuda] [--threads 2] [--repeats 7]   (from the repo root)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rfm.par import par_refine


def time_call(image: np.ndarray, probs: torch.Tensor, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    par_refine(image, probs)
    times = []
    for _ in range(repeats):
        if probs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        par_refine(image, probs)
        if probs.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (build machine: 2)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    height, width = 375, 500
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    print(f"par_refine 500×375, 20 iterations, dilations (1, 2, 4, 8, 12, 24), "
          f"device={args.device}, threads={torch.get_num_threads()}, median of {args.repeats}")
    for channels in (2, 3, 6):
        probs = torch.softmax(torch.randn(channels, height, width), dim=0).to(args.device)
        seconds = time_call(image, probs, args.repeats)
        print(f"  C={channels}: {seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
