"""Pipeline timings against DESIGN.md's budgets: ViT-B/16 with random weights on voc-mini photos.

For each photo (500×333 and 500×375) it prints, as ratios to a bare open_clip image forward at the
same input size (open_clip's own VisionTransformer loaded with the same weights, fused attention,
no maps kept), measured interleaved with the calls it is compared to so that machine noise hits
both alike:
- ``set_image`` for K = 1..5 classes, with the WeCLIP decoder (budget ≤ 1.2×);
- ``refine`` after a parameter change with PAR (20 iterations, budget ≤ 0.1×) and without (≤ 0.02×);
and, in a fresh process per size, the peak RSS of ``set_image`` + ``refine`` on a 1500×1000 and a
6000×4000 upload (bounded by ``max_side``: the two should differ by about the upload itself).

    .venv/bin/python benchmarks/bench_pipeline.py [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rfm  # noqa: E402
from rfm.backbone import (FrozenClip, build_clip, network_size, random_clip_state_dict, resize_image,  # noqa: E402
                          resize_positional_embedding, to_tensor)
from rfm.constants import CLIP_MEAN, CLIP_STD  # noqa: E402
from rfm.decoder import Decoder  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-mini" / "JPEGImages"
SIZES = {"500×333": (333, 500), "500×375": (375, 500)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median time of each function, calling them in turn `repeats` times after one warm-up round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(clock(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bare_open_clip_forward(state_dict: dict, image: np.ndarray, device: torch.device):
    """open_clip's VisionTransformer.forward with our weights at the network size of ``image``."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    width = state_dict["visual.conv1.weight"].shape[0]
    model = CLIP(state_dict["text_projection"].shape[1],
                 vision_cfg=CLIPVisionCfg(layers=12, width=width, patch_size=16, image_size=224),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
                 quick_gelu=True)
    model.load_state_dict(state_dict, strict=False)
    visual = model.visual.to(device).eval()
    size = network_size(image.shape[:2], 512, 16)
    grid = (size[0] // 16, size[1] // 16)
    visual.positional_embedding = torch.nn.Parameter(
        resize_positional_embedding(visual.positional_embedding.detach(), grid), requires_grad=False)
    x = to_tensor(resize_image(image, size), CLIP_MEAN, CLIP_STD, device)

    def run():
        with torch.no_grad():
            visual(x)

    return run


def photo(size: tuple[int, int]) -> np.ndarray:
    """The voc-mini photo of that size, else voc-mini's 500×333 photo resized to it (voc-mini has one such photo)."""
    images = [rfm.data.load_image(p) for p in sorted(PHOTOS.glob("*.jpg"))] if PHOTOS.is_dir() else []
    for image in images:
        if image.shape[:2] == size:
            return image
    if images:
        print(f"(voc-mini has no {size[1]}×{size[0]} photo: its {images[0].shape[1]}×{images[0].shape[0]} one is resized)")
        return resize_image(images[0], size)
    print(f"(voc-mini not found: a random {size[1]}×{size[0]} image stands in)")
    return np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)


def _rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (VmHWM, unlike ru_maxrss, does not carry over from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(height: int, width: int, device: str) -> None:
    """Child process: peak RSS (MiB) before and after set_image + refine on an upload of height×width."""
    from rfm.demo import demo_models

    clip, decoder = demo_models(device=device)
    predictor = rfm.Predictor(clip, decoder=decoder, device=device)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_mib("VmHWM")
    predictor.set_image(image, labels=["cat", "dog"])
    result = predictor.refine(rfm.RefineParams())
    _ = result.label
    after = _rss_mib("VmHWM")
    print(json.dumps({"before": before, "after": after, "upload": image.nbytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args.device)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, ViT-B/16 random weights, max_side 512")

    state = random_clip_state_dict(seed=0)  # ViT-B/16 shapes
    clip = FrozenClip(build_clip(state).to(device), name="random")
    torch.manual_seed(0)
    decoder = Decoder().eval()  # WeCLIP VOC decoder shapes, random weights
    predictor = rfm.Predictor(clip, vocabulary="voc", decoder=decoder, device=device)
    worst = {"set_image": 0.0, "refine PAR": 0.0, "refine no PAR": 0.0}
    for label, size in SIZES.items():
        image = photo(size)
        grid = tuple(s // 16 for s in network_size(size, 512, 16))
        print(f"\nphoto {label} → tokens {grid[1]}×{grid[0]}")
        bare = bare_open_clip_forward(state, image, device)
        calls = {"bare": bare}
        for k in range(1, 6):
            calls[f"K={k}"] = lambda k=k: predictor.set_image(image, labels=list(range(k)))
        t = interleaved(calls, args.repeats, device)
        print(f"  bare open_clip image forward      {t['bare'] * 1000:7.1f} ms")
        for k in range(1, 6):
            ratio = t[f"K={k}"] / t["bare"]
            worst["set_image"] = max(worst["set_image"], ratio)
            print(f"  set_image K={k} (with decoder)      {t[f'K={k}'] * 1000:7.1f} ms   {ratio:5.2f}× (budget 1.20×)")

        predictor.set_image(image, labels=["cat", "dog"])
        # every call changes α and N0, as a slider does; the box keeps the user-box path in the timing
        changes = {par: itertools.cycle([rfm.RefineParams(alpha=a, n0=n, par_iterations=par,
                                                          boxes={"cat": [(50, 40, 300, 280)]})
                                         for a in (1, 2, 3) for n in (5, 7, 9)]) for par in (20, 0)}

        def refine(par: int):
            result = predictor.refine(next(changes[par]))
            _ = (result.cam_initial, result.cam_static, result.cam_rfm, result.label)

        t = interleaved({"bare": bare, "par": lambda: refine(20), "nopar": lambda: refine(0)}, 2 * args.repeats, device)
        for key, name, budget in (("par", "refine PAR", 0.1), ("nopar", "refine no PAR", 0.02)):
            ratio = t[key] / t["bare"]
            worst[name] = max(worst[name], ratio)
            print(f"  {name + (' (20 it.)' if key == 'par' else ''):<22} + image-size maps {t[key] * 1000:7.1f} ms   "
                  f"{ratio:5.3f}× (budget {budget}×)")

    print("\npeak RSS, one process per upload (demo models, max_side 512):")
    for h, w in ((1000, 1500), (4000, 6000)):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", str(h), str(w), "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"  {w}×{h}: upload {m['upload']:6.1f} MiB; RSS {m['before']:7.1f} MiB with models and upload → peak "
              f"{m['after']:7.1f} MiB in set_image + refine + label (+{m['after'] - m['before']:.1f} MiB)")
    print("\nworst ratios: " + ", ".join(f"{k} {v:.3f}×" for k, v in worst.items()))


if __name__ == "__main__":
    main()
