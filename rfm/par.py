"""Pixel-adaptive refinement (PAR) of AFA, as used by WeCLIP (REFERENCE §3.5–3.6).

Every pixel i looks at K = 8·len(dilations) neighbours j: the 8 pixels at offsets
(±d, ±d), (0, ±d), (±d, 0) for each dilation d, with replicate padding at the border (so a
neighbour outside the image is the nearest border pixel). The centre is never its own neighbour.

    κ_rgb(i, j) = −mean_ch ( |I_j − I_i| / (σ_K(I)(i) + ε) / w1 )²     σ_K: unbiased std of the
                                                                        K neighbour values of i
    κ_pos(j)    = −( δ_j / (σ(δ) + ε) / w1 )²                          δ_j = d or √2·d
    a_ij        = softmax_K(κ_rgb)(i, j) + w2 · softmax_K(κ_pos)(j)    (rows sum to 1 + w2)
    M_c(i)     ← Σ_j a_ij M_c(j)                                        repeated `iterations` times

Because κ_rgb divides by the local std, it is invariant to a per-channel affine change of the
image intensities (up to ε): uint8, [0, 1] or mean/std-normalised images give the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks

__all__ = [
    "W1",
    "W2",
    "EPS",
    "DEFAULT_DILATIONS",
    "neighbour_offsets",
    "neighbour_distances",
    "local_std",
    "rgb_logits",
    "position_logits",
    "pixel_affinity",
    "image_affinity",
    "propagate",
    "par_refine",
    "background_score",
    "pseudo_label",
]

W1 = 0.3  # bandwidth of both the colour and the position kernel (AFA reuses one value)
W2 = 0.01  # weight of the position kernel; makes every affinity row sum to 1 + W2
EPS = 1e-8  # keeps a flat neighbourhood (std 0) finite: all its logits become equal
DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)

# The 8 directions of a 3×3 stencil without its centre, row-major (AFA's kernel order).
_DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the K = 8·len(dilations) neighbours: d·(±1|0, ±1|0) minus the centre."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _DIRECTIONS]


def neighbour_distances(dilations: Sequence[int]) -> Tensor:
    """δ_j: d for an axial neighbour, √2·d for a diagonal one. Returns (K,) float32."""
    return torch.tensor(
        [d * math.hypot(dy, dx) for d in dilations for dy, dx in _DIRECTIONS], dtype=torch.float32
    )


def _neighbour_views(x_chw: Tensor, offsets: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The K shifted copies x(i + o_k) as (C, H, W) views, replicate-clamped at the border.

    One padding by the largest offset serves every dilation: replicate padding by D ≥ d gives
    the same clamped value at offset d as padding by d would.
    """
    _, h, w = x_chw.shape
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x_chw.unsqueeze(0), (pad, pad, pad, pad), mode="replicate")[0]
    return [padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets]


def local_std(views: Sequence[Tensor]) -> Tensor:
    """σ_K(x)(i) = sqrt(Σ_j (x_j − x̄)² / (K − 1)), the unbiased std of the K neighbour values.

    Two passes (mean, then squared deviations) so that flat regions do not suffer the
    cancellation of E[x²] − E[x]². K views of (C, H, W) → (C, H, W).
    """
    mean = views[0].clone()
    for view in views[1:]:
        mean.add_(view)
    mean.div_(len(views))
    sq_dev = torch.zeros_like(mean)
    for view in views:
        dev = view - mean
        sq_dev.addcmul_(dev, dev)
    return sq_dev.div_(len(views) - 1).sqrt_()


def rgb_logits(image_3hw: Tensor, dilations: Sequence[int]) -> Tensor:
    """κ_rgb(i, j) = −mean_ch (|I_j − I_i| / (σ_K(I)(i) + ε) / w1)². (3, H, W) → (K, H, W).

    σ_K is taken over the neighbour values themselves, not over the differences.
    """
    views = _neighbour_views(image_3hw, neighbour_offsets(dilations))
    inv_scale_3hw = local_std(views).add_(EPS).mul_(W1).reciprocal_()
    logits_khw = image_3hw.new_empty((len(views), *image_3hw.shape[1:]))
    for j, view in enumerate(views):
        z_3hw = (view - image_3hw).mul_(inv_scale_3hw)  # the square makes |·| unnecessary
        torch.sum(z_3hw.square_(), dim=0, out=logits_khw[j])
    return logits_khw.mul_(-1.0 / image_3hw.shape[0])


def position_logits(dilations: Sequence[int]) -> Tensor:
    """κ_pos(j) = −(δ_j / (σ(δ) + ε) / w1)², σ the unbiased std over the K distances. → (K,)."""
    dist_k = neighbour_distances(dilations)
    return -(dist_k / (dist_k.std() + EPS) / W1).square()


def pixel_affinity(image_3hw: Tensor, dilations: Sequence[int]) -> Tensor:
    """a_ij = softmax_K(κ_rgb)(i, j) + w2 · softmax_K(κ_pos)(j). (3, H, W) → (K, H, W)."""
    affinity_khw = torch.softmax(rgb_logits(image_3hw, dilations), dim=0)
    position_k = torch.softmax(position_logits(dilations), dim=0).to(affinity_khw)
    return affinity_khw.add_(W2 * position_k[:, None, None])


def image_affinity(image, dilations: Sequence[int] = DEFAULT_DILATIONS, device=None) -> Tensor:
    """``pixel_affinity`` of an image in any form ``par_refine`` accepts → (K, H, W) float32 on ``device``.

    It depends on the image alone: an interactive caller makes it once and passes it to every
    ``par_refine(..., affinity=)``.
    """
    return pixel_affinity(_image_tensor(image, torch.device(device or "cpu")), _check_dilations(dilations))


def propagate(probs_chw: Tensor, affinity_khw: Tensor, dilations: Sequence[int]) -> Tensor:
    """One step M_c(i) ← Σ_j a_ij M_c(j) for all channels at once. (C, H, W) → (C, H, W).

    Accumulates K shifted slices instead of materialising a (K, C, H, W) stack: the same
    arithmetic with C·H·W of extra memory instead of K·C·H·W.
    """
    views = _neighbour_views(probs_chw, neighbour_offsets(dilations))
    out_chw = torch.mul(affinity_khw[0], views[0])
    for a_hw, view in zip(affinity_khw[1:], views[1:]):
        out_chw.addcmul_(a_hw, view)
    return out_chw


def _image_tensor(image, device: torch.device) -> Tensor:
    """An RGB image as a (3, H, W) float32 tensor on `device`.

    Accepts an (H, W, 3) numpy array or a (3, H, W) / (1, 3, H, W) tensor. uint8 is scaled by
    1/255 (AFA's input range); the result does not depend on it beyond ε (see module docstring).
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image as a numpy array must be (H, W, 3) RGB, got shape {image.shape}")
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    elif isinstance(image, Tensor):
        tensor = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(
                f"image as a tensor must be (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}"
            )
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"image must hold real intensities, got dtype {tensor.dtype}")
    scale = 1.0 / 255.0 if tensor.dtype == torch.uint8 else 1.0
    tensor = tensor.to(device=device, dtype=torch.float32) * scale
    if not torch.isfinite(tensor).all():
        raise ValueError("image contains NaN or infinite values")
    return tensor


def _probs_tensor(probs) -> Tensor:
    """probs as a (C, H, W) float32 tensor, on its own device (numpy → CPU)."""
    if isinstance(probs, np.ndarray):
        probs = torch.from_numpy(np.array(probs))
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a torch tensor or a numpy array, got {type(probs).__name__}")
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (C, H, W) with C ≥ 1, got shape {tuple(probs.shape)}")
    probs = probs.to(torch.float32)
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinite values")
    return probs


def _check_dilations(dilations) -> tuple[int, ...]:
    dilations = tuple(dilations)
    if not dilations:
        raise ValueError("dilations must not be empty")
    return tuple(checks.integer("dilations", d, 1) for d in dilations)


@torch.no_grad()
def par_refine(image, probs, iterations: int = 20, dilations: Sequence[int] = DEFAULT_DILATIONS,
               affinity: Tensor | None = None) -> Tensor:
    """Refine class maps with PAR: `iterations` steps of M ← A·M over image-adaptive affinities.

    image: (H, W, 3) numpy RGB (uint8 or float) or a (3, H, W) / (1, 3, H, W) tensor.
    probs: (C, H, W) tensor or numpy array at the image's size, e.g. [bg; class CAMs].
    affinity: the image's ``pixel_affinity`` (K, H, W) for these dilations when already computed
    (it depends on the image alone, so an interactive caller computes it once per image).
    Returns (C, H, W) float32 on probs' device (the image is moved there). Rows of the affinity
    sum to 1 + W2, so the maps grow by (1 + W2)^iterations; the argmax over C is unaffected.
    iterations = 0 returns probs as float32, unchanged. Not differentiable (runs under no_grad).
    """
    iterations = checks.integer("iterations", iterations, 0)
    dilations = _check_dilations(dilations)
    probs_chw = _probs_tensor(probs)
    image_3hw = _image_tensor(image, probs_chw.device)
    if image_3hw.shape[1:] != probs_chw.shape[1:]:
        raise ValueError(
            f"image is {image_3hw.shape[1]}×{image_3hw.shape[2]} (H×W) but probs are "
            f"{probs_chw.shape[1]}×{probs_chw.shape[2]}; resize probs to the image size first"
        )
    if iterations == 0:
        return probs_chw.clone()  # never alias the caller's tensor or numpy buffer
    if affinity is None:
        affinity_khw = pixel_affinity(image_3hw, dilations)
    else:
        affinity_khw = affinity.to(probs_chw.device, torch.float32)
        if tuple(affinity_khw.shape) != (8 * len(dilations), *probs_chw.shape[1:]):
            raise ValueError(f"affinity must be (8·len(dilations), H, W) = {(8 * len(dilations), *probs_chw.shape[1:])}, "
                             f"got {tuple(affinity.shape)}")
    for _ in range(iterations):
        probs_chw = propagate(probs_chw, affinity_khw, dilations)
    return probs_chw


def background_score(cams: Tensor, power: float = 1.0) -> Tensor:
    """bg = (1 − max_c cam_c)^p (REFERENCE §2.5, §3.5; WeCLIP uses p = 1). (K, H, W) → (1, H, W).

    CAM values are clipped to [0, 1] first so that a slight overshoot (e.g. from bicubic
    resizing) cannot produce a negative base. K = 0 is allowed: with no foreground class every
    pixel is background, so bg = 1 (the max over an empty set is taken as 0).
    """
    if not isinstance(cams, Tensor) or cams.ndim != 3:
        raise ValueError(f"cams must be a (K, H, W) tensor, got {getattr(cams, 'shape', type(cams))}")
    checks.positive("power", power)
    if cams.shape[0] == 0:
        return torch.ones((1, *cams.shape[1:]), dtype=torch.float32, device=cams.device)
    cams = cams.to(torch.float32)
    if torch.isnan(cams).any():
        raise ValueError("cams contains NaN values")
    max_hw = cams.clamp(0.0, 1.0).amax(dim=0, keepdim=True)
    return (1.0 - max_hw).pow(power)


def pseudo_label(probs: Tensor, class_ids: Sequence[int]) -> Tensor:
    """label(i) = 0 if argmax_c probs_c(i) = 0 (background), else class_ids[argmax − 1] + 1.

    probs: (1 + K, H, W), channel 0 the background; class_ids: the K 0-based vocabulary indices
    of the other channels. Returns (H, W) int64 (0 = background, vocab index + 1 otherwise).
    Ties go to the lowest channel, so background wins a tie.
    """
    if not isinstance(probs, Tensor) or probs.ndim != 3:
        raise ValueError(f"probs must be a (1 + K, H, W) tensor, got {getattr(probs, 'shape', type(probs))}")
    class_ids = [int(c) for c in class_ids]
    if probs.shape[0] != len(class_ids) + 1:
        raise ValueError(
            f"probs has {probs.shape[0]} channels but {len(class_ids)} class ids were given "
            f"(expected channels = 1 background + one per class)"
        )
    if any(c < 0 for c in class_ids):
        raise ValueError(f"class ids must be ≥ 0, got {class_ids}")
    lookup = torch.tensor([0] + [c + 1 for c in class_ids], dtype=torch.int64, device=probs.device)
    # argmax over a contiguous last axis: torch's argmax over the leading axis is ~10× slower on CPU
    return lookup[probs.movedim(0, -1).contiguous().argmax(dim=-1)]
