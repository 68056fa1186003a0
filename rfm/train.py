"""Training the WeCLIP decoder on a frozen CLIP (REFERENCE §4), so RFM works without a released checkpoint.

Each step, per image: initial CAM → static refinement (before ``switch_step``) or RFM with the
current decoder's A_f (after) → PAR → pseudo label; loss = balanced CE on the decoder logits +
0.1 × affinity loss on A_f (``rfm.losses``); AdamW with warm-up and poly decay.

Two modes:
- exact: the backbone runs on every augmented crop (random rescale 0.5–2, flip, 320 crop), as the
  official code does. The right choice on a GPU.
- cached (``cache_features=True``): the backbone runs once per image at a fixed scale; its tokens,
  attention maps and initial CAMs are stored as float16 ``.npy`` files (memory-mapped) and flips
  and crops are applied in token space. Much cheaper on a CPU, at the price of no rescaling and of
  crops that keep the full image's context (a token of a crop has attended to the whole image).

Every random draw of step t comes from a generator seeded by (seed, t), so a resumed run
repeats the uninterrupted trajectory exactly.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import refine as rf
from .backbone import FrozenClip, forward_blocks, network_size, resize_image, to_tensor
from .cam import initial_cam
from .data import Sample, load_image
from .decoder import Decoder, feature_affinity, load_decoder
from .export import atomic_write, save_json
from .losses import make_optimizer, poly_warmup_lr, weclip_loss
from .par import pseudo_label
from .predictor import RefineParams, par_probs, refine_stages
from .text import Vocabulary, vocabulary_features

IGNORE = 255
LOG_FIELDS = ("step", "loss", "seg", "aff", "lr", "kept_fraction", "rfm", "seconds")


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 4
    crop: int = 320
    lr: float = 2e-3  # decoder: base 2e-4 × 10 (REFERENCE §4.3)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    switch_step: int | None = None  # RFM replaces the static refinement after this step; None = steps // 2
    scale_range: tuple[float, float] = (0.5, 2.0)
    save_every: int = 2000
    eval_every: int = 0
    seed: int = 0
    cache_features: bool = False
    cache_side: int = 512  # long side of the cached scale (the inference scale)
    embed_dim: int = 256
    decoder_layers: int = 3
    aff_radius: int = 8

    def __post_init__(self):
        for name in ("steps", "batch_size", "crop", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.switch_step is None:
            self.switch_step = self.steps // 2
        self.scale_range = tuple(self.scale_range)


@dataclass
class Crop:
    """One training view: the decoder's input and what its pseudo label is made from."""

    tokens: torch.Tensor  # (N − 1, 1, n, D) patch tokens of blocks 1..N−1
    attn: torch.Tensor  # (N, n, n)
    cams: torch.Tensor  # (K, h, w) initial CAMs
    image: np.ndarray  # (H, W, 3) uint8 pixels of the view
    valid: np.ndarray  # (H, W) bool: False on padding
    grid: tuple[int, int]
    labels: tuple[int, ...]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step: a pure function of (seed, step), hence resumable."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(seed: int, step: int, batch_size: int, num_samples: int) -> list[int]:
    """Epoch-wise shuffled sample indices of a step, derived from (seed, epoch) alone."""
    out = []
    for slot in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(slot, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform in 0..high (inclusive)."""
    return int(torch.randint(0, high + 1, (), generator=gen))


# ---------------------------------------------------------------- views


def augment(image: np.ndarray, crop: int, scale_range, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale, horizontal flip, random crop with zero padding (REFERENCE §4.3) → (crop, valid)."""
    h, w = image.shape[:2]
    scale = _uniform(gen, *scale_range)
    image = resize_image(image, (max(1, round(h * scale)), max(1, round(w * scale))))
    if float(torch.rand((), generator=gen)) < 0.5:
        image = image[:, ::-1]
    h, w = image.shape[:2]
    canvas = np.zeros((max(h, crop), max(w, crop), 3), np.uint8)
    valid = np.zeros(canvas.shape[:2], bool)
    canvas[:h, :w], valid[:h, :w] = image, True
    y, x = _randint(gen, canvas.shape[0] - crop), _randint(gen, canvas.shape[1] - crop)
    return np.ascontiguousarray(canvas[y:y + crop, x:x + crop]), valid[y:y + crop, x:x + crop]


def exact_view(clip: FrozenClip, sample: Sample, fg: torch.Tensor, bg: torch.Tensor, config: TrainConfig,
               gen: torch.Generator) -> Crop:
    """Backbone and initial CAM on an augmented crop."""
    pixels, valid = augment(load_image(sample.image), config.crop, config.scale_range, gen)
    x = to_tensor(pixels, clip.mean, clip.std, clip.device)
    blocks = forward_blocks(clip, x)
    cam = initial_cam(clip, blocks.tokens[-1][0], blocks.grid, fg[list(sample.labels)], bg)
    return Crop(tokens=torch.stack([t[:, 1:] for t in blocks.tokens]),
                attn=torch.cat([blocks.attn, cam.attn_last[None]]), cams=cam.cams, image=pixels, valid=valid,
                grid=blocks.grid, labels=sample.labels)


class FeatureCache:
    """Backbone outputs per image at one scale, as float16 .npy files read memory-mapped."""

    def __init__(self, folder: Path, clip: FrozenClip, vocab: Vocabulary, side: int, clip_id: str):
        self.folder, self.clip, self.side = folder, clip, side
        self.fg, self.bg = vocabulary_features(clip, vocab)
        self.meta = {"clip": clip_id, "side": side, "prompts": list(vocab.prompt_names),
                     "background": list(vocab.background), "template": vocab.template}

    def _paths(self, stem: str) -> dict[str, Path]:
        return {k: self.folder / f"{stem}.{k}.npy" for k in ("tokens", "attn", "cams", "image")}

    def build(self, samples: list[Sample], progress: bool = True) -> None:
        """Compute what is missing or was made with other settings (meta.json records them)."""
        from tqdm import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        known = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if {k: v for k, v in known.items() if k != "labels"} != self.meta:
            known = {**self.meta, "labels": {}}
        todo = [s for s in samples
                if known["labels"].get(s.stem) != list(s.labels) or not all(p.is_file() for p in self._paths(s.stem).values())]
        for sample in tqdm(todo, desc="caching features", unit="img", disable=not progress or not todo):
            image = load_image(sample.image)
            size = network_size(image.shape[:2], self.side, self.clip.patch_size)
            pixels = resize_image(image, size)
            with torch.no_grad():
                blocks = forward_blocks(self.clip, to_tensor(pixels, self.clip.mean, self.clip.std, self.clip.device))
                cam = initial_cam(self.clip, blocks.tokens[-1][0], blocks.grid, self.fg[list(sample.labels)], self.bg)
            arrays = {"tokens": torch.stack([t[0, 1:] for t in blocks.tokens]).half().cpu().numpy(),
                      "attn": torch.cat([blocks.attn, cam.attn_last[None]]).half().cpu().numpy(),
                      "cams": cam.cams.float().cpu().numpy(), "image": pixels}
            for key, path in self._paths(sample.stem).items():
                atomic_write(path, lambda f, a=arrays[key]: np.save(f, a), overwrite=True)
            known["labels"][sample.stem] = list(sample.labels)
            save_json(known, meta_path, overwrite=True, indent=None)

    def view(self, sample: Sample, config: TrainConfig, gen: torch.Generator) -> Crop:
        """A random crop window and flip of the cached image, applied to tokens, attention, CAMs and pixels."""
        arrays = {k: np.load(p, mmap_mode="r") for k, p in self._paths(sample.stem).items()}
        p = self.clip.patch_size
        _, h, w = arrays["cams"].shape
        ch, cw = min(h, config.crop // p), min(w, config.crop // p)
        r0, c0 = _randint(gen, h - ch), _randint(gen, w - cw)
        flip = float(torch.rand((), generator=gen)) < 0.5
        cols = np.arange(c0, c0 + cw)[::-1] if flip else np.arange(c0, c0 + cw)
        idx = (np.arange(r0, r0 + ch)[:, None] * w + cols[None, :]).ravel()  # (n',) row-major in the view
        device = self.clip.device
        tokens = torch.from_numpy(np.ascontiguousarray(arrays["tokens"][:, idx])).float().to(device)
        attn = torch.from_numpy(np.ascontiguousarray(arrays["attn"][:, idx][:, :, idx])).float().to(device)
        cams = torch.from_numpy(np.ascontiguousarray(arrays["cams"][:, r0:r0 + ch][:, :, cols])).to(device)
        pixels = arrays["image"][r0 * p:(r0 + ch) * p]
        pixel_cols = (cols[:, None] * p + (np.arange(p)[::-1] if flip else np.arange(p))).ravel()
        pixels = np.ascontiguousarray(pixels[:, pixel_cols])
        return Crop(tokens=tokens[:, None], attn=attn, cams=cams, image=pixels,
                    valid=np.ones(pixels.shape[:2], bool), grid=(ch, cw), labels=sample.labels)


# ---------------------------------------------------------------- one step


def pseudo_label_of(crop: Crop, aff_f: torch.Tensor | None, params: RefineParams, use_rfm: bool
                    ) -> tuple[torch.Tensor, float]:
    """The view's pseudo label (H, W) long (0 bg, index + 1, 255 on padding) and RFM's kept fraction."""
    box_mask = rf.box_masks(crop.cams, params.box_threshold)
    stages = refine_stages(crop.cams, crop.attn, aff_f, params, box_mask)
    cams = stages.rfm if use_rfm and stages.rfm is not None else stages.static
    label = pseudo_label(par_probs(crop.image, cams, params), list(crop.labels))
    label[torch.from_numpy(~crop.valid).to(label.device)] = IGNORE
    candidates = stages.keep[params.n0 - 1:]
    return label, float(candidates.float().mean()) if aff_f is not None else float("nan")


def train_step(decoder: Decoder, crops: list[Crop], params: RefineParams, use_rfm: bool,
               aff_radius: int) -> tuple[torch.Tensor, dict]:
    """Decoder forward on each view, pseudo labels from its detached A_f, WeCLIP loss averaged over views."""
    total, logs, kept = 0.0, {"seg": 0.0, "aff": 0.0}, []
    for crop in crops:
        logits, f_u = decoder(crop.tokens, crop.grid)
        aff = feature_affinity(f_u)  # (1, n, n)
        with torch.no_grad():
            label, fraction = pseudo_label_of(crop, aff[0].detach().float(), params, use_rfm)
        loss, parts = weclip_loss(logits, aff, label[None].to(logits.device), crop.grid, radius=aff_radius)
        total = total + loss / len(crops)
        for k in logs:
            logs[k] += parts[k] / len(crops)
        kept.append(fraction)
    logs["kept_fraction"] = float(np.nanmean(kept)) if not all(math.isnan(k) for k in kept) else float("nan")
    return total, logs


# ---------------------------------------------------------------- the run


def _state_bytes(step: int, optimizer, config: TrainConfig, params: RefineParams) -> bytes:
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": json.dumps(asdict(config)),
                "params": json.dumps(asdict(params))}, buf)
    return buf.getvalue()


def _comparable(config_json: str) -> dict:
    """Config fields that must match to resume (the step budget may grow; evaluation may change)."""
    cfg = json.loads(config_json)
    return {k: v for k, v in cfg.items() if k not in ("steps", "save_every", "eval_every", "switch_step")}


def train(samples: list[Sample], clip: FrozenClip, vocab: Vocabulary, params: RefineParams, config: TrainConfig,
          out: str | os.PathLike, decoder: Decoder | None = None, resume: bool = False,
          val_samples: list[Sample] | None = None, clip_id: str = "", progress: bool = True) -> Decoder:
    """Train (or continue training) a decoder; writes out/decoder.safetensors + .json, state.pt, log.csv, losses.png."""
    from tqdm import tqdm

    samples = [s for s in samples if s.labels]
    if not samples:
        raise ValueError("no training image has image-level labels")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = clip.device
    start = 0
    if resume:
        if not (out / "state.pt").is_file():
            raise FileNotFoundError(f"nothing to resume in {out} (no state.pt)")
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        if _comparable(state["config"]) != _comparable(json.dumps(asdict(config))) or \
                json.loads(state["params"]) != asdict(params):
            raise ValueError(f"{out} was trained with other settings; resume with the same flags (only --steps, "
                             f"--save-every and --eval-every may change)")
        decoder = load_decoder(out / "decoder.safetensors")
        start = int(state["step"])
    elif (out / "state.pt").exists():
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if decoder is None:
        torch.manual_seed(config.seed)
        decoder = Decoder(width=clip.width, num_blocks=clip.num_blocks - 1, embed_dim=config.embed_dim,
                          num_classes=len(vocab) + 1, layers=config.decoder_layers)
    if decoder.config["num_classes"] < len(vocab) + 1:
        raise ValueError(f"the decoder predicts {decoder.config['num_classes']} classes but the vocabulary needs "
                         f"{len(vocab) + 1} (background + {len(vocab)})")
    decoder = decoder.to(device).train()
    optimizer = make_optimizer(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if resume:
        optimizer.load_state_dict(state["optimizer"])

    fg, bg = vocabulary_features(clip, vocab)
    cache = None
    if config.cache_features:
        cache = FeatureCache(out / "feature_cache", clip, vocab, config.cache_side, clip_id)
        cache.build(samples, progress)
    log_rows = _read_log(out / "log.csv", before=start)
    bar = tqdm(total=config.steps, initial=start, unit="step", desc="train", disable=not progress)
    started = time.perf_counter()
    for step in range(start, config.steps):
        gen = step_generator(config.seed, step)
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))  # Dropout2d, reproducibly
        batch = [samples[i] for i in batch_indices(config.seed, step, config.batch_size, len(samples))]
        crops = [cache.view(s, config, gen) if cache else exact_view(clip, s, fg, bg, config, gen)
                 for s in batch]
        lr = poly_warmup_lr(step, config.lr, config.steps, warmup_steps=config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        use_rfm = step >= config.switch_step
        loss, logs = train_step(decoder, crops, params, use_rfm, config.aff_radius)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {"step": step + 1, "loss": float(loss.detach()), "seg": logs["seg"], "aff": logs["aff"], "lr": lr,
               "kept_fraction": logs["kept_fraction"], "rfm": int(use_rfm),
               "seconds": round(time.perf_counter() - started, 3)}
        if config.eval_every and val_samples and (step + 1) % config.eval_every == 0:
            row.update({f"miou_{k}": v for k, v in evaluate_pseudo_labels(clip, decoder, vocab, params,
                                                                            val_samples).items()})
        log_rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", rfm="on" if use_rfm else "off")
        bar.update()
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            _save(out, decoder, optimizer, step + 1, config, params, log_rows)
    bar.close()
    return decoder.eval()


def _save(out: Path, decoder: Decoder, optimizer, step: int, config: TrainConfig, params: RefineParams,
          rows: list[dict]) -> None:
    decoder.save(out / "decoder.safetensors", overwrite=True)
    atomic_write(out / "state.pt", lambda f: f.write(_state_bytes(step, optimizer, config, params)), overwrite=True)
    fields = list(LOG_FIELDS) + sorted({k for r in rows for k in r} - set(LOG_FIELDS))

    def write_csv(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())

    atomic_write(out / "log.csv", write_csv, overwrite=True)
    save_training_plot(rows, out / "losses.png")


def _read_log(path: Path, before: int) -> list[dict]:
    if not path.is_file() or before == 0:
        return []
    with path.open(newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [{**r, "step": int(r["step"]), "rfm": int(r["rfm"])} for r in rows if r["step"] <= before]


def save_training_plot(rows: list[dict], path: Path) -> None:
    """Losses, the fraction of candidate layers RFM kept, and validation mIoU over training (matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    steps = [r["step"] for r in rows]
    ax = fig.add_subplot(1, 3, 1)
    for key in ("loss", "seg", "aff"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_title("losses")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    ax.plot(steps, [r["kept_fraction"] for r in rows], color="tab:green")
    switch = next((r["step"] for r in rows if r["rfm"]), None)
    if switch is not None:
        ax.axvline(switch, color="0.5", linestyle="--", label="RFM on")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_title("fraction of layers RFM keeps")
    ax = fig.add_subplot(1, 3, 3)
    evals = [r for r in rows if any(k.startswith("miou_") for k in r)]
    for key in ("initial", "static", "rfm", "label"):
        if evals and f"miou_{key}" in evals[0]:
            ax.plot([r["step"] for r in evals], [r[f"miou_{key}"] for r in evals], marker="o", label=key)
    ax.set_title("validation mIoU of pseudo labels" if evals else "validation: off (--eval-every)")
    if evals:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), overwrite=True)


def evaluate_pseudo_labels(clip: FrozenClip, decoder: Decoder, vocab: Vocabulary, params: RefineParams,
                           samples: list[Sample]) -> dict[str, float]:
    """mIoU (%) against the ground truth of the initial, static and RFM CAMs (bg = (1 − max)^p) and of the PAR label."""
    from PIL import Image

    from .metrics import confusion_matrix, labels_from_cams, mean_iou
    from .predictor import Predictor

    was_training = decoder.training
    predictor = Predictor(clip, vocabulary=vocab, decoder=decoder.eval(), device=clip.device)
    num = len(vocab) + 1
    conf = {k: np.zeros((num, num + 1), np.int64) for k in ("initial", "static", "rfm", "label")}
    for sample in samples:
        predictor.set_image(load_image(sample.image), labels=list(sample.labels))
        result = predictor.refine(params)
        gt = np.asarray(Image.open(sample.gt))
        keys = np.asarray(result.class_indices)
        for stage in ("initial", "static", "rfm"):
            pred = labels_from_cams(getattr(result, f"cam_{stage}"), keys, params.bg_power)
            conf[stage] += confusion_matrix(pred, gt, num)
        conf["label"] += confusion_matrix(result.label, gt, num)
    decoder.train(was_training)
    return {k: round(100 * mean_iou(c), 3) for k, c in conf.items()}
