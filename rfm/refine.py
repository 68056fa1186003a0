"""Refinement equations: CLIP-ES static refinement (CAA) and WeCLIP's Frozen CLIP CAM Refinement (RFM).

Everything lives on the patch grid (h, w) with n = h·w tokens in row-major order (token r·w + c).
An affinity or transition matrix is (n, n) with rows = targets i and columns = sources j, so a
refined map is T · vec(cam).

Static (CLIP-ES):  A = mean of the last 8 blocks' attention,  T = T₁^α with T₁ = sym(Sinkhorn(A)),
                   M_c = minmax((T ⊙ B_c) · vec(M_c)).
RFM (WeCLIP):      S^l, G^l, R = A_f/N_m ⊙ Σ_l G^l A_s^l (Eqs. 5-7), then the same T and the same
                   box-masked propagation (Eq. 8).

Functions are pure and return tensors on the device (and, for maps, the dtype) of their input.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

from . import checks
from .constants import DISTANCES

# CLIP-ES adds this to the denominator of its min-max normalisation.
MINMAX_EPS = 1e-7


# --------------------------------------------------------------------------- validation helpers


def _check_attn(attn: Tensor, aff_f: Tensor | None = None) -> int:
    """Number of blocks N of attn (N, n, n); aff_f, when given, must be (n, n)."""
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2] or attn.shape[0] < 1:
        raise ValueError(f"attn must be (N, n, n) with N >= 1, got {tuple(attn.shape)}")
    if aff_f is not None and tuple(aff_f.shape) != tuple(attn.shape[1:]):
        raise ValueError(f"aff_f must be {tuple(attn.shape[1:])} to match attn, got {tuple(aff_f.shape)}")
    return attn.shape[0]


def _check_size(name: str, size) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {size!r}")
    return checks.integer(f"{name} height", size[0], 1), checks.integer(f"{name} width", size[1], 1)


def _check_boxes(boxes, image_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) in pixels as floats; zero-area boxes and boxes off the image are errors."""
    height, width = image_size
    checked = []
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"box coordinates must be finite, got {box!r}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box!r} has zero area (need x0 < x1 and y0 < y1)")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"box {box!r} lies outside the {width}x{height} image")
        checked.append((x0, y0, x1, y1))
    return checked


def _nonzero(sums: Tensor) -> Tensor:
    """Zero sums replaced by 1: dividing an all-zero line by it keeps the line zero instead of NaN."""
    return torch.where(sums == 0, torch.ones_like(sums), sums)


# --------------------------------------------------------------------------- normalisation


def minmax_normalize(maps: Tensor) -> Tensor:
    """M ← (M − min M) / (max(M − min M) + 1e-7), per map (first axis), CLIP-ES's normalisation.

    maps: (K, ...). The epsilon makes a constant or all-zero map exactly 0, never NaN.
    """
    flat = maps.flatten(1)  # (K, m)
    shifted = flat - flat.amin(dim=1, keepdim=True)
    return (shifted / (shifted.amax(dim=1, keepdim=True) + MINMAX_EPS)).reshape(maps.shape)


def sinkhorn_normalize(aff: Tensor, rounds: int = 3) -> Tensor:
    """A ← A / (1ᵀA) then A ← A / (A1), repeated `rounds` times: columns first in every round.

    aff: (n, n), non-negative. The official code adds no epsilon; here an exactly-zero column or
    row sum is replaced by 1, so that line stays zero instead of turning the matrix into NaN.
    Any other input gives the official result unchanged.
    """
    rounds = checks.integer("rounds", rounds, 0)
    for _ in range(rounds):
        aff = aff / _nonzero(aff.sum(dim=0, keepdim=True))
        aff = aff / _nonzero(aff.sum(dim=1, keepdim=True))
    return aff


def symmetrize(t: Tensor) -> Tensor:
    """T ← (T + Tᵀ) / 2."""
    return (t + t.transpose(-2, -1)) / 2


def transition_base(aff: Tensor, rounds: int = 3) -> Tensor:
    """T₁ = sym(Sinkhorn(A)), the matrix whose α-th power propagates a CAM (CLIP-ES CAA; WeCLIP Eq. 8's R).

    aff: (n, n) -> (n, n). The power is never formed: ``propagate_cams`` applies T₁ α times.
    """
    return symmetrize(sinkhorn_normalize(aff, rounds))


# --------------------------------------------------------------------------- box masks


def auto_boxes_from_cam(cam: Tensor, threshold: float) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) on the patch grid from one CAM, as CLIP-ES's multi-contour scoremap2bbox.

    q = uint8(255·cam) (truncated); foreground iff q > ⌊λ·max q⌋ (cv2 THRESH_BINARY is strict);
    every contour of cv2.findContours(RETR_TREE), hole contours included, gives its boundingRect
    (x, y, w, h) → (x, y, min(x + w, w_grid − 1), min(y + h, h_grid − 1)).

    The boxes are meant for exclusive slicing [y0:y1, x0:x1]; with the clip, the last row and
    column of the grid are never covered, a CLIP-ES quirk kept on purpose. Degenerate boxes
    (x0 == x1 or y0 == y1) are returned as they come. No foreground → [].
    cam: (h, w) in [0, 1]; NaN counts as 0 and values are clipped to [0, 1] first, because
    casting an out-of-range float to uint8 is undefined.
    """
    threshold = checks.fraction("box threshold", threshold)
    if cam.dim() != 2:
        raise ValueError(f"cam must be (h, w), got {tuple(cam.shape)}")
    height, width = cam.shape
    scores = torch.nan_to_num(cam.detach(), nan=0.0).clamp(0, 1).cpu().numpy()
    # The product is taken in the CAM's own dtype, as CLIP-ES does, so edge values truncate alike.
    quantised = (scores * 255).astype(np.uint8)  # (h, w)
    level = int(threshold * quantised.max())
    _, foreground = cv2.threshold(quantised, level, 255, cv2.THRESH_BINARY)
    # [-2] picks the contours under both the 2- and the 3-value return of findContours.
    contours = cv2.findContours(foreground, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def _fill_boxes(mask: np.ndarray, boxes) -> np.ndarray:
    """mask[y0:y1, x0:x1] = True for every box (exclusive ends); mask: (h, w) bool, filled in place."""
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def box_mask_from_cam(cam: Tensor, threshold: float) -> Tensor:
    """B = ∪ boxes of auto_boxes_from_cam(cam, λ), filled as rows y0:y1, cols x0:x1.

    cam: (h, w) in [0, 1] -> (h, w) bool on cam's device; empty when the CAM has no foreground.
    """
    mask = np.zeros(tuple(cam.shape), dtype=bool)
    return torch.from_numpy(_fill_boxes(mask, auto_boxes_from_cam(cam, threshold))).to(cam.device)


def box_masks(cams: Tensor, threshold: float) -> Tensor:
    """B_c = box_mask_from_cam(M_c, λ) for every class. cams: (K, h, w) -> (K, h, w) bool."""
    if cams.dim() != 3:
        raise ValueError(f"cams must be (K, h, w), got {tuple(cams.shape)}")
    boxes = [auto_boxes_from_cam(cam, threshold) for cam in cams.detach().cpu()]  # one device transfer
    return masks_from_boxes(boxes, tuple(cams.shape[1:])).to(cams.device)


def masks_from_boxes(boxes_per_class, grid: tuple[int, int]) -> Tensor:
    """(K, h, w) bool: for each class the union of its patch-grid boxes (x0, y0, x1, y1), exclusive ends,
    as returned by :func:`auto_boxes_from_cam`."""
    masks = np.zeros((len(boxes_per_class), *grid), dtype=bool)
    for mask, boxes in zip(masks, boxes_per_class):
        _fill_boxes(mask, boxes)
    return torch.from_numpy(masks)


def boxes_to_patch_mask(boxes, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Patch-grid mask of user boxes given in original-image pixels.

    Patch (r, c) covers image rows [r·H/h, (r+1)·H/h) and columns [c·W/w, (c+1)·W/w); it is in
    the mask iff that cell overlaps some box (x0, y0, x1, y1) with positive area:
    r·H/h < y1 and (r+1)·H/h > y0, and likewise for columns.

    image_size: (H, W); grid: (h, w). Returns (h, w) bool on the CPU; no boxes → all False.
    Zero-area boxes and boxes entirely outside the image raise ValueError.
    """
    height, width = _check_size("image_size", image_size)
    rows, cols = _check_size("grid", grid)
    # Cell edges are compared after multiplying through by h (or w), so integer inputs stay exact.
    r = torch.arange(rows, dtype=torch.float64)
    c = torch.arange(cols, dtype=torch.float64)
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    for x0, y0, x1, y1 in _check_boxes(boxes, (height, width)):
        row_hit = (r * height < y1 * rows) & ((r + 1) * height > y0 * rows)  # (h,)
        col_hit = (c * width < x1 * cols) & ((c + 1) * width > x0 * cols)  # (w,)
        mask |= row_hit[:, None] & col_hit[None, :]
    return mask


def boxes_to_pixel_mask(boxes, image_size: tuple[int, int], rows: tuple[int, int] | None = None) -> Tensor:
    """Pixel mask of boxes: (y, x) is inside iff x0 ≤ x + ½ < x1 and y0 ≤ y + ½ < y1 for some box.

    Testing the pixel centre makes integer boxes behave as the slice [y0:y1, x0:x1] and gives
    fractional boxes a rounding-free meaning. image_size: (H, W) -> (H, W) bool Tensor on the CPU,
    or only rows ``start..stop`` of it (stop − start, W), so a mask of a huge image can be streamed.
    Zero-area boxes and boxes entirely outside the image raise ValueError.
    """
    height, width = _check_size("image_size", image_size)
    start, stop = (0, height) if rows is None else rows
    ys = torch.arange(start, stop, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    mask = torch.zeros((stop - start, width), dtype=torch.bool)
    for x0, y0, x1, y1 in _check_boxes(boxes, (height, width)):
        mask |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return mask


def covers_pixel_centre(box, image_size: tuple[int, int]) -> bool:
    """Whether a box holds at least one pixel centre (x + ½, y + ½) of an (H, W) image (see boxes_to_pixel_mask)."""
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in box)

    def hits(lo: float, hi: float, size: int) -> bool:
        first = max(0, math.ceil(lo - 0.5))  # the first centre index with index + ½ ≥ lo
        return first < size and first + 0.5 < hi

    return hits(x0, x1, width) and hits(y0, y1, height)


# --------------------------------------------------------------------------- propagation


def propagate_cams(base: Tensor, cams: Tensor, box_mask: Tensor, alpha: int = 1) -> Tensor:
    """M_c ← minmax((T ⊙ B_c) · vec(M_c)) with T = T₁^α, for every class c (CLIP-ES CAA; WeCLIP Eq. 8).

    B_c multiplies T as a row vector, so it zeroes columns: only sources j inside the boxes
    contribute, while every target i, inside the boxes or not, can receive mass. Because
    (T ⊙ B_c) · v = T₁^α · (B_c ⊙ v), all K classes share α products (K, n) × (n, n): α·K·n²
    multiply-adds instead of the (α − 1)·n³ of forming the matrix power. α is a matrix power
    (α = 2 → T₁·T₁), not elementwise, as in both official code bases; an integer ≥ 1 (2.0 is accepted).
    base: (n, n) T₁, cams: (K, h, w), box_mask: (K, h, w) bool -> (K, h, w) in cams' dtype.
    """
    alpha = checks.integer("alpha", alpha, 1)
    if cams.dim() != 3:
        raise ValueError(f"cams must be (K, h, w), got {tuple(cams.shape)}")
    k, h, w = cams.shape
    n = h * w
    if tuple(base.shape) != (n, n):
        raise ValueError(f"the transition matrix must be ({n}, {n}) for a {h}x{w} grid, got {tuple(base.shape)}")
    if tuple(box_mask.shape) != tuple(cams.shape):
        raise ValueError(f"box_mask must be {tuple(cams.shape)}, got {tuple(box_mask.shape)}")
    dtype = torch.promote_types(base.dtype, cams.dtype)
    refined = cams.reshape(k, n).to(dtype) * box_mask.reshape(k, n).to(cams.device, dtype)  # (K, n) sources
    base_t = base.to(cams.device, dtype).T
    for _ in range(alpha):
        refined = refined @ base_t  # (K, n): Σ_j T₁(i, j) · refined(j)
    return minmax_normalize(refined.reshape(k, h, w)).to(cams.dtype)


# --------------------------------------------------------------------------- affinities


def static_affinity(attn: Tensor, static_layers: int = 8) -> Tensor:
    """A = (1/L) Σ_{l=N−L+1..N} A_s^l: mean attention of the last L blocks (CLIP-ES, L = 8).

    attn: (N, n, n) head-averaged attention of every block, CLS dropped -> (n, n).
    """
    n_layers = _check_attn(attn)
    static_layers = checks.integer("static_layers", static_layers, 1, n_layers)
    return attn[n_layers - static_layers:].mean(dim=0)


def layer_scores(aff_f: Tensor, attn: Tensor, n0: int, distance: str = "abs") -> Tensor:
    """S^l = Σ_ij |A_f − A_s^l|(i, j) (WeCLIP Eq. 5, "abs") or S^l = Σ_ij (A_f − A_s^l)(i, j) ("signed").

    "signed" is what the official code computes; since attention rows sum to 1 with CLS included,
    it reduces to the patch→CLS mass of each layer plus a constant (REFERENCE §3.2).
    aff_f: (n, n), attn: (N, n, n), n0: 1-indexed first candidate block.
    Returns (N,): S^l for l = N0..N, NaN for l < N0 (not candidates).
    """
    n_layers = _check_attn(attn, aff_f)
    n0 = checks.integer("n0", n0, 1, n_layers)
    checks.choice("distance", distance, DISTANCES)
    diff = aff_f.unsqueeze(0) - attn[n0 - 1:]  # (N − N0 + 1, n, n)
    if distance == "abs":
        diff = diff.abs()
    scores = torch.full((n_layers,), float("nan"), dtype=diff.dtype, device=diff.device)
    scores[n0 - 1:] = diff.sum(dim=(1, 2))
    return scores


def layer_gates(scores: Tensor, distance: str = "abs") -> Tensor:
    """G^l = [S^l < mean S] ("abs", WeCLIP Eq. 6) or G^l = [S^l ≤ mean S] ("signed", official code).

    The mean runs over the candidates (non-NaN scores). scores: (N,) -> (N,) bool; a NaN score
    compares False, so non-candidates are never kept.
    """
    checks.choice("distance", distance, DISTANCES)
    mean = torch.nanmean(scores)
    return scores < mean if distance == "abs" else scores <= mean


def layer_margins(scores, n_tokens: int):
    """ΔS^l / n² = (S^l − mean S) / n²: each layer's distance to the selection threshold per token pair.

    S^l sums over n² = (hw)² pairs and is dominated by Σ A_f, so kept and rejected layers differ in
    its sixth digit; per pair and relative to the threshold the choice G^l reads at a glance
    (abs: kept iff ΔS^l < 0; signed: kept iff ΔS^l ≤ 0). scores: (N,) numpy or torch, NaN for
    non-candidates (kept NaN) → (N,) of the same kind.
    """
    n_tokens = checks.integer("n_tokens", n_tokens, 1)
    finite = scores[scores == scores]  # NaN ≠ NaN: the candidates
    if len(finite) == 0:
        return scores * float("nan")
    return (scores - finite.mean()) / float(n_tokens) ** 2


def rfm_affinity(aff_f: Tensor, attn: Tensor, keep: Tensor, n0: int) -> tuple[Tensor, bool]:
    """R = A_f / N_m ⊙ Σ_l G^l A_s^l with N_m = Σ_l G^l (WeCLIP Eq. 7).

    The official code divides by N_kept + 1e-5; here N_m is exact and the empty case is explicit:
    when no layer is kept (possible, e.g. a single candidate under the strict "abs" test), R falls
    back to A_f ⊙ the plain mean over l = N0..N, where the official code would get R ≈ 0 and a
    NaN transition matrix.
    aff_f: (n, n), attn: (N, n, n), keep: (N,) bool G^l, which must be False below N0.
    Returns (R (n, n), fallback).
    """
    n_layers = _check_attn(attn, aff_f)
    n0 = checks.integer("n0", n0, 1, n_layers)
    keep = torch.as_tensor(keep, device=attn.device)
    if keep.dtype != torch.bool or tuple(keep.shape) != (n_layers,):
        raise ValueError(f"keep must be a ({n_layers},) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if keep[: n0 - 1].any():
        raise ValueError(f"keep selects a block below n0={n0}; only blocks n0..{n_layers} are candidates")
    n_kept = int(keep.sum())
    if n_kept == 0:
        return aff_f * attn[n0 - 1:].mean(dim=0), True
    return aff_f * attn[keep].sum(dim=0) / n_kept, False
