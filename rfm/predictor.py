"""``Predictor``: compute the CLIP pass once per image (``set_image``), refine cheaply per parameter set (``refine``).

Stages 1–3 (backbone, initial CAM, decoder affinity) depend only on the image, its labels and the
decoder and are cached; stages 4–6 (static refinement, RFM, PAR) are pure functions of the cache
and a ``RefineParams``.
"""
from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch

from . import refine as rf
from .backbone import FrozenClip, forward_blocks, network_size, pick_device, resize_image, to_tensor, work_size
from .cam import initial_cam
from .data import ImageError, to_rgb_array
from .par import background_score, par_refine, pseudo_label
from .text import Vocabulary, get_vocabulary, vocabulary_features

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RefineParams:
    """Every knob of stages 4–6. Defaults: the official VOC settings (REFERENCE §2, §3)."""

    alpha: int = 2  # matrix power of the transition matrix
    n0: int = 7  # first RFM candidate block, 1-indexed (last 6 of 12)
    static_layers: int = 8  # CLIP-ES averages the last 8 blocks
    box_threshold: float = 0.4  # λ of the box mask indicator (0.7 for COCO)
    distance: str = "abs"  # "abs": paper Eq. 5; "signed": official code
    boxes: Mapping[str, Sequence[Box]] = field(default_factory=dict)  # user boxes per class, image pixels
    bg_power: float = 1.0  # background score (1 − max CAM)^p before PAR
    par_iterations: int = 20  # 0 turns PAR off

    def __post_init__(self):
        _integer("alpha", self.alpha, 1, "α is a matrix power: 1 means no propagation beyond one step")
        _integer("n0", self.n0, 1, "N0 is the first block RFM may select, counted from 1")
        _integer("static_layers", self.static_layers, 1, "the static refinement averages at least one block")
        _integer("par_iterations", self.par_iterations, 0, "0 turns PAR off")
        if not (isinstance(self.box_threshold, numbers.Real) and 0 < self.box_threshold < 1):
            raise ValueError(f"box_threshold must be strictly between 0 and 1, got {self.box_threshold!r}")
        if self.distance not in rf.DISTANCES:
            raise ValueError(f"distance must be 'abs' (paper) or 'signed' (official code), got {self.distance!r}")
        if not (isinstance(self.bg_power, numbers.Real) and math.isfinite(self.bg_power) and self.bg_power > 0):
            raise ValueError(f"bg_power must be a positive number, got {self.bg_power!r}")
        if not isinstance(self.boxes, Mapping):
            raise ValueError("boxes must map a class name to a list of (x0, y0, x1, y1) boxes")
        for name, boxes in self.boxes.items():
            for box in boxes:
                if len(box) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
                    raise ValueError(f"box {box!r} for {name!r} must be four numbers (x0, y0, x1, y1)")
                if not (box[0] < box[2] and box[1] < box[3]):
                    raise ValueError(f"box {tuple(box)} for {name!r} has zero area: need x0 < x1 and y0 < y1")


def official_params(vocabulary: str = "voc", **overrides) -> RefineParams:
    """RefineParams with the official settings of a dataset: COCO uses λ = 0.7 (CLIP-ES) and the last
    10 blocks (N0 = 3, WeCLIP); VOC and user vocabularies use the VOC settings (λ = 0.4, N0 = 7)."""
    base = {"box_threshold": 0.7, "n0": 3} if vocabulary == "coco" else {}
    return RefineParams(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def _integer(name: str, value, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value} ({why})")


@dataclass
class PatchMaps:
    """The CAMs at the patch grid (K, h, w), before resizing to the image."""

    cam_initial: np.ndarray
    cam_static: np.ndarray
    cam_rfm: np.ndarray | None


class Result:
    """What ``Predictor.refine`` returns. Image-size maps are made on first access from the patch maps."""

    def __init__(self, *, class_names, class_indices, params, image_size, patch, box_mask, auto_boxes,
                 layer_scores, layer_keep, layer_threshold, rfm_fallback, notes, probs, user_masks):
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
        self._user_masks = user_masks  # {class position: (H, W) bool} for classes with user boxes

    def _to_image(self, maps: np.ndarray | None, clip_to_boxes: bool) -> np.ndarray | None:
        if maps is None:
            return None
        h, w = self.image_size
        out = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps]).astype(np.float32)
        if clip_to_boxes:
            for k, mask in self._user_masks.items():
                out[k] *= mask
        return np.clip(out, 0.0, 1.0)

    @cached_property
    def cam_initial(self) -> np.ndarray:
        """(K, H, W) float32 in [0, 1]: CLIP-ES softmax-GradCAM, bilinearly resized (CLIP-ES's 'highres')."""
        return self._to_image(self.patch.cam_initial, clip_to_boxes=False)

    @cached_property
    def cam_static(self) -> np.ndarray:
        """(K, H, W): CLIP-ES static refinement (CAA), clipped to user boxes where given."""
        return self._to_image(self.patch.cam_static, clip_to_boxes=True)

    @cached_property
    def cam_rfm(self) -> np.ndarray | None:
        """(K, H, W): RFM refinement, or None without a decoder."""
        return self._to_image(self.patch.cam_rfm, clip_to_boxes=True)

    @cached_property
    def label(self) -> np.ndarray:
        """(H, W) uint8 pseudo label: 0 background, vocabulary index + 1."""
        return self.label_with_ignore(0.0)

    def label_with_ignore(self, confidence: float, ignore_index: int = 255) -> np.ndarray:
        """The pseudo label with ``ignore_index`` where the PAR output is not confident.

        Confidence is the top score's share of the pixel's scores, max_c P_c / Σ_c P_c over
        [bg; classes] after PAR (PAR's maps are not normalised: their rows sum to 1.01 per
        iteration). CLIP-ES ignores pixels below 0.95 of its CRF probabilities; 0 ignores none.
        """
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {confidence}")
        probs = torch.from_numpy(self.probs)
        label = pseudo_label(probs, self.class_indices).numpy().astype(np.uint8)
        if confidence > 0:
            total = probs.sum(0)
            share = probs.amax(0) / torch.where(total > 0, total, torch.ones_like(total))
            label[(share < confidence).numpy()] = ignore_index
        h, w = self.image_size
        if label.shape != (h, w):
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
            # nearest upsampling can spill a work-resolution pixel over a user box's edge
            for k, mask in self._user_masks.items():
                label[(label == self.class_indices[k] + 1) & ~mask] = 0
        return label


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
    """

    def __init__(self, clip: FrozenClip, vocabulary: str | Vocabulary | Sequence[str] = "voc", decoder=None,
                 device=None, max_side: int = 512, background: Sequence[str] | None = None):
        if not isinstance(max_side, int) or max_side < clip.patch_size:
            raise ValueError(f"max_side must be an integer ≥ {clip.patch_size}, got {max_side!r}")
        self.device = pick_device(device)
        self.clip = clip.to(self.device)
        self.vocabulary = get_vocabulary(vocabulary, background)
        self.max_side = max_side
        self.decoder = None
        if decoder is not None:
            from .decoder import check_compatible

            check_compatible(decoder, clip.width, clip.num_blocks)
            self.decoder = decoder.to(self.device).eval()
        self._lock = threading.RLock()
        self._image = None

    @property
    def num_blocks(self) -> int:
        return self.clip.num_blocks

    # ------------------------------------------------------------ stages 1–3

    def set_image(self, image, labels: Sequence[str | int]) -> None:
        """Run the frozen CLIP (and decoder) on an image and compute the initial CAM of ``labels``.

        image: (H, W, 3) uint8 RGB (grey, RGBA and 16-bit arrays, PIL images and paths are converted).
        labels: class names (or prompt names) of the vocabulary, or 0-based vocabulary indices.
        """
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        p = self.clip.patch_size
        if min(h, w) < p:
            raise ImageError(f"image is {w}×{h} pixels; each side must be at least one {p}-pixel patch")
        indices = self._resolve_labels(labels)
        net = network_size((h, w), self.max_side, p)
        work = work_size((h, w), self.max_side)
        with self._lock, torch.no_grad():
            x = to_tensor(resize_image(rgb, net), self.clip.mean, self.clip.std, self.device)
            blocks = forward_blocks(self.clip, x)
            patch_tokens = torch.stack([t[:, 1:] for t in blocks.tokens])  # (N − 1, 1, hw, D): decoder input
            self._image = {
                "size": (h, w), "grid": blocks.grid, "work_image": resize_image(rgb, work),
                "last_input": blocks.tokens[-1][0], "attn": blocks.attn, "patch_tokens": patch_tokens,
                "aff_f": _decoder_affinity(self.decoder, patch_tokens, blocks.grid),
            }
            self._set_labels(indices)

    def set_labels(self, labels: Sequence[str | int]) -> None:
        """Change the image's classes without rerunning the backbone (only the last block runs again)."""
        if self._image is None:
            raise RuntimeError("call set_image first")
        indices = self._resolve_labels(labels)
        with self._lock:
            self._set_labels(indices)

    def attention_rows(self, x: float, y: float) -> AttentionRows:
        """Attention rows of the patch under image pixel (x, y), for every block and for A_f."""
        st = self._image
        if st is None or "attn_all" not in st:
            raise RuntimeError("call set_image first")
        (height, width), (h, w) = st["size"], st["grid"]
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"pixel ({x}, {y}) is outside the {width}×{height} image")
        r, c = min(int(y * h / height), h - 1), min(int(x * w / width), w - 1)
        i = r * w + c
        aff_f = st["aff_f"]
        return AttentionRows(patch=(r, c), layers=_np(st["attn_all"][:, i]).reshape(-1, h, w),
                             decoder=None if aff_f is None else _np(aff_f[i]).reshape(h, w))

    def adapt_decoder(self, steps: int = 60, params: RefineParams | None = None, callback=None, lr: float = 2e-3,
                      snapshot_every: int = 5, label_every: int = 5, switch_step: int | None = None,
                      seed: int = 0) -> list[AdaptSnapshot]:
        """Fit the decoder (a copy of the loaded one, or a fresh one) to the current image with WeCLIP's losses.

        Uses the cached tokens and attention: no CLIP pass. The pseudo label is remade every
        ``label_every`` steps from the static refinement until ``switch_step`` (default: half the
        steps) and from RFM with the decoder's current A_f after it, as in training. ``callback(step,
        steps, losses)`` reports progress. Returns snapshots of A_f for ``show_snapshot``, the first
        one (step 0) the state before adaptation; the adapted decoder replaces this predictor's (other
        predictors sharing the original keep theirs).
        """
        import copy

        from .decoder import Decoder, feature_affinity
        from .losses import make_optimizer, poly_warmup_lr, weclip_loss
        from .train import Crop, pseudo_label_of

        params = params or RefineParams()
        if self._image is None or "cams" not in self._image:
            raise RuntimeError("call set_image first")
        _integer("steps", steps, 1, "at least one optimisation step")
        st = self._image
        switch_step = steps // 2 if switch_step is None else switch_step
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
            decoder = decoder.to(self.device).train()
            optimizer = make_optimizer(decoder.parameters(), lr=lr)
            # the whole image as the training view: the same pseudo-label recipe as rfm train
            view = Crop(tokens=st["patch_tokens"], attn=st["attn_all"], cams=st["cams"], image=st["work_image"],
                        valid=np.ones(st["work_image"].shape[:2], bool), grid=st["grid"], labels=tuple(st["indices"]))
            before = st["aff_f"]
            history = [AdaptSnapshot(0, {}, None if before is None else before.cpu())]
            label = None
            for step in range(steps):
                logits, f_u = decoder(st["patch_tokens"], st["grid"])
                aff = feature_affinity(f_u)
                if label is None or step % label_every == 0 or step == switch_step:
                    with torch.no_grad():
                        label, _ = pseudo_label_of(view, aff[0].detach().float(), params, step >= switch_step)
                loss, losses = weclip_loss(logits, aff, label[None].to(logits.device), st["grid"])
                for group in optimizer.param_groups:
                    group["lr"] = poly_warmup_lr(step, lr, steps, warmup_steps=min(50, steps // 10))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (step + 1) % snapshot_every == 0 or step + 1 == steps:
                    with torch.no_grad():
                        decoder.eval()
                        after = _decoder_affinity(decoder, st["patch_tokens"], st["grid"])
                        decoder.train()
                    history.append(AdaptSnapshot(step + 1, losses, after.cpu()))
                if callback is not None:
                    callback(step + 1, steps, losses)
            self.decoder = decoder.eval()
            st["aff_f"] = _decoder_affinity(decoder, st["patch_tokens"], st["grid"])
        return history

    def show_snapshot(self, snapshot: AdaptSnapshot) -> None:
        """Make ``refine`` use the decoder affinity recorded at a step of ``adapt_decoder`` (replay)."""
        if self._image is None:
            raise RuntimeError("call set_image first")
        n = self._image["attn_all"].shape[-1]
        if snapshot.aff_f is not None and tuple(snapshot.aff_f.shape) != (n, n):
            raise ValueError("this snapshot belongs to another image")
        with self._lock:
            self._image["aff_f"] = None if snapshot.aff_f is None else snapshot.aff_f.to(self.device)

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

    def _set_labels(self, indices: list[int]) -> None:
        fg_all, bg = vocabulary_features(self.clip, self.vocabulary)
        cam = initial_cam(self.clip, self._image["last_input"], self._image["grid"], fg_all[indices], bg)
        self._image["indices"] = indices
        self._image["cams"] = cam.cams.float()
        self._image["attn_all"] = torch.cat([self._image["attn"], cam.attn_last[None].float()])  # (N, n, n)

    # ------------------------------------------------------------ stages 4–6

    def refine(self, params: RefineParams | None = None) -> Result:
        """Static refinement, RFM and PAR for the current image. Cheap: no CLIP forward."""
        params = params or RefineParams()
        if self._image is None:
            raise RuntimeError("call set_image first")
        with self._lock, torch.no_grad():
            return self._refine(params, self._image)

    def _refine(self, params: RefineParams, st: dict) -> Result:
        n_blocks = self.num_blocks
        for name, value in (("n0", params.n0), ("static_layers", params.static_layers)):
            if value > n_blocks:
                raise ValueError(f"{name}={value} but this CLIP has {n_blocks} blocks (allowed 1..{n_blocks})")
        indices = st["indices"]
        names = [self.vocabulary.class_names[i] for i in indices]
        (height, width), grid = st["size"], st["grid"]
        user_boxes = self._user_boxes(params.boxes, indices, (height, width))
        cams, attn, aff_f = st["cams"], st["attn_all"], st["aff_f"]

        auto = [rf.auto_boxes_from_cam(c, params.box_threshold) for c in cams.cpu()]
        box_mask = rf.masks_from_boxes(auto, grid).to(cams.device)
        for k, boxes in user_boxes.items():
            box_mask[k] = rf.boxes_to_patch_mask(boxes, (height, width), grid).to(box_mask.device)
        clip_mask = box_mask.clone()
        clip_mask[[k for k in range(len(indices)) if k not in user_boxes]] = True

        stages = refine_stages(cams, attn, aff_f, params, box_mask)
        cam_static = stages.static * clip_mask
        cam_rfm = None if stages.rfm is None else stages.rfm * clip_mask
        scores, keep, fallback = stages.scores, stages.keep, stages.fallback
        notes: list[str] = []
        if aff_f is None:
            notes.append("no decoder loaded: RFM needs the decoder's feature affinity A_f")
        elif fallback:
            notes.append(f"RFM kept no layer among {params.n0}..{n_blocks}; R uses the plain mean of those layers instead")

        work = st["work_image"]
        wh, ww = work.shape[:2]
        sy, sx = wh / height, ww / width
        inside = {k: rf.boxes_to_pixel_mask([(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes],
                                            (wh, ww)) for k, boxes in user_boxes.items()}
        probs = par_probs(work, cam_rfm if cam_rfm is not None else cam_static, params, inside)
        finite = scores[torch.isfinite(scores)]
        scale = (width / grid[1], height / grid[0])
        return Result(
            class_names=names, class_indices=list(indices), params=params, image_size=(height, width),
            patch=PatchMaps(_np(cams), _np(cam_static), None if cam_rfm is None else _np(cam_rfm)),
            box_mask=box_mask.cpu().numpy(),
            auto_boxes={n: [(x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]) for x0, y0, x1, y1 in b]
                        for n, b in zip(names, auto)},
            layer_scores=scores.double().cpu().numpy(), layer_keep=keep.cpu().numpy(),
            layer_threshold=float(finite.mean()) if len(finite) else float("nan"),
            rfm_fallback=fallback, notes=notes, probs=_np(probs),
            user_masks={k: rf.boxes_to_pixel_mask(b, (height, width)).numpy() for k, b in user_boxes.items()},
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
            if class_boxes:
                out.setdefault(indices.index(i), []).extend(tuple(float(v) for v in b) for b in class_boxes)
        return out

@dataclass
class RefinedCams:
    """Stages 4–5 on the patch grid."""

    static: torch.Tensor  # (K, h, w) CLIP-ES static refinement
    rfm: torch.Tensor | None  # (K, h, w) RFM refinement, None without A_f
    scores: torch.Tensor  # (N,) S^l, NaN outside N0..N or without A_f
    keep: torch.Tensor  # (N,) bool G^l
    fallback: bool  # no layer passed G^l


def refine_stages(cams: torch.Tensor, attn: torch.Tensor, aff_f: torch.Tensor | None, params: RefineParams,
                  box_mask: torch.Tensor) -> RefinedCams:
    """Static refinement and RFM of the initial CAMs.

    cams (K, h, w), attn (N, n, n) every block's attention, aff_f (n, n) decoder affinity or None,
    box_mask (K, h, w) the B_c of each class.
    """
    n_blocks = attn.shape[0]
    static = rf.propagate_cams(rf.transition_matrix(rf.static_affinity(attn, params.static_layers), params.alpha),
                               cams, box_mask)
    if aff_f is None:
        return RefinedCams(static, None, torch.full((n_blocks,), float("nan")),
                           torch.zeros(n_blocks, dtype=torch.bool), False)
    scores = rf.layer_scores(aff_f, attn, params.n0, params.distance)
    keep = rf.layer_gates(scores, params.distance)
    r, fallback = rf.rfm_affinity(aff_f, attn, keep, params.n0)
    rfm = rf.propagate_cams(rf.transition_matrix(r, params.alpha), cams, box_mask)
    return RefinedCams(static, rfm, scores, keep, fallback)


def par_probs(image: np.ndarray, cams: torch.Tensor, params: RefineParams,
              inside: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """[bg; CAMs] at the image's resolution refined by PAR: (1 + K, H, W).

    image (H, W, 3) uint8; cams (K, h, w) patch-grid CAMs, resized bilinearly (cv2, as CLIP-ES);
    background (1 − max CAM)^p; ``inside`` {k: (H, W) bool} confines class k before and after PAR
    (PAR propagates across a box edge; a user box is a hard limit).
    """
    h, w = image.shape[:2]
    maps = torch.from_numpy(np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
                                      for m in _np(cams)])).to(cams.device)
    inside = {k: m.to(maps.device) for k, m in (inside or {}).items()}
    for k, mask in inside.items():
        maps[k] *= mask
    maps = maps.clamp(0, 1)
    probs = par_refine(image, torch.cat([background_score(maps, params.bg_power), maps]),
                       iterations=params.par_iterations)
    for k, mask in inside.items():
        probs[1 + k] *= mask
    return probs


def _decoder_affinity(decoder, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
    """A_f (n, n) of a decoder for the cached tokens (N − 1, 1, n, D), or None without a decoder."""
    if decoder is None:
        return None
    from .decoder import feature_affinity

    return feature_affinity(decoder.fused_features(patch_tokens, grid))[0].float()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
