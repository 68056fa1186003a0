"""`rfm export` throughput on voc-mini with a ViT-B/16-sized random CLIP and a random WeCLIP decoder.

Prints images/s for 1 process and for 2 Gloo ranks under torchrun, and the time per image of the
pipeline (set_image + refine) against a naive loop that reruns the whole CLIP with one GradCAM
backward per class (no caching of blocks 1..N−1, no batching over classes).

    .venv/bin/python benchmarks/bench_export.py
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rfm  # noqa: E402
from rfm.backbone import (attention_block, build_clip, FrozenClip, forward_blocks, network_size,  # noqa: E402
                          random_clip_state_dict, resize_image, to_tensor)
from rfm.data import load_image, voc_samples  # noqa: E402
from rfm.decoder import Decoder  # noqa: E402
from rfm.text import vocabulary_features  # noqa: E402

VOC_MINI = ROOT.parent / "shared" / "data" / "voc-mini"


def export(weights: Path, out: Path, ranks: int) -> dict:
    cmd = ["-m", "rfm", "export", "--voc", str(VOC_MINI), "--labels-from", "mask", "--format", "png,npy",
           "--out", str(out), "--clip", str(weights / "clip.pt"), "--decoder", str(weights / "decoder.safetensors")]
    if ranks == 1:
        cmd = [sys.executable, *cmd]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(ranks), *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, **summary}


def naive_initial_cams(clip: FrozenClip, image, labels: list[int]) -> torch.Tensor:
    """CLIP-ES's procedure without its cache: the whole image tower again for every class."""
    size = network_size(image.shape[:2], 512, clip.patch_size)
    x = to_tensor(resize_image(image, size), clip.mean, clip.std, clip.device)
    fg, bg = vocabulary_features(clip, rfm.text.VOC)
    text = torch.cat([fg[labels], bg])
    visual = clip.model.visual
    block = visual.transformer.resblocks[-1]
    cams = []
    for c in range(len(labels)):
        blocks = forward_blocks(clip, x)
        tokens = blocks.tokens[-1]
        with torch.enable_grad():
            z = block.ln_1(tokens).detach().requires_grad_(True)
            y, _ = attention_block(block, tokens, normed=z)
            feat = visual.ln_post(y)[:, 1:].mean(1) @ visual.proj
            probs = (clip.model.logit_scale.exp() * F.normalize(feat, dim=-1) @ text.T).softmax(-1)
            (grad,) = torch.autograd.grad(probs[0, c], z)
        cams.append(torch.relu(z[0, 1:].detach() @ grad[0, 1:].mean(0)))
    return torch.stack(cams)


def main() -> None:
    if not VOC_MINI.is_dir():
        sys.exit(f"voc-mini not found at {VOC_MINI}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        torch.save(random_clip_state_dict(seed=0), weights / "clip.pt")  # ViT-B/16 shapes
        torch.manual_seed(0)
        Decoder().save(weights / "decoder.safetensors")
        samples = voc_samples(VOC_MINI, labels_from="mask")
        n_labels = [len(s.labels) for s in samples]
        print(f"voc-mini: {len(samples)} images, {sum(n_labels)} image-level labels "
              f"({min(n_labels)}–{max(n_labels)} per image); ViT-B/16 random weights, CPU")
        for ranks in (1, 2):
            r = export(weights, weights / f"out{ranks}", ranks)
            print(f"rfm export, {ranks} process{'es' if ranks > 1 else ''}{' (Gloo)' if ranks > 1 else ''}: {r['images_per_second']:.2f} images/s "
                  f"in the loop, {r['images'] / r['wall']:.2f} images/s wall incl. start-up ({r['wall']:.1f} s)")

        clip = FrozenClip(build_clip(torch.load(weights / "clip.pt", weights_only=True)))
        decoder = rfm.load_decoder(weights / "decoder.safetensors")
        predictor = rfm.Predictor(clip, decoder=decoder, device="cpu")
        images = [load_image(s.image) for s in samples]
        ours, naive = [], []
        for image, sample in zip(images, samples):
            t0 = time.perf_counter()
            predictor.set_image(image, labels=list(sample.labels))
            predictor.refine()
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            naive_initial_cams(clip, image, list(sample.labels))
            predictor.refine()
            naive.append(time.perf_counter() - t0)
        print(f"per image: pipeline {statistics.mean(ours) * 1000:.0f} ms, naive per-class loop "
              f"{statistics.mean(naive) * 1000:.0f} ms ({statistics.mean(naive) / statistics.mean(ours):.2f}× slower)")
        # voc-mini has ~1 label per image, where batching over classes saves nothing; show K = 5 too
        labels = list(range(5))
        t0 = time.perf_counter()
        predictor.set_image(images[0], labels=labels)
        ours_k5 = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive_initial_cams(clip, images[0], labels)
        naive_k5 = time.perf_counter() - t0
        print(f"initial CAMs of 5 classes on {images[0].shape[1]}×{images[0].shape[0]}: set_image {ours_k5 * 1000:.0f} ms, "
              f"naive per-class loop {naive_k5 * 1000:.0f} ms ({naive_k5 / ours_k5:.2f}× slower)")


if __name__ == "__main__":
    main()
