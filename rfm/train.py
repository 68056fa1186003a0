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
repeats the uninterrupted trajectory exactly. A checkpoint is one file, ``state.pt``, holding
everything a resume needs (step, weights with their SHA-256, optimiser, settings, log), replaced
atomically; decoder.safetensors/.json, log.csv and losses.png are written from it afterwards.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .backbone import FrozenClip, network_size, resize_image
from .constants import STAGES
from .data import Sample, load_image
from .decoder import Decoder, safetensors_chunks
from .fileio import atomic_write, remove_temporaries, save_csv, save_json
from .losses import make_optimizer, poly_warmup_lr
from .params import RefineParams, TrainConfig
from .pipeline import ImageFeatures, decoder_step, encode_image
from .text import Vocabulary, vocabulary_features
from .viz import save_training_plot

LOG_FIELDS = ("step", "loss", "seg", "aff", "lr", "kept_fraction", "rfm", "seconds")
CHECKPOINT = "state.pt"
# What a checkpoint holds, and the type each field must have.
_CHECKPOINT_FIELDS = {"step": int, "weights": dict, "weights_sha256": str, "decoder": str, "optimizer": dict,
                      "config": str, "params": str, "log": str}


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


def exact_view(clip: FrozenClip, sample: Sample, text: tuple[torch.Tensor, torch.Tensor], config: TrainConfig,
               gen: torch.Generator) -> ImageFeatures:
    """Stages 1–3 (without a decoder) on an augmented crop, its padding marked invalid."""
    pixels, valid = augment(load_image(sample.image), config.crop, config.scale_range, gen)
    return encode_image(clip, pixels, sample.labels, text, valid=valid)


class FeatureCache:
    """Backbone outputs per image at one scale, as float16 .npy files read memory-mapped."""

    def __init__(self, folder: Path, clip: FrozenClip, vocab: Vocabulary, side: int, clip_id: str):
        self.folder, self.clip, self.side = folder, clip, side
        self.text = vocabulary_features(clip, vocab)
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
            pixels = resize_image(image, network_size(image.shape[:2], self.side, self.clip.patch_size))
            f = encode_image(self.clip, pixels, sample.labels, self.text, par_affinity=False)
            arrays = {"tokens": f.patch_tokens[:, 0].half().cpu().numpy(), "attn": f.attn.half().cpu().numpy(),
                      "cams": f.cams.cpu().numpy(), "image": pixels}
            for key, path in self._paths(sample.stem).items():
                atomic_write(path, lambda f, a=arrays[key]: np.save(f, a), overwrite=True)
            known["labels"][sample.stem] = list(sample.labels)
            save_json(known, meta_path, overwrite=True, indent=None)

    def view(self, sample: Sample, config: TrainConfig, gen: torch.Generator) -> ImageFeatures:
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
        return ImageFeatures(size=pixels.shape[:2], grid=(ch, cw), work_image=pixels, patch_tokens=tokens[:, None],
                             last_input=None, attn=attn, class_indices=tuple(sample.labels), cams=cams, aff_f=None,
                             par_affinity=None)


# ---------------------------------------------------------------- the run


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict's names, dtypes, shapes and values: its bytes as a safetensors file, laid out
    the same in every process (the check runs in another process than the save)."""
    digest = hashlib.sha256()
    for chunk in safetensors_chunks(weights, {}):
        digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_bytes(step: int, decoder: Decoder, optimizer, config: TrainConfig, params: RefineParams,
                      rows: list[dict]) -> bytes:
    """The whole training state after ``step`` as one torch file (tensors, plain containers and strings only)."""
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in decoder.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"step": step, "weights": weights, "weights_sha256": weights_sha256(weights),
                "decoder": json.dumps(decoder.config), "optimizer": optimizer.state_dict(),
                "config": json.dumps(asdict(config)), "params": json.dumps(asdict(params)),
                "log": json.dumps(rows)}, buf)
    return buf.getvalue()


def read_checkpoint(path: Path) -> dict:
    """The training state in ``path``, checked whole: every field present, the weights matching their SHA-256.

    Read with torch.load(weights_only=True) only, so a crafted file cannot run code; whatever is wrong is a
    ValueError naming the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _invalid(path, "it holds Python objects other than tensors; checkpoints are read with "
                             "torch.load(weights_only=True) so that they cannot run code") from None
    except Exception as err:  # torch reports truncated or foreign files with many exception types
        raise _invalid(path, f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    fields = state if isinstance(state, dict) else {}
    wrong = [k for k, kind in _CHECKPOINT_FIELDS.items() if not isinstance(fields.get(k), kind)]
    if wrong:
        raise _invalid(path, f"missing or malformed: {', '.join(wrong)}")
    try:
        intact = weights_sha256(state["weights"]) == state["weights_sha256"]
    except Exception:  # not a flat {name: tensor} dict
        intact = False
    if not intact:
        raise _invalid(path, "the weights do not match their recorded SHA-256")
    return state


def _invalid(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid training checkpoint ({why})")


def _restore(state: dict, path: Path) -> tuple[Decoder, list[dict]]:
    """The checkpoint's decoder and log rows."""
    try:
        decoder = Decoder(**json.loads(state["decoder"]))
        decoder.load_state_dict(state["weights"])
        return decoder, json.loads(state["log"])
    except (TypeError, ValueError, RuntimeError) as err:  # a config or weights no Decoder takes
        raise _invalid(path, f"{type(err).__name__}: {err}") from None


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
    remove_temporaries(out)  # a killed run's half-written files
    device = clip.device
    start, log_rows = 0, []
    checkpoint = out / CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"nothing to resume in {out} (no {CHECKPOINT})")
        state = read_checkpoint(checkpoint)
        if _comparable(state["config"]) != _comparable(json.dumps(asdict(config))) or \
                json.loads(state["params"]) != asdict(params):
            raise ValueError(f"{out} was trained with other settings; resume with the same flags (only --steps, "
                             f"--save-every and --eval-every may change)")
        decoder, log_rows = _restore(state, checkpoint)
        start = state["step"]
        _publish(out, decoder, log_rows)  # a kill between the commit and these files left older ones
    elif checkpoint.exists():
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
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError) as err:
            raise _invalid(checkpoint, f"optimiser state: {type(err).__name__}: {err}") from None

    text = vocabulary_features(clip, vocab)
    cache = None
    if config.cache_features:
        cache = FeatureCache(out / "feature_cache", clip, vocab, config.cache_side, clip_id)
        cache.build(samples, progress)
    bar = tqdm(total=config.steps, initial=start, unit="step", desc="train", disable=not progress)
    started = time.perf_counter()
    for step in range(start, config.steps):
        gen = step_generator(config.seed, step)
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))  # Dropout2d, reproducibly
        batch = [samples[i] for i in batch_indices(config.seed, step, config.batch_size, len(samples))]
        views = [cache.view(s, config, gen) if cache else exact_view(clip, s, text, config, gen) for s in batch]
        lr = poly_warmup_lr(step, config.lr, config.steps, warmup_steps=config.warmup_steps)
        use_rfm = step >= config.switch_step
        out_step = decoder_step(decoder, optimizer, views, params, use_rfm, lr, config.aff_radius)
        row = {"step": step + 1, "loss": out_step.losses["total"], "seg": out_step.losses["seg"],
               "aff": out_step.losses["aff"], "lr": lr, "kept_fraction": out_step.kept_fraction,
               "rfm": int(use_rfm), "seconds": round(time.perf_counter() - started, 3)}
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
    """Commit the checkpoint (state.pt replaced in one step), then write the files people load from it."""
    data = _checkpoint_bytes(step, decoder, optimizer, config, params, rows)
    atomic_write(out / CHECKPOINT, lambda f: f.write(data), overwrite=True)
    _publish(out, decoder, rows)


def _publish(out: Path, decoder: Decoder, rows: list[dict]) -> None:
    """decoder.safetensors + .json (for --decoder), log.csv and losses.png of the committed checkpoint."""
    decoder.save(out / "decoder.safetensors", overwrite=True)
    fields = list(LOG_FIELDS) + sorted({k for r in rows for k in r} - set(LOG_FIELDS))
    save_csv(rows, fields, out / "log.csv", overwrite=True)
    save_training_plot(rows, out / "losses.png")


def evaluate_pseudo_labels(clip: FrozenClip, decoder: Decoder, vocab: Vocabulary, params: RefineParams,
                           samples: list[Sample]) -> dict[str, float]:
    """mIoU (%) against the ground truth of the initial, static and RFM CAMs (bg = (1 − max)^p) and of the PAR label."""
    from PIL import Image

    from .metrics import confusion_matrix, labels_from_cams, mean_iou
    from .predictor import Predictor

    predictor = Predictor(clip, vocabulary=vocab, decoder=decoder)
    num = len(vocab) + 1
    conf = {k: np.zeros((num, num + 1), np.int64) for k in STAGES}
    for sample in samples:
        predictor.set_image(load_image(sample.image), labels=list(sample.labels))
        result = predictor.refine(params)
        gt = np.asarray(Image.open(sample.gt))
        keys = np.asarray(result.class_indices)
        for stage in STAGES[:-1]:
            conf[stage] += confusion_matrix(labels_from_cams(result.cam(stage), keys, params.bg_power), gt, num)
        conf["label"] += confusion_matrix(result.label, gt, num)
    return {k: round(100 * mean_iou(c), 3) for k, c in conf.items()}
