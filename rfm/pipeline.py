"""The pipeline core: ``ImageFeatures`` (everything stages 1–3 produce) and the pure stage functions.

``encode_image`` is the one place where stages 1–3 are assembled (backbone, initial CAM, decoder
affinity, PAR's pixel affinity); ``refine_stages``, ``par_probs`` and ``pseudo_label`` consume the
features; ``decoder_step`` is the one decoder optimisation step. The predictor (interactive use),
the trainer and the dataset tools are thin layers over these functions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch

from . import refine as rf
from .backbone import FrozenClip, forward_blocks, network_size, resize_image, to_tensor, work_size
from .cam import initial_cam
from .constants import IGNORE_INDEX
from .decoder import Decoder, feature_affinity
from .losses import RADIUS, weclip_loss
from .par import background_score, image_affinity, par_refine
from .par import pseudo_label as argmax_label
from .params import RefineParams


@dataclass(frozen=True)
class ImageFeatures:
    """Stages 1–3 of one image (or one training view): the cache every refinement reads.

    n = h·w patches, N blocks, D the CLIP width, K the image's classes, (H', W') the work size.
    """

    size: tuple[int, int]  # (H, W) of the image as given
    grid: tuple[int, int]  # (h, w) patch grid
    work_image: np.ndarray  # (H', W', 3) uint8: the pixels PAR and the pseudo label are computed at
    patch_tokens: torch.Tensor  # (N − 1, 1, n, D) patch tokens after blocks 1..N−1: the decoder's input
    last_input: torch.Tensor | None  # (1 + n, D) input of block N (CLS first), to remake CAMs for other classes
    attn: torch.Tensor  # (N, n, n) every block's head-averaged attention A_s^l, CLS dropped
    class_indices: tuple[int, ...]  # the K vocabulary indices the CAMs are of
    cams: torch.Tensor  # (K, h, w) initial CAMs M_init in [0, 1]
    aff_f: torch.Tensor | None  # (n, n) decoder affinity A_f = sigmoid(F_uᵀF_u), None without a decoder
    par_affinity: torch.Tensor | None  # (8·len(dilations), H', W') PAR's pixel affinity of work_image; None: PAR makes it
    valid: np.ndarray | None = None  # (H', W') bool, False on padding of a training crop; None: all valid

    @property
    def num_blocks(self) -> int:
        return self.attn.shape[0]


def encode_image(clip: FrozenClip, image: np.ndarray, class_indices: Sequence[int],
                 text: tuple[torch.Tensor, torch.Tensor], decoder: Decoder | None = None,
                 max_side: int | None = None, valid: np.ndarray | None = None, par_affinity: bool = True,
                 size: tuple[int, int] | None = None) -> ImageFeatures:
    """Stages 1–3 of an image: one backbone pass, the CLIP-ES initial CAM of ``class_indices``, A_f, PAR affinity.

    image (H, W, 3) uint8 RGB; text = (class features (V, E) of the whole vocabulary, background (B, E)).
    ``max_side``: the CLIP-ES resize rule (network input ceil(side·s/16)·16, PAR at the image scaled
    to max_side); None feeds the image as it is (a training crop whose sides are multiples of the patch).
    ``par_affinity=False`` skips PAR's affinity for features that will not be refined here (a feature cache).
    ``size``: the (H, W) of the full image when ``image`` holds reduced pixels of it (a JPEG decoded
    reduced); both resizes then start from those pixels, and results are at ``size``.
    """
    h, w = size or image.shape[:2]
    if max_side is None:
        net, work = (h, w), (h, w)
    else:
        net, work = network_size((h, w), max_side, clip.patch_size), work_size((h, w), max_side)
    with torch.no_grad():
        blocks = forward_blocks(clip, to_tensor(resize_image(image, net), clip.mean, clip.std, clip.device))
        patch_tokens = torch.stack([t[:, 1:] for t in blocks.tokens])
        last_input = blocks.tokens[-1][0]
        cams, attn_last = _initial_cams(clip, last_input, blocks.grid, class_indices, text)
        work_image = resize_image(image, work)
        return ImageFeatures(
            size=(h, w), grid=blocks.grid, work_image=work_image, patch_tokens=patch_tokens, last_input=last_input,
            attn=torch.cat([blocks.attn, attn_last[None]]), class_indices=tuple(int(i) for i in class_indices),
            cams=cams, aff_f=decoder_affinity(decoder, patch_tokens, blocks.grid),
            par_affinity=image_affinity(work_image, device=clip.device) if par_affinity else None, valid=valid)


def with_classes(clip: FrozenClip, features: ImageFeatures, class_indices: Sequence[int],
                 text: tuple[torch.Tensor, torch.Tensor]) -> ImageFeatures:
    """The features with the initial CAMs (and block N's attention) of other classes: only block N reruns."""
    if features.last_input is None:
        raise ValueError("these features keep no block-N input (a cached training view): classes cannot change")
    cams, attn_last = _initial_cams(clip, features.last_input, features.grid, class_indices, text)
    return replace(features, class_indices=tuple(int(i) for i in class_indices), cams=cams,
                   attn=torch.cat([features.attn[:-1], attn_last[None]]))


def _initial_cams(clip: FrozenClip, last_input: torch.Tensor, grid: tuple[int, int], class_indices: Sequence[int],
                  text: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cams (K, h, w), block N's attention (n, n)); block N's attention does not depend on the classes."""
    fg_all, bg = text
    cam = initial_cam(clip, last_input, grid, fg_all[list(class_indices)], bg)
    return cam.cams.float(), cam.attn_last.float()


@torch.no_grad()
def decoder_affinity(decoder: Decoder | None, patch_tokens: torch.Tensor, grid: tuple[int, int]
                     ) -> torch.Tensor | None:
    """A_f (n, n) of a decoder in eval mode for patch tokens (N − 1, 1, n, D); None without a decoder.

    The decoder's own train/eval mode is restored: it may be shared with a training loop.
    """
    if decoder is None:
        return None
    was_training = decoder.training
    try:
        return feature_affinity(decoder.eval().fused_features(patch_tokens, grid))[0].float()
    finally:
        decoder.train(was_training)


# ---------------------------------------------------------------- stages 4–6


@dataclass
class RefinedCams:
    """Stages 4–5 on the patch grid."""

    static: torch.Tensor  # (K, h, w) CLIP-ES static refinement
    rfm: torch.Tensor | None  # (K, h, w) RFM refinement, None without A_f
    scores: torch.Tensor  # (N,) S^l, NaN outside N0..N or without A_f
    keep: torch.Tensor  # (N,) bool G^l
    fallback: bool  # no layer passed G^l

    @property
    def final(self) -> torch.Tensor:
        """(K, h, w) the CAMs PAR refines: RFM's when there is a decoder, else the static refinement."""
        return self.static if self.rfm is None else self.rfm


def refine_stages(features: ImageFeatures, params: RefineParams, box_mask: torch.Tensor,
                  shared: dict | None = None) -> RefinedCams:
    """Static refinement (CLIP-ES) and RFM (WeCLIP Eq. 5–7) of the features' initial CAMs.

    box_mask (K, h, w): the B_c of each class. Uses features.aff_f; without it only the static one.
    shared: a dict the caller keeps while refining the same features many times (a sweep): settings
    with the same attention average (static_layers) or RFM layer choice (n0, distance) reuse its T₁.
    """
    params.check_blocks(features.num_blocks)
    attn, cams, aff_f = features.attn, features.cams, features.aff_f
    shared = {} if shared is None else shared
    n_blocks = attn.shape[0]
    static_key = ("static", params.static_layers)
    if static_key not in shared:
        shared[static_key] = rf.transition_base(rf.static_affinity(attn, params.static_layers))
    static = rf.propagate_cams(shared[static_key], cams, box_mask, params.alpha)
    if aff_f is None:
        return RefinedCams(static, None, torch.full((n_blocks,), float("nan")),
                           torch.zeros(n_blocks, dtype=torch.bool), False)
    rfm_key = ("rfm", params.n0, params.distance)
    if rfm_key not in shared:
        scores = rf.layer_scores(aff_f, attn, params.n0, params.distance)
        keep = rf.layer_gates(scores, params.distance)
        r, fallback = rf.rfm_affinity(aff_f, attn, keep, params.n0)
        shared[rfm_key] = scores, keep, rf.transition_base(r), fallback
    scores, keep, base, fallback = shared[rfm_key]
    rfm = rf.propagate_cams(base, cams, box_mask, params.alpha)
    return RefinedCams(static, rfm, scores, keep, fallback)


def par_probs(features: ImageFeatures, cams: torch.Tensor, params: RefineParams,
              inside: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """[bg; CAMs] at the work resolution refined by PAR: (1 + K, H', W').

    cams (K, h, w) patch-grid CAMs, resized bilinearly (cv2, as CLIP-ES); background (1 − max CAM)^p;
    ``inside`` {k: (H', W') bool} confines class k before and after PAR (PAR propagates across a box
    edge; a user box is a hard limit). PAR reuses the features' pixel affinity when they hold one.
    """
    h, w = features.work_image.shape[:2]
    maps = torch.from_numpy(np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
                                      for m in cams.detach().float().cpu().numpy()])).to(cams.device)
    inside = {k: m.to(maps.device) for k, m in (inside or {}).items()}
    for k, mask in inside.items():
        maps[k] *= mask
    maps = maps.clamp(0, 1)
    probs = par_refine(features.work_image, torch.cat([background_score(maps, params.bg_power), maps]),
                       iterations=params.par_iterations, affinity=features.par_affinity)
    for k, mask in inside.items():
        probs[1 + k] *= mask
    return probs


def pseudo_label(features: ImageFeatures, params: RefineParams, use_rfm: bool = True) -> tuple[torch.Tensor, float]:
    """The training pseudo label of a view: automatic boxes → static or RFM refinement → PAR → argmax.

    Returns ((H', W') long: 0 background, vocabulary index + 1, IGNORE_INDEX on padding; the fraction
    of candidate layers RFM kept, NaN without A_f).
    """
    box_mask = rf.box_masks(features.cams, params.box_threshold)
    stages = refine_stages(features, params, box_mask)
    cams = stages.final if use_rfm else stages.static
    label = argmax_label(par_probs(features, cams, params), list(features.class_indices))
    if features.valid is not None:
        label[torch.from_numpy(~features.valid).to(label.device)] = IGNORE_INDEX
    kept = float(stages.keep[params.n0 - 1:].float().mean()) if features.aff_f is not None else float("nan")
    return label, kept


# ---------------------------------------------------------------- decoder training


@dataclass
class StepOutput:
    losses: dict  # {"total", "seg", "aff"} averaged over the views (floats)
    labels: list[torch.Tensor]  # the pseudo label each view was trained on
    kept_fraction: float  # mean fraction of candidate layers RFM kept (NaN when none was computed)


def decoder_loss(decoder: Decoder, views: Sequence[ImageFeatures], params: RefineParams, use_rfm: bool,
                 aff_radius: int = RADIUS, labels: Sequence[torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, StepOutput]:
    """WeCLIP's loss (REFERENCE §4) averaged over views: balanced CE on the decoder's logits + 0.1 × the
    affinity loss on its A_f, against pseudo labels made from its own detached A_f (static refinement
    unless ``use_rfm``), or against ``labels`` when given (e.g. kept from an earlier step)."""
    total, parts, made, kept = 0.0, {"seg": 0.0, "aff": 0.0}, [], []
    for i, view in enumerate(views):
        logits, f_u = decoder(view.patch_tokens, view.grid)
        aff = feature_affinity(f_u)  # (1, n, n)
        if labels is None:
            with torch.no_grad():
                label, fraction = pseudo_label(replace(view, aff_f=aff[0].detach().float()), params, use_rfm)
            kept.append(fraction)
        else:
            label = labels[i]
        loss, logs = weclip_loss(logits, aff, label[None].to(logits.device), view.grid, radius=aff_radius)
        total = total + loss / len(views)
        for k in parts:
            parts[k] += logs[k] / len(views)
        made.append(label)
    finite = [k for k in kept if not np.isnan(k)]
    return total, StepOutput(losses={"total": float(total.detach()), **parts}, labels=made,
                             kept_fraction=float(np.mean(finite)) if finite else float("nan"))


def decoder_step(decoder: Decoder, optimizer: torch.optim.Optimizer, views: Sequence[ImageFeatures],
                 params: RefineParams, use_rfm: bool, lr: float, aff_radius: int = RADIUS,
                 labels: Sequence[torch.Tensor] | None = None) -> StepOutput:
    """One optimisation step of ``rfm train`` and of ``Predictor.adapt_decoder``: ``decoder_loss`` in
    train mode, backward, AdamW step at learning rate ``lr``."""
    loss, out = decoder_loss(decoder.train(), views, params, use_rfm, aff_radius, labels)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out
