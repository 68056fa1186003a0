"""End-to-end quality on held-out generated scenes: the paper's comparison, measured.

    .venv/bin/python benchmarks/bench_quality.py                    # built-in CLIP + decoder, 300 scenes of seed 2
    .venv/bin/python benchmarks/bench_quality.py --clip random      # the same architecture with random weights
    .venv/bin/python benchmarks/bench_quality.py --num 40 --no-ablations --json out/quality.json

Scenes come from ``rfm.synthetic`` with seed 2, which neither the CLIP (seed 1) nor the decoder
(seed 3) saw. Image-level labels are the scenes' annotations (the WSSS setting). Printed:

- mIoU (%) of the initial CAM, the static refinement, RFM (abs and signed distances) and the PAR
  pseudo label (PAR on RFM, and on the static CAM for comparison). A CAM becomes a label as
  CLIP-ES evaluates it: argmax over [(1 − max CAM)^p; CAMs], the best p over the split, searched in
  1..10 for the initial CAM and in {1, 2} for the refined (attention) CAMs (REFERENCE §2.5);
- the CLIP's zero-shot multi-label accuracy: an image counts when its k present classes are
  exactly the k classes whose "a clean origami {class}." prompt is nearest to the CLIP-ES pooled
  feature; also how often the nearest class is present;
- the paper's ablations: N0 = 1..12 with α = 2, and α = 1..4 with the default N0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rfm  # noqa: E402
from rfm.backbone import pooled_image_features  # noqa: E402
from rfm.data import load_image, voc_samples  # noqa: E402
from rfm.metrics import confusion_matrix, iou_per_class, labels_from_cams, mean_iou  # noqa: E402
from rfm.params import official_params  # noqa: E402
from rfm.pipeline import par_probs  # noqa: E402
from rfm.synthetic import write_dataset  # noqa: E402
from rfm.text import get_vocabulary, text_features  # noqa: E402

INITIAL_POWERS = tuple(range(1, 11))
AUC_PAIRS = 20000  # patch pairs sampled per image for the affinity AUCs
REFINED_POWERS = (1, 2)


class Scores:
    """Confusion matrices per (row name, background power) accumulated over the split."""

    def __init__(self, num_classes: int):
        self.num = num_classes
        self.conf: dict[tuple[str, float], np.ndarray] = {}

    def add_cams(self, name: str, cams: np.ndarray, keys: np.ndarray, gt: np.ndarray, powers) -> None:
        for p in powers:
            self.add_label((name, p), labels_from_cams(cams, keys, p), gt)

    def add_label(self, key, label: np.ndarray, gt: np.ndarray) -> None:
        key = key if isinstance(key, tuple) else (key, 0)
        conf = self.conf.setdefault(key, np.zeros((self.num, self.num + 1), np.int64))
        conf += confusion_matrix(label, gt, self.num)

    def best(self, name: str) -> tuple[float, float, np.ndarray]:
        """(mIoU %, best p, per-class IoU) of a row."""
        options = [(mean_iou(c), p, c) for (n, p), c in self.conf.items() if n == name]
        miou, p, conf = max(options, key=lambda t: t[0])
        return 100 * miou, p, iou_per_class(conf)


@torch.no_grad()
def pooled_feature(clip, features) -> torch.Tensor:
    """The CLIP-ES pooled image feature (mean of the patch tokens after ln_post and proj), L2-normalised,
    from the cached input of the last block: it does not depend on the classes."""
    x = clip.model.visual.transformer.resblocks[-1](features.last_input[None])
    return torch.nn.functional.normalize(pooled_image_features(clip, x).float(), dim=-1)[0]


def patch_labels(gt: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h·w,) ground-truth class at each patch centre (255 on the outline band)."""
    h, w = grid
    rows = ((np.arange(h) + 0.5) * gt.shape[0] / h).astype(int)
    cols = ((np.arange(w) + 0.5) * gt.shape[1] / w).astype(int)
    return gt[rows][:, cols].reshape(-1)


def pair_auc(aff: np.ndarray, same: np.ndarray) -> float:
    """Mann–Whitney AUC: how well affinity values rank same-class pairs above different-class pairs."""
    ranks = np.empty(len(aff))
    ranks[np.argsort(aff, kind="stable")] = np.arange(1, len(aff) + 1)
    pos = same.sum()
    neg = len(same) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[same].sum() - pos * (pos + 1) / 2) / (pos * neg))


def affinity_aucs(predictor, result, gt: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """AUC of A_f, of each block's attention A^l (symmetrised), of the static mean and of R, on sampled pairs.

    Reads the predictor's cached stage 1–3 features."""
    from rfm import refine as rf

    features = predictor.features
    labels = patch_labels(gt, features.grid)
    valid = np.flatnonzero(labels != 255)
    i, j = rng.choice(valid, AUC_PAIRS), rng.choice(valid, AUC_PAIRS)
    keep = i != j
    i, j = i[keep], j[keep]
    same = labels[i] == labels[j]
    attn = features.attn.float()
    maps = {f"A^{l + 1}": attn[l] for l in range(attn.shape[0])}
    maps["static mean"] = rf.static_affinity(attn, 8)
    if features.aff_f is not None:
        maps["A_f"] = features.aff_f
        r, _ = rf.rfm_affinity(features.aff_f, attn, torch.as_tensor(result.layer_keep), result.params.n0)
        maps["R (RFM)"] = r
    out = {}
    for name, m in maps.items():
        sym = (m + m.T).cpu().numpy()
        out[name] = pair_auc(sym[i, j], same)
    return out


def load_models(args):
    if args.clip == "random":
        return rfm.demo.random_builtin_like(device=args.device)
    clip = rfm.load_clip(pretrained=args.clip, device=args.device)
    decoder = rfm.load_decoder(args.decoder) if args.decoder != "none" else None
    return clip, decoder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=300, help="held-out scenes (default 300)")
    p.add_argument("--seed", type=int, default=2, help="scene seed (default 2: held out from training)")
    p.add_argument("--data", type=Path, default=Path("runs/bench-quality"), help="where the scenes are written")
    p.add_argument("--clip", default="synthetic", help="synthetic (default), random, or a CLIP path")
    p.add_argument("--decoder", default="synthetic", help="synthetic (default), none, or a decoder path")
    p.add_argument("--device", default=None)
    p.add_argument("--max-side", type=int, default=512, help="the predictor's max_side (default 512, as the app)")
    p.add_argument("--no-ablations", action="store_true", help="skip the N0 and α tables")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)

    split = f"quality-{args.seed}-{args.num}"
    write_dataset(args.data, args.num, seed=args.seed, split=split)
    vocab = get_vocabulary("synthetic")
    samples = voc_samples(args.data, args.data / "ImageSets" / "Segmentation" / f"{split}.txt", "xml", vocab)
    clip, decoder = load_models(args)
    if args.clip == "random":
        args.decoder = "random"
    predictor = rfm.Predictor(clip, vocabulary=vocab, decoder=decoder, device=args.device, max_side=args.max_side)
    params = official_params("synthetic")
    prompts = text_features(clip, vocab.prompt_names, vocab.template)  # (C, E)
    scores = Scores(len(vocab) + 1)
    zero_shot = {"exact": 0, "top1": 0}
    kept = np.zeros(clip.num_blocks)
    aucs: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    t0 = time.time()
    from tqdm import tqdm

    for sample in tqdm(samples, desc="scenes", unit="img"):
        image = load_image(sample.image)
        gt = np.asarray(Image.open(sample.gt))
        labels = list(sample.labels)
        predictor.set_image(image, labels=labels)
        sims = prompts @ pooled_feature(clip, predictor.features).to(prompts.device)
        top = set(sims.topk(len(labels)).indices.tolist())
        zero_shot["exact"] += top == set(labels)
        zero_shot["top1"] += int(sims.argmax()) in labels
        result = predictor.refine(params)
        keys = np.asarray(result.class_indices)
        scores.add_cams("initial", result.cam_initial, keys, gt, INITIAL_POWERS)
        scores.add_cams("static", result.cam_static, keys, gt, REFINED_POWERS)
        scores.add_label("label", result.label, gt)
        if result.cam_rfm is None:
            continue
        kept += np.asarray(result.layer_keep, float)
        for name, value in affinity_aucs(predictor, result, gt, rng).items():
            aucs.setdefault(name, []).append(value)
        scores.add_cams("rfm", result.cam_rfm, keys, gt, REFINED_POWERS)
        # PAR on the static CAM: does RFM still help after PAR?
        probs = par_probs(predictor.features, torch.from_numpy(result.patch.cam_static), params)
        static_label = np.concatenate([[0], keys + 1])[probs.argmax(0).cpu().numpy()].astype(np.uint8)
        scores.add_label("label_static", resize_nearest(static_label, gt.shape), gt)
        signed = predictor.refine(official_params("synthetic", distance="signed", par_iterations=0))
        scores.add_cams("rfm_signed", signed.cam_rfm, keys, gt, REFINED_POWERS)
        if args.no_ablations:
            continue
        for n0 in range(1, clip.num_blocks + 1):
            r = predictor.refine(official_params("synthetic", n0=n0, alpha=2, par_iterations=0))
            scores.add_cams(f"n0={n0}", r.cam_rfm, keys, gt, REFINED_POWERS)
        for alpha in range(1, 5):
            r = predictor.refine(official_params("synthetic", alpha=alpha, par_iterations=0))
            scores.add_cams(f"alpha={alpha}:static", r.cam_static, keys, gt, REFINED_POWERS)
            scores.add_cams(f"alpha={alpha}:rfm", r.cam_rfm, keys, gt, REFINED_POWERS)
    seconds = time.time() - t0

    n = len(samples)
    rows = [("initial CAM (CLIP-ES)", "initial"), ("static refinement (CLIP-ES)", "static"),
            ("RFM, abs (paper)", "rfm"), ("RFM, signed (official code)", "rfm_signed"),
            ("PAR pseudo label (on RFM)", "label"), ("PAR pseudo label (on static)", "label_static")]
    out = {"scenes": n, "seed": args.seed, "max_side": args.max_side, "clip": args.clip, "decoder": args.decoder, "seconds": round(seconds, 1),
           "zero_shot_exact": zero_shot["exact"] / n, "zero_shot_top1": zero_shot["top1"] / n,
           "kept_fraction_per_block": (kept / n).round(3).tolist(), "main": {}, "n0": {}, "alpha": {}}
    print(f"\n{n} held-out scenes (seed {args.seed}), CLIP {args.clip}, decoder {args.decoder}, "
          f"max_side {args.max_side}, {seconds:.0f} s\n")
    print(f"| stage | mIoU % | best p |\n|---|---|---|")
    for title, name in rows:
        if not any(k[0] == name for k in scores.conf):
            continue
        miou, p, _ = scores.best(name)
        out["main"][name] = {"miou": round(miou, 2), "bg_power": p}
        print(f"| {title} | {miou:.1f} | {p if p else '—'} |")
    print(f"\nzero-shot multi-label accuracy (top-k set = present set): {100 * out['zero_shot_exact']:.1f} %; "
          f"nearest class present: {100 * out['zero_shot_top1']:.1f} %")
    if decoder is not None:
        print("RFM keeps block l (fraction of scenes): " +
              ", ".join(f"{i + 1}: {f:.2f}" for i, f in enumerate(out["kept_fraction_per_block"])))
    if aucs:
        out["affinity_auc"] = {k: round(float(np.nanmean(v)), 4) for k, v in aucs.items()}
        print("\naffinity AUC (same-class patch pairs ranked above different-class pairs; 0.5 = chance):\n" +
              ", ".join(f"{k} {v:.3f}" for k, v in out["affinity_auc"].items()))
    if decoder is not None and not args.no_ablations:
        print("\nN0 ablation (α = 2), RFM mIoU %:\n| N0 | " + " | ".join(str(i) for i in range(1, 13)) +
              " |\n|---|" + "---|" * 12)
        values = [scores.best(f"n0={i}")[0] for i in range(1, clip.num_blocks + 1)]
        out["n0"] = {str(i + 1): round(v, 2) for i, v in enumerate(values)}
        print("| mIoU | " + " | ".join(f"{v:.1f}" for v in values) + " |")
        print(f"\nα ablation (N0 = {params.n0}), mIoU %:\n| α | 1 | 2 | 3 | 4 |\n|---|---|---|---|---|")
        for stage in ("static", "rfm"):
            values = [scores.best(f"alpha={a}:{stage}")[0] for a in range(1, 5)]
            out["alpha"][stage] = {str(a + 1): round(v, 2) for a, v in enumerate(values)}
            print(f"| {stage} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    names = ["background", *vocab.class_names]
    iou = scores.best("label")[2]
    print("\nper-class IoU % of the PAR pseudo label: " +
          ", ".join(f"{c} {100 * v:.0f}" for c, v in zip(names, iou) if np.isfinite(v)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def resize_nearest(label: np.ndarray, shape) -> np.ndarray:
    if label.shape == tuple(shape):
        return label
    return cv2.resize(label, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


if __name__ == "__main__":
    main()
