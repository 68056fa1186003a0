"""``Predictor``: compute the CLIP pass once per image (``set_image``), refine cheaply per parameter set (``refine``).

Stages 1–3 (backbone, initial CAM, decoder affinity, PAR's pixel affinity) depend only on the image,
its labels and the decoder and are kept in ``Predictor.features`` (an ``ImageFeatures``); stages 4–6
(static refinement, RFM, PAR) are pure functions of those features and a ``RefineParams``.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch

from . import checks
from . import refine as rf
from .backbone import FrozenClip, pick_device
from .constants import CAM_STAGES, IGNORE_INDEX
from .data import ImageError, read_image, to_rgb_array
from .decoder import Decoder, check_compatible
from .export import Rows
from .losses import make_optimizer, poly_warmup_lr
from .par import pseudo_label as argmax_label
from .params import Box, RefineParams
from .pipeline import ImageFeatures, decoder_affinity, decoder_step, encode_image, par_probs, refine_stages, with_classes
from .text import Vocabulary, get_vocabulary, vocabulary_features


@dataclass
class PatchMaps:
    """The CAMs at the patch grid (K, h, w), before resizing to the image."""

    cam_initial: np.ndarray
    cam_static: np.ndarray
    cam_rfm: np.ndarray | None


class Result:
    """What ``Predictor.refine`` returns. Image-size maps are made on first access from the patch maps,
    or strip by strip (``cam_rows``, ``label_rows``) by writers that must not hold a whole one."""

    def __init__(self, *, class_names, class_indices, params, image_size, patch, box_mask, auto_boxes,
                 layer_scores, layer_keep, layer_threshold, rfm_fallback, notes, probs, user_boxes):
        self.class_names: list[str] = class_names
        self.class_indices: list[int] = class_indices
        self.params: RefineParams = params
        self.image_size: tuple[int, int] = image_size  # (H, W)
        self.patch: PatchMaps = patch
        self.box_mask: np.ndarray = box_mask  # (K, h, w) bool, the B_c actually used
        self.auto_boxes: dict[str, list[Box]] = auto_boxes  # CAM-threshold boxes in image pixels
        self.layer_scores: np.ndarray = layer_scores  # (N,) S^l, NaN outside N0..N or without decoder
        self.layer_keep: np.ndarray = layer_keep  # (N,) bool G^l
        self.layer_threshold: float = layer_threshold  # mean of the finite S^l (NaN if none)
        self.rfm_fallback: bool = rfm_fallback  # no layer passed G^l: R used the mean of N0..N
        self.notes: list[str] = notes
        self.probs: np.ndarray = probs  # (1 + K, h', w') PAR output at the work resolution, background first
        self._user_boxes = user_boxes  # {class position: boxes in image pixels} for classes with user boxes
        self._work_labels: dict[tuple[float, int], np.ndarray] = {}  # (confidence, ignore index) → (h', w')

    def resized(self, size: tuple[int, int]) -> "Result":
        """The same result with its image-size maps at ``size`` (H, W) instead, user boxes scaled along:
        previews of a huge image (overlays, figures) without image-size maps."""
        (height, width), (new_h, new_w) = self.image_size, size
        sx, sy = new_w / width, new_h / height
        return Result(
            class_names=self.class_names, class_indices=self.class_indices, params=self.params, image_size=tuple(size),
            patch=self.patch, box_mask=self.box_mask,
            auto_boxes={n: [_scale_box(b, sx, sy) for b in boxes] for n, boxes in self.auto_boxes.items()},
            layer_scores=self.layer_scores, layer_keep=self.layer_keep, layer_threshold=self.layer_threshold,
            rfm_fallback=self.rfm_fallback, notes=self.notes, probs=self.probs,
            user_boxes={k: [_scale_box(b, sx, sy) for b in boxes] for k, boxes in self._user_boxes.items()})

    def _inside_rows(self, k: int, start: int, stop: int) -> np.ndarray:
        """(stop − start, W) bool: rows of class k's user-box mask."""
        return rf.boxes_to_pixel_mask(self._user_boxes[k], self.image_size, rows=(start, stop)).numpy()

    def cam_rows(self, stage: str) -> Rows | None:
        """A stage's (K, H, W) CAMs as ``Rows`` made strip by strip (for writers of huge images); None for
        'rfm' without a decoder."""
        checks.choice("stage", stage, CAM_STAGES)
        if stage == "rfm" and self.patch.cam_rfm is None:
            return None
        return Rows((len(self.class_indices), *self.image_size), lambda a, b: self._cam_strip(stage, a, b))

    def label_rows(self, confidence: float = 0.0, ignore_index: int = IGNORE_INDEX) -> Rows:
        """``label_with_ignore`` as (H, W) ``Rows`` made strip by strip."""
        checks.unit_interval("confidence", confidence)
        return Rows(self.image_size, lambda a, b: self._label_strip(a, b, confidence, ignore_index))

    def _cam_strip(self, stage: str, start: int, stop: int) -> np.ndarray | None:
        """(K, stop − start, W) float32 in [0, 1]: rows start..stop of a stage's image-size CAMs.

        Bilinear with half-pixel centres from the patch grid (cv2's INTER_LINEAR rule), refined
        stages clipped to user boxes; None for 'rfm' without a decoder.
        """
        maps = {"initial": self.patch.cam_initial, "static": self.patch.cam_static, "rfm": self.patch.cam_rfm}[stage]
        if maps is None:
            return None
        out = bilinear_rows(maps, self.image_size, start, stop)
        if stage != "initial":
            for k in self._user_boxes:
                out[k] *= self._inside_rows(k, start, stop)
        return np.clip(out, 0.0, 1.0, out=out)

    def cam(self, stage: str) -> np.ndarray | None:
        """(K, H, W) CAMs of a stage: 'initial', 'static' or 'rfm' (None without a decoder)."""
        checks.choice("stage", stage, CAM_STAGES)
        return getattr(self, f"cam_{stage}")

    @cached_property
    def cam_initial(self) -> np.ndarray:
        """(K, H, W) float32 in [0, 1]: CLIP-ES softmax-GradCAM, bilinearly resized (CLIP-ES's 'highres')."""
        return self._cam_strip("initial", 0, self.image_size[0])

    @cached_property
    def cam_static(self) -> np.ndarray:
        """(K, H, W): CLIP-ES static refinement (CAA), clipped to user boxes where given."""
        return self._cam_strip("static", 0, self.image_size[0])

    @cached_property
    def cam_rfm(self) -> np.ndarray | None:
        """(K, H, W): RFM refinement, or None without a decoder."""
        return self._cam_strip("rfm", 0, self.image_size[0])

    @property
    def num_tokens(self) -> int:
        """n = hw, the patch tokens of the image; S^l sums over n² token pairs."""
        h, w = self.patch.cam_initial.shape[1:]
        return h * w

    @cached_property
    def layer_margins(self) -> np.ndarray:
        """(N,) ΔS^l per token pair, (S^l − threshold) / (hw)²: below 0 passes the abs test (NaN: not a candidate)."""
        return rf.layer_margins(self.layer_scores, self.num_tokens)

    @property
    def final_stage(self) -> str:
        """The stage PAR and the pseudo label were made from: 'rfm' with a decoder, else 'static'."""
        return "static" if self.patch.cam_rfm is None else "rfm"

    @property
    def cam_final(self) -> np.ndarray:
        """(K, H, W) the refined CAMs the pseudo label comes from: RFM's, or the static ones without a decoder."""
        return self.cam(self.final_stage)

    @cached_property
    def label(self) -> np.ndarray:
        """(H, W) uint8 pseudo label: 0 background, vocabulary index + 1."""
        return self.label_with_ignore(0.0)

    def label_with_ignore(self, confidence: float, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """The pseudo label with ``ignore_index`` where the PAR output is not confident.

        Confidence is the top score's share of the pixel's scores, max_c P_c / Σ_c P_c over
        [bg; classes] after PAR (PAR's maps are not normalised: their rows sum to 1.01 per
        iteration). CLIP-ES ignores pixels below 0.95 of its CRF probabilities; 0 ignores none.
        """
        return self._label_strip(0, self.image_size[0], confidence, ignore_index)

    def _label_strip(self, start: int, stop: int, confidence: float, ignore_index: int) -> np.ndarray:
        """(stop − start, W) uint8: rows start..stop of ``label_with_ignore`` (cv2 INTER_NEAREST upsampling
        of the work-resolution label, so every strip equals the same rows of the whole label)."""
        small = self._work_label(checks.unit_interval("confidence", confidence), ignore_index)
        h, w = self.image_size
        if small.shape == (h, w):
            return small[start:stop].copy()  # the work label is cached: callers may write to what they get
        rows, cols = _nearest_indices(small.shape[0], h), _nearest_indices(small.shape[1], w)
        label = small[rows[start:stop]][:, cols]
        # nearest upsampling can spill a work-resolution pixel over a user box's edge
        for k in self._user_boxes:
            label[(label == self.class_indices[k] + 1) & ~self._inside_rows(k, start, stop)] = 0
        return label

    def _work_label(self, confidence: float, ignore_index: int) -> np.ndarray:
        """(h', w') uint8 argmax of the PAR output, ``ignore_index`` where its top share is below ``confidence``."""
        key = (confidence, ignore_index)
        if key not in self._work_labels:
            probs = torch.from_numpy(self.probs)
            label = argmax_label(probs, self.class_indices).numpy().astype(np.uint8)
            if confidence > 0:
                total = probs.sum(0)
                share = probs.amax(0) / torch.where(total > 0, total, torch.ones_like(total))
                label[(share < confidence).numpy()] = ignore_index
            self._work_labels[key] = label
        return self._work_labels[key]


def _scale_box(box: Box, sx: float, sy: float) -> Box:
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def bilinear_rows(maps: np.ndarray, size: tuple[int, int], start: int, stop: int) -> np.ndarray:
    """Rows start..stop of (K, h, w) maps resized bilinearly to (K, H, W), as float32.

    Half-pixel centres, source coordinate (i + ½)·h/H − ½ clamped to the map (cv2's INTER_LINEAR);
    columns are interpolated first, then the two source rows of every output row are blended.
    """
    (height, width), (h, w) = size, maps.shape[1:]
    r0, r1, fr = _linear_taps(h, height, start, stop)
    c0, c1, fc = _linear_taps(w, width, 0, width)
    maps = np.asarray(maps, np.float64)  # float64 inside: within float32 rounding of cv2's own arithmetic
    cols = maps[:, :, c0] * (1 - fc) + maps[:, :, c1] * fc  # (K, h, W)
    return (cols[:, r0] * (1 - fr)[:, None] + cols[:, r1] * fr[:, None]).astype(np.float32)


def _linear_taps(src: int, dst: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output positions start..stop of a src → dst resize: (lower tap, upper tap, float32 weight of the upper)."""
    pos = np.clip((np.arange(start, stop) + 0.5) * (1.0 / (dst / src)) - 0.5, 0, src - 1)  # cv2's scale
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, src - 1)
    return lo, hi, (pos - lo).astype(np.float32).astype(np.float64)  # cv2 keeps float32 weights


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """(dst,) source index of every output position of cv2's INTER_NEAREST resize: floor(i / (dst/src))."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.intp), src - 1)


@dataclass
class AttentionRows:
    """What one patch attends to: a row of every block's attention and of the decoder affinity."""

    patch: tuple[int, int]  # (r, c) on the patch grid
    layers: np.ndarray  # (N, h, w): A_s^l[i, :] for the patch i, l = 1..N
    decoder: np.ndarray | None  # (h, w): A_f[i, :], None without a decoder


@dataclass
class AdaptSnapshot:
    """The decoder affinity at one step of ``Predictor.adapt_decoder``, for replaying how RFM changed."""

    step: int  # 0: before adaptation
    losses: dict  # {"seg", "aff", "total"}; empty at step 0
    aff_f: torch.Tensor | None  # (n, n) A_f after this step; None at step 0 when there was no decoder


class Predictor:
    """Run CLIP-ES → static refinement → RFM → PAR on one image at a time.

    >>> predictor = Predictor(clip, vocabulary="voc", decoder=decoder)
    >>> predictor.set_image(image, labels=["cat", "dog"])   # heavy: one CLIP pass
    >>> result = predictor.refine(RefineParams(alpha=2, n0=7))  # cheap: call per slider change

    The CLIP is used where it is (``device`` must agree with it or be None); it is never moved,
    since other predictors may share it. A decoder on another device is copied to the CLIP's.
    """

    def __init__(self, clip: FrozenClip, vocabulary: str | Vocabulary | Sequence[str] = "voc",
                 decoder: Decoder | None = None, device=None, max_side: int = 512,
                 background: Sequence[str] | None = None):
        self.max_side = checks.integer("max_side", max_side, clip.patch_size, why="at least one patch")
        self.device = clip.device
        if device is not None and not _same_device(pick_device(device), clip.device):
            raise ValueError(f"the CLIP is on {clip.device} but device={device!r} was asked for; load it there "
                             f"(rfm.load_clip(..., device={str(device)!r})) or pass device=None")
        self.clip = clip
        self.vocabulary = get_vocabulary(vocabulary, background)
        self.decoder: Decoder | None = None
        if decoder is not None:
            check_compatible(decoder, clip.width, clip.num_blocks)
            self.decoder = decoder if _module_device(decoder) == self.device else copy.deepcopy(decoder).to(self.device)
        self.features: ImageFeatures | None = None
        self._lock = threading.RLock()

    @property
    def num_blocks(self) -> int:
        return self.clip.num_blocks

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def reset_image(self) -> None:
        """Forget the current image's features (frees their memory)."""
        with self._lock:
            self.features = None

    # ------------------------------------------------------------ stages 1–3

    def set_image(self, image, labels: Sequence[str | int], image_size: tuple[int, int] | None = None) -> None:
        """Run the frozen CLIP (and decoder) on an image and compute the initial CAM of ``labels``.

        image: (H, W, 3) uint8 RGB (grey, RGBA and 16-bit arrays, PIL images and paths are converted; a
        path is decoded reduced to about ``max_side``, see ``rfm.data.read_image``).
        labels: class names (or prompt names) of the vocabulary, or 0-based vocabulary indices.
        image_size: the (H, W) the results are at when ``image`` holds reduced pixels of a larger image
        (``read_image(path, max_side).rgb`` with its ``.size``); default the array's own size.
        The previous image's features stay until the new ones are complete.
        """
        if isinstance(image, (str, os.PathLike)):
            file = read_image(image, self.max_side)
            image, image_size = file.rgb, file.size
        rgb = to_rgb_array(image)
        h, w = image_size or rgb.shape[:2]
        p = self.clip.patch_size
        if min(h, w) < p:
            raise ImageError(f"image is {w}×{h} pixels; each side must be at least one {p}-pixel patch")
        indices = self._resolve_labels(labels)
        with self._lock:
            self.features = encode_image(self.clip, rgb, indices, self._text(), self.decoder, self.max_side,
                                         size=(h, w))

    def set_labels(self, labels: Sequence[str | int]) -> None:
        """Change the image's classes without rerunning the backbone (only the last block runs again)."""
        features = self._require_image()
        indices = self._resolve_labels(labels)
        with self._lock:
            self.features = with_classes(self.clip, features, indices, self._text())

    def attention_rows(self, x: float, y: float) -> AttentionRows:
        """Attention rows of the patch under image pixel (x, y), for every block and for A_f."""
        features = self._require_image()
        (height, width), (h, w) = features.size, features.grid
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"pixel ({x}, {y}) is outside the {width}×{height} image")
        r, c = min(int(y * h / height), h - 1), min(int(x * w / width), w - 1)
        i = r * w + c
        aff_f = features.aff_f
        return AttentionRows(patch=(r, c), layers=_np(features.attn[:, i]).reshape(-1, h, w),
                             decoder=None if aff_f is None else _np(aff_f[i]).reshape(h, w))

    def adapt_decoder(self, steps: int = 60, params: RefineParams | None = None, callback=None, lr: float = 2e-3,
                      snapshot_every: int = 5, label_every: int = 5, switch_step: int | None = None,
                      seed: int = 0) -> list[AdaptSnapshot]:
        """Fit the decoder (a copy of the loaded one, or a fresh one) to the current image with WeCLIP's losses.

        Uses the cached tokens and attention: no CLIP pass. The whole image is the training view and
        ``rfm train``'s step (``pipeline.decoder_step``) is applied; the pseudo label is remade every
        ``label_every`` steps from the static refinement until ``switch_step`` (default: half the
        steps) and from RFM with the decoder's current A_f after it. ``callback(step, steps, losses)``
        reports progress. Returns snapshots of A_f for ``show_snapshot``, the first one (step 0) the
        state before adaptation; the adapted decoder replaces this predictor's (other predictors
        sharing the original keep theirs).
        """
        params = params or RefineParams()
        features = self._require_image()
        steps = checks.integer("steps", steps, 1, why="at least one optimisation step")
        switch_step = steps // 2 if switch_step is None else checks.integer("switch_step", switch_step, 0)
        with self._lock:
            torch.manual_seed(seed)
            if self.decoder is None:
                decoder = Decoder(width=self.clip.width, num_blocks=self.num_blocks - 1,
                                  num_classes=len(self.vocabulary) + 1)
            else:
                decoder = copy.deepcopy(self.decoder)
            if decoder.config["num_classes"] < len(self.vocabulary) + 1:
                raise ValueError(f"the decoder predicts {decoder.config['num_classes']} classes but the "
                                 f"vocabulary needs {len(self.vocabulary) + 1}")
            decoder = decoder.to(self.device)
            optimizer = make_optimizer(decoder.parameters(), lr=lr)
            history = [AdaptSnapshot(0, {}, None if features.aff_f is None else features.aff_f.cpu())]
            labels = None
            for step in range(steps):
                fresh = labels is None or step % label_every == 0 or step == switch_step
                out = decoder_step(decoder, optimizer, [features], params, use_rfm=step >= switch_step,
                                   lr=poly_warmup_lr(step, lr, steps, warmup_steps=min(50, steps // 10)),
                                   labels=None if fresh else labels)
                labels = out.labels
                if (step + 1) % snapshot_every == 0 or step + 1 == steps:
                    after = decoder_affinity(decoder, features.patch_tokens, features.grid)
                    history.append(AdaptSnapshot(step + 1, out.losses, after.cpu()))
                if callback is not None:
                    callback(step + 1, steps, out.losses)
            self.decoder = decoder.eval()
            self.features = replace(features, aff_f=decoder_affinity(decoder, features.patch_tokens, features.grid))
        return history

    def show_snapshot(self, snapshot: AdaptSnapshot) -> None:
        """Make ``refine`` use the decoder affinity recorded at a step of ``adapt_decoder`` (replay)."""
        features = self._require_image()
        n = features.attn.shape[-1]
        if snapshot.aff_f is not None and tuple(snapshot.aff_f.shape) != (n, n):
            raise ValueError("this snapshot belongs to another image")
        with self._lock:
            self.features = replace(features, aff_f=None if snapshot.aff_f is None else snapshot.aff_f.to(self.device))

    def _require_image(self) -> ImageFeatures:
        features = self.features
        if features is None:
            raise RuntimeError("call set_image first")
        return features

    def _text(self) -> tuple[torch.Tensor, torch.Tensor]:
        return vocabulary_features(self.clip, self.vocabulary)

    def _resolve_labels(self, labels) -> list[int]:
        if isinstance(labels, (str, int)):
            labels = [labels]
        if labels is None or len(labels) == 0:
            raise ValueError("give at least one class present in the image")
        indices = []
        for label in labels:
            i = self.vocabulary.index(int(label) if isinstance(label, np.integer) else label)
            if i not in indices:
                indices.append(i)
        return indices

    # ------------------------------------------------------------ stages 4–6

    def refine(self, params: RefineParams | None = None, shared: dict | None = None) -> Result:
        """Static refinement, RFM and PAR for the current image. Cheap: no CLIP forward.

        shared: a dict kept by a caller that refines this image under many settings (``rfm sweep``);
        settings then share their transition matrices. Start a new one for every image.
        """
        params = params or RefineParams()
        features = self._require_image()
        with self._lock, torch.no_grad():
            return self._refine(params, features, shared)

    def _refine(self, params: RefineParams, features: ImageFeatures, shared: dict | None = None) -> Result:
        params.check_blocks(self.num_blocks)
        indices = list(features.class_indices)
        names = [self.vocabulary.class_names[i] for i in indices]
        (height, width), grid = features.size, features.grid
        user_boxes = self._user_boxes(params.boxes, indices, (height, width))
        cams = features.cams

        auto = [rf.auto_boxes_from_cam(c, params.box_threshold) for c in cams.cpu()]
        box_mask = rf.masks_from_boxes(auto, grid).to(cams.device)
        for k, boxes in user_boxes.items():
            box_mask[k] = rf.boxes_to_patch_mask(boxes, (height, width), grid).to(box_mask.device)
        clip_mask = box_mask.clone()
        clip_mask[[k for k in range(len(indices)) if k not in user_boxes]] = True

        stages = refine_stages(features, params, box_mask, shared)
        cam_static = stages.static * clip_mask
        cam_rfm = None if stages.rfm is None else stages.rfm * clip_mask
        notes: list[str] = []
        if features.aff_f is None:
            notes.append("no decoder loaded: RFM needs the decoder's feature affinity A_f")
        elif stages.fallback:
            notes.append(f"RFM kept no layer among {params.n0}..{self.num_blocks}; "
                         "R uses the plain mean of those layers instead")

        wh, ww = features.work_image.shape[:2]
        sy, sx = wh / height, ww / width
        inside = {k: rf.boxes_to_pixel_mask([(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes],
                                            (wh, ww)) for k, boxes in user_boxes.items()}
        for k, mask in inside.items():
            if not mask.any():
                notes.append(f"the boxes of {names[k]!r} hold no pixel at PAR's {ww}×{wh} work resolution: "
                             f"the pseudo label cannot show it; draw them larger")
        probs = par_probs(features, cam_static if cam_rfm is None else cam_rfm, params, inside)
        scores = stages.scores
        finite = scores[torch.isfinite(scores)]
        scale = (width / grid[1], height / grid[0])
        return Result(
            class_names=names, class_indices=indices, params=params, image_size=(height, width),
            patch=PatchMaps(_np(cams), _np(cam_static), None if cam_rfm is None else _np(cam_rfm)),
            box_mask=box_mask.cpu().numpy(),
            auto_boxes={n: [(x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]) for x0, y0, x1, y1 in b]
                        for n, b in zip(names, auto)},
            layer_scores=scores.double().cpu().numpy(), layer_keep=stages.keep.cpu().numpy(),
            layer_threshold=float(finite.mean()) if len(finite) else float("nan"),
            rfm_fallback=stages.fallback, notes=notes, probs=_np(probs),
            user_boxes=user_boxes,
        )

    def _user_boxes(self, boxes: Mapping[str, Sequence[Box]], indices: list[int],
                    size: tuple[int, int]) -> dict[int, list[Box]]:
        """{position among the image's classes: boxes}, every box checked against the image."""
        height, width = size
        out: dict[int, list[Box]] = {}
        for name, class_boxes in boxes.items():
            i = self.vocabulary.index(name)
            if i not in indices:
                present = ", ".join(self.vocabulary.class_names[j] for j in indices)
                raise ValueError(f"box given for {name!r}, which is not one of this image's classes ({present})")
            for box in class_boxes:
                x0, y0, x1, y1 = box
                if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                    raise ValueError(f"box {tuple(box)} for {name!r} extends outside the {width}×{height} image")
                if not rf.covers_pixel_centre(box, size):
                    # the class would vanish from the label: a pixel belongs to a box only by its centre
                    raise ValueError(f"box {tuple(box)} for {name!r} holds no pixel centre (pixel (x, y) is inside "
                                     f"when x0 ≤ x + ½ < x1 and y0 ≤ y + ½ < y1); draw it at least one pixel wide")
            if class_boxes:
                out.setdefault(indices.index(i), []).extend(tuple(float(v) for v in b) for b in class_boxes)
        return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' names the current CUDA device, so it equals 'cuda:0' when that is current."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.index is None or b.index is None


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
