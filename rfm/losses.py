"""Training losses and learning-rate schedule of the WeCLIP decoder (REFERENCE §3.7, §4.2–4.3).

    L_seg = ½·CE_bg + ½·CE_fg                      bg/fg-balanced cross-entropy on the pseudo label
    L_aff = ½·Σ_pos (1 − A_f)/(N_pos + 1) + ½·Σ_neg A_f/(N_neg + 1)
    L     = L_seg + 0.1·L_aff                        from the first iteration on

The pseudo label is (B, H, W) with 0 = background, 1..C−1 = classes and IGNORE_INDEX = ignore.
The decoder works on an (h, w) token grid (h = H/16 for ViT-B/16); its logits are (B, C, h, w)
and its feature affinity A_f = sigmoid(F_uᵀF_u) is (B, n, n) with n = h·w in row-major order.

Optimisation: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01), decoder lr 2e-4 × 10,
50 linear warm-up steps from ratio 1e-6, then poly decay with power 1 (`poly_warmup_lr`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "AFF_WEIGHT",
    "RADIUS",
    "balanced_cross_entropy",
    "affinity_label",
    "affinity_loss",
    "weclip_loss",
    "poly_warmup_lr",
    "make_optimizer",
]

IGNORE_INDEX = 255
AFF_WEIGHT = 0.1  # weight of L_aff in the total loss
RADIUS = 8  # half-width of the affinity window on the token grid (20×20 for a 320 crop)


def _accumulation_dtype(x: Tensor) -> Tensor:
    """x in float32 when it is half precision, else unchanged.

    The losses sum up to B·H·W (or B·n²) terms: a float16 sum of ~10⁶ CE values overflows
    (max 65504), so half-precision inputs are promoted, as autocast does for losses.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_integer_label(name: str, label: Tensor) -> None:
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {label.dtype}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_mask values / |mask|, and 0 when the mask is empty (where an empty mean would be NaN)."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def balanced_cross_entropy(logits: Tensor, label: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """L_seg = ½·mean_{label=0} CE + ½·mean_{0<label≠ignore} CE, on logits upsampled to the label.

    CE(p) = −log softmax(up(logits))[label(p)] with up = bilinear, align_corners=False, to (H, W).
    Each half is a mean over its own pixels (all images of the batch together), so a small
    foreground weighs as much as a large background. A half with no pixels contributes 0
    instead of NaN: an all-background label gives L = ½·CE_bg, an all-foreground label
    ½·CE_fg, and an all-ignore label L = 0 (with a zero gradient).

    logits (B, C, h, w) float; label (B, H, W) integer in [0, C) ∪ {ignore_index}.
    Returns a scalar (float32 for half-precision logits, else the logits' dtype).
    """
    if logits.dim() != 4 or label.dim() != 3:
        raise ValueError(
            "expected logits (B, C, h, w) and label (B, H, W), "
            f"got {tuple(logits.shape)} and {tuple(label.shape)}"
        )
    if logits.shape[0] != label.shape[0]:
        raise ValueError(f"batch sizes differ: logits {logits.shape[0]}, label {label.shape[0]}")
    _check_integer_label("label", label)
    num_classes = logits.shape[1]
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} collides with a class index (C = {num_classes})")
    label = label.long().to(logits.device)
    if not ((label >= 0) & (label < num_classes) | (label == ignore_index)).all():
        raise ValueError(f"label values must lie in [0, {num_classes}) or equal ignore_index {ignore_index}")

    up_bchw = F.interpolate(
        _accumulation_dtype(logits), size=label.shape[-2:], mode="bilinear", align_corners=False
    )
    ce_bhw = F.cross_entropy(up_bchw, label, ignore_index=ignore_index, reduction="none")
    background = label == 0
    foreground = (label > 0) & (label != ignore_index)
    return 0.5 * _masked_mean(ce_bhw, background) + 0.5 * _masked_mean(ce_bhw, foreground)


def _window_mask(grid: tuple[int, int], radius: int, device: torch.device) -> Tensor:
    """(n, n) bool: |row_i − row_j| ≤ radius and |col_i − col_j| ≤ radius, i = r·w + c."""
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (n,) row of token i
    cols = torch.arange(w, device=device).repeat(h)  # (n,) column of token i
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def affinity_label(
    label: Tensor, grid: tuple[int, int], radius: int = RADIUS, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Y(i, j) = [l_i = l_j], or ignore_index if the pair is outside the window or l_i/l_j is ignored.

    l = the label downsampled to the (h, w) token grid by nearest neighbour (F.interpolate
    mode="nearest" on the float label, i.e. source index ⌊dst·H/h⌋), flattened row-major.
    The window is square (Chebyshev): a pair counts only if |Δrow| ≤ radius and |Δcol| ≤ radius
    on the grid. The diagonal (i = j) is a positive pair unless its token is ignored.

    label (B, H, W) integer → (B, n, n) long with n = h·w, values in {0, 1, ignore_index}.
    """
    if label.dim() != 3:
        raise ValueError(f"expected label (B, H, W), got {tuple(label.shape)}")
    _check_integer_label("label", label)
    if len(grid) != 2 or any(int(s) != s or s < 1 for s in grid):
        raise ValueError(f"grid must be two positive ints (h, w), got {grid}")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius}")
    if ignore_index in (0, 1):
        raise ValueError(f"ignore_index {ignore_index} collides with the affinity values 0/1")
    grid = (int(grid[0]), int(grid[1]))

    # float32 holds every label id exactly (< 2²⁴); nearest only copies values, never mixes them.
    tokens_bhw = F.interpolate(label[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    tokens_bn = tokens_bhw.flatten(1)
    same_bnn = tokens_bn[:, :, None] == tokens_bn[:, None, :]
    ignored_bn = tokens_bn == ignore_index
    dropped_bnn = ~_window_mask(grid, radius, label.device) | ignored_bn[:, :, None] | ignored_bn[:, None, :]
    return same_bnn.long().masked_fill(dropped_bnn, ignore_index)


def affinity_loss(aff: Tensor, aff_label: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """L_aff = ½·Σ_{Y=1} (1 − A_f)/(N_pos + 1) + ½·Σ_{Y=0} A_f/(N_neg + 1).

    An L1 pull of A_f towards 1 on positive pairs and towards 0 on negative ones (not BCE).
    The sums and the counts N_pos, N_neg run over the whole batch, not per image; the +1 keeps
    a batch without positive (or negative) pairs finite: that half is then 0, and an all-ignore
    label gives L_aff = 0.

    aff (B, n, n) = sigmoid(F_uᵀF_u) in (0, 1); aff_label (B, n, n) in {0, 1, ignore_index}.
    Returns a scalar (float32 for half-precision aff, else aff's dtype).
    """
    if aff.dim() != 3 or aff.shape != aff_label.shape:
        raise ValueError(
            "expected aff and aff_label of the same shape (B, n, n), "
            f"got {tuple(aff.shape)} and {tuple(aff_label.shape)}"
        )
    _check_integer_label("aff_label", aff_label)
    aff_label = aff_label.to(aff.device)
    positive = aff_label == 1
    negative = aff_label == 0
    if not (positive | negative | (aff_label == ignore_index)).all():
        raise ValueError(f"aff_label may only hold 0, 1 and ignore_index {ignore_index}")

    aff = _accumulation_dtype(aff)
    zero = torch.zeros_like(aff)
    pos_term = torch.where(positive, 1 - aff, zero).sum() / (positive.sum() + 1)
    neg_term = torch.where(negative, aff, zero).sum() / (negative.sum() + 1)
    return 0.5 * pos_term + 0.5 * neg_term


def weclip_loss(
    logits: Tensor,
    aff: Tensor,
    label: Tensor,
    grid: tuple[int, int],
    radius: int = RADIUS,
    aff_weight: float = AFF_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, dict[str, float]]:
    """L = L_seg + aff_weight·L_aff, L_seg = balanced_cross_entropy(logits, label),
    L_aff = affinity_loss(aff, affinity_label(label, grid, radius)).

    logits (B, C, h, w), aff (B, n, n) with n = h·w, label (B, H, W) pseudo label.
    Returns (L, {"seg", "aff", "total"} as Python floats for logging).
    """
    seg = balanced_cross_entropy(logits, label, ignore_index)
    aff_term = affinity_loss(aff, affinity_label(label, grid, radius, ignore_index), ignore_index)
    total = seg + aff_weight * aff_term
    return total, {"seg": seg.item(), "aff": aff_term.item(), "total": total.item()}


def poly_warmup_lr(
    step: int,
    base_lr: float,
    max_steps: int,
    warmup_steps: int = 50,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
) -> float:
    """Learning rate of the update with 0-based index `step` (PolyWarmupAdamW's global step).

        step < warmup_steps:   base_lr · (r + (1 − r)·step/warmup_steps)       r = warmup_ratio
        otherwise:             base_lr · max(0, 1 − step/max_steps)^power

    Reading of REFERENCE §4.3, as the official optimiser does it: the warm-up covers steps
    0 … warmup_steps − 1 and so stops one increment short of base_lr; the poly term counts the
    global step from 0, not from the end of the warm-up, so at step = warmup_steps it starts at
    base_lr·(1 − warmup_steps/max_steps), just below base_lr, with no jump back to base_lr.
    The last step (max_steps − 1) gets base_lr·(1/max_steps)^power; from max_steps on the
    rate is 0 (the official loop never gets there) rather than negative.
    """
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1], got {warmup_ratio}")
    if base_lr < 0 or power < 0:
        raise ValueError(f"base_lr and power must be non-negative, got {base_lr} and {power}")

    if step < warmup_steps:
        return base_lr * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps)
    return base_lr * max(0.0, 1.0 - step / max_steps) ** power


def make_optimizer(params: Iterable, lr: float = 2e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.999), eps=1e-8) for the fuse + decoder parameters.

    lr = 2e-3 is the official base rate 2e-4 times the ×10 of the decoder's param group. The
    schedule is applied by the caller: before each update set every group's "lr" to
    poly_warmup_lr(step, lr, max_steps).
    """
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
