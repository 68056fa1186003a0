"""rfm.losses against independent references: explicit per-pixel / per-pair loops in numpy."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfm.losses import (
    IGNORE_INDEX,
    affinity_label,
    affinity_loss,
    balanced_cross_entropy,
    make_optimizer,
    poly_warmup_lr,
    weclip_loss,
)

IGN = IGNORE_INDEX


# ----------------------------------------------------------------------------- references


def bilinear_upsample_ref(x_chw: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with align_corners=False, written out: src = max((dst + ½)·in/out − ½, 0)."""
    c, in_h, in_w = x_chw.shape
    out_h, out_w = out_hw
    out = np.zeros((c, out_h, out_w))
    for y in range(out_h):
        sy = max((y + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(math.floor(sy))
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(math.floor(sx))
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            out[:, y, x] = (
                (1 - ly) * (1 - lx) * x_chw[:, y0, x0]
                + (1 - ly) * lx * x_chw[:, y0, x1]
                + ly * (1 - lx) * x_chw[:, y1, x0]
                + ly * lx * x_chw[:, y1, x1]
            )
    return out


def balanced_ce_ref(logits: np.ndarray, label: np.ndarray) -> float:
    """½·mean CE over background pixels + ½·mean CE over foreground pixels, pixel by pixel."""
    bg, fg = [], []
    for b in range(label.shape[0]):
        up = bilinear_upsample_ref(logits[b], label.shape[1:])
        for y in range(label.shape[1]):
            for x in range(label.shape[2]):
                k = int(label[b, y, x])
                if k == IGN:
                    continue
                z = up[:, y, x]
                ce = math.log(sum(math.exp(v) for v in z)) - z[k]
                (bg if k == 0 else fg).append(ce)
    return 0.5 * (np.mean(bg) if bg else 0.0) + 0.5 * (np.mean(fg) if fg else 0.0)


def nearest_downsample_ref(label: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest resize as PyTorch's legacy "nearest": source index ⌊dst·in/out⌋."""
    _, in_h, in_w = label.shape
    h, w = grid
    rows = [min(int(math.floor(r * in_h / h)), in_h - 1) for r in range(h)]
    cols = [min(int(math.floor(c * in_w / w)), in_w - 1) for c in range(w)]
    return label[:, rows][:, :, cols]


def affinity_label_ref(label: np.ndarray, grid: tuple[int, int], radius: int) -> np.ndarray:
    small = nearest_downsample_ref(label, grid)
    h, w = grid
    n = h * w
    out = np.zeros((label.shape[0], n, n), dtype=np.int64)
    for b in range(label.shape[0]):
        for i in range(n):
            ri, ci = divmod(i, w)
            for j in range(n):
                rj, cj = divmod(j, w)
                li, lj = small[b, ri, ci], small[b, rj, cj]
                if abs(ri - rj) > radius or abs(ci - cj) > radius or li == IGN or lj == IGN:
                    out[b, i, j] = IGN
                else:
                    out[b, i, j] = int(li == lj)
    return out


def affinity_loss_ref(aff: np.ndarray, aff_label: np.ndarray) -> float:
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for idx in np.ndindex(*aff.shape):
        if aff_label[idx] == 1:
            pos_sum += 1.0 - aff[idx]
            n_pos += 1
        elif aff_label[idx] == 0:
            neg_sum += aff[idx]
            n_neg += 1
    return 0.5 * pos_sum / (n_pos + 1) + 0.5 * neg_sum / (n_neg + 1)


# ----------------------------------------------------------------------------- fixtures


def tiny_seg_case(seed: int = 0):
    """B=2, C=3, 3×4 logits and a 6×8 label with background, both classes and ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 6, 8), generator=g)
    label[0, 0, :3] = IGN
    label[1, 4:, 5:] = IGN
    return logits, label


def random_label(shape, num_classes: int, seed: int, ignore_frac: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, shape, generator=g)
    label[torch.rand(shape, generator=g) < ignore_frac] = IGN
    return label


# ----------------------------------------------------------------------------- balanced CE


def test_bilinear_reference_matches_torch():
    # Guards the reference itself, so that the loss test below checks the loss, not the resize.
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    ours = bilinear_upsample_ref(x.numpy(), (6, 8))
    theirs = F.interpolate(x[None], size=(6, 8), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-12)


def test_balanced_ce_matches_per_pixel_loop():
    logits, label = tiny_seg_case()
    assert (label == 0).any() and ((label > 0) & (label != IGN)).any() and (label == IGN).any()
    loss = balanced_cross_entropy(logits, label)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(balanced_ce_ref(logits.numpy(), label.numpy()), rel=1e-10)


def test_balanced_ce_is_not_the_plain_mean():
    # Few foreground pixels: the balanced loss must differ from the unweighted CE mean.
    logits, label = tiny_seg_case(1)
    label[label > 0] = 0
    label[0, 2, 3] = 2
    plain = F.cross_entropy(
        F.interpolate(logits, size=(6, 8), mode="bilinear", align_corners=False), label, ignore_index=IGN
    )
    balanced = balanced_cross_entropy(logits, label)
    assert balanced.item() == pytest.approx(balanced_ce_ref(logits.numpy(), label.numpy()), rel=1e-10)
    assert abs(balanced.item() - plain.item()) > 1e-3


def test_balanced_ce_all_background_is_half_background_ce():
    logits, label = tiny_seg_case(2)
    label = torch.zeros_like(label)
    loss = balanced_cross_entropy(logits, label)
    assert torch.isfinite(loss)
    ups = [bilinear_upsample_ref(image, (6, 8)) for image in logits.numpy()]
    ce_bg = np.mean([np.log(np.exp(u).sum(0)) - u[0] for u in ups])  # every pixel is class 0
    assert loss.item() == pytest.approx(0.5 * ce_bg, rel=1e-10)


def test_balanced_ce_all_ignore_is_zero_without_nan():
    logits, label = tiny_seg_case(3)
    logits.requires_grad_(True)
    loss = balanced_cross_entropy(logits, torch.full_like(label, IGN))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_balanced_ce_gradient_flows_and_is_correct():
    logits, label = tiny_seg_case(4)
    logits.requires_grad_(True)
    balanced_cross_entropy(logits, label).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    leaf = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: balanced_cross_entropy(x, label), (leaf,))


def test_balanced_ce_dtypes_and_label_dtype():
    logits, label = tiny_seg_case(5)
    ref = balanced_cross_entropy(logits, label).item()
    assert balanced_cross_entropy(logits.float(), label.to(torch.uint8)).item() == pytest.approx(ref, rel=1e-5)
    half = balanced_cross_entropy(logits.to(torch.bfloat16), label)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(ref, rel=3e-2)


@pytest.mark.parametrize(
    "logits_shape, label, match",
    [
        ((2, 3, 3, 4), torch.zeros(2, 6, 8), "integer"),
        ((2, 3, 3, 4), torch.full((2, 6, 8), 3), r"\[0, 3\)"),
        ((2, 3, 3, 4), torch.full((2, 6, 8), -1), r"\[0, 3\)"),
        ((2, 3, 3, 4), torch.zeros(3, 6, 8, dtype=torch.long), "batch"),
        ((3, 3, 4), torch.zeros(2, 6, 8, dtype=torch.long), r"\(B, C, h, w\)"),
    ],
)
def test_balanced_ce_rejects_bad_input(logits_shape, label, match):
    with pytest.raises(ValueError, match=match):
        balanced_cross_entropy(torch.zeros(logits_shape), label)


def test_balanced_ce_rejects_ignore_index_inside_classes():
    with pytest.raises(ValueError, match="collides"):
        balanced_cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), ignore_index=2)


# ----------------------------------------------------------------------------- affinity label


def test_nearest_reference_matches_interpolate():
    label = random_label((2, 13, 17), 4, seed=0)
    theirs = F.interpolate(label[:, None].float(), size=(5, 6), mode="nearest")[:, 0].long()
    np.testing.assert_array_equal(nearest_downsample_ref(label.numpy(), (5, 6)), theirs.numpy())


@pytest.mark.parametrize("in_hw", [(10, 12), (13, 17), (5, 6)])
def test_affinity_label_matches_pair_loop(in_hw):
    label = random_label((2, *in_hw), 3, seed=sum(in_hw))
    aff_label = affinity_label(label, (5, 6), radius=2)
    assert aff_label.shape == (2, 30, 30) and aff_label.dtype == torch.long
    expected = affinity_label_ref(label.numpy(), (5, 6), radius=2)
    np.testing.assert_array_equal(aff_label.numpy(), expected)
    # The case must exercise every outcome: positive, negative, ignored by label and by window.
    assert {0, 1, IGN} <= set(np.unique(expected).tolist())


def test_affinity_label_window_and_ignore_rules():
    label = torch.zeros(1, 5, 6, dtype=torch.long)
    label[0, 0, 0] = IGN  # token 0
    label[0, 0, 1] = 2  # token 1
    aff = affinity_label(label, (5, 6), radius=2)[0]
    assert (aff[0] == IGN).all() and (aff[:, 0] == IGN).all()
    assert aff[1, 1] == 1  # the diagonal is a positive pair
    assert aff[1, 2] == 0 and aff[2, 1] == 0  # 2 vs 0 → negative
    assert aff[2, 2 + 2 * 6 + 2] == 1  # Δ = (2, 2): inside the square window
    assert aff[2, 2 + 3 * 6] == IGN  # Δrow = 3 > radius
    assert aff[6, 6 + 5] == IGN  # Δcol = 5 > radius
    assert torch.equal(aff, aff.T)


def test_affinity_label_large_radius_keeps_every_pair():
    label = random_label((1, 4, 4), 2, seed=3, ignore_frac=0.0)
    aff = affinity_label(label, (4, 4), radius=10)
    flat = label.flatten(1)
    assert torch.equal(aff, (flat[:, :, None] == flat[:, None, :]).long())


def test_affinity_label_custom_ignore_index():
    label = torch.tensor([[[0, 7], [1, 1]]])
    aff = affinity_label(label, (2, 2), radius=1, ignore_index=7)
    assert (aff[0, 1] == 7).all() and (aff[0, :, 1] == 7).all()
    assert aff[0, 2, 3] == 1 and aff[0, 0, 2] == 0


@pytest.mark.parametrize(
    "label, grid, radius, match",
    [
        (torch.zeros(1, 4, 4), (2, 2), 1, "integer"),
        (torch.zeros(4, 4, dtype=torch.long), (2, 2), 1, r"\(B, H, W\)"),
        (torch.zeros(1, 4, 4, dtype=torch.long), (0, 2), 1, "grid"),
        (torch.zeros(1, 4, 4, dtype=torch.long), (2,), 1, "grid"),
        (torch.zeros(1, 4, 4, dtype=torch.long), (2, 2), -1, "radius"),
    ],
)
def test_affinity_label_rejects_bad_input(label, grid, radius, match):
    with pytest.raises(ValueError, match=match):
        affinity_label(label, grid, radius)


# ----------------------------------------------------------------------------- affinity loss


def test_affinity_loss_matches_explicit_sums():
    g = torch.Generator().manual_seed(0)
    aff = torch.sigmoid(torch.randn(2, 30, 30, generator=g, dtype=torch.float64))
    aff_label = affinity_label(random_label((2, 10, 12), 3, seed=1), (5, 6), radius=2)
    loss = affinity_loss(aff, aff_label)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(affinity_loss_ref(aff.numpy(), aff_label.numpy()), rel=1e-12)


def test_affinity_loss_sums_over_the_whole_batch():
    # Batch-wide counts differ from the mean of per-image losses when the images' counts differ.
    aff = torch.tensor([[[0.2, 0.7], [0.4, 0.9]], [[0.5, 0.1], [0.3, 0.6]]], dtype=torch.float64)
    aff_label = torch.tensor([[[1, 1], [1, 1]], [[0, 1], [IGN, 0]]])
    batch = affinity_loss(aff, aff_label).item()
    # Hand sums: pos = (0.8+0.3+0.6+0.1) + 0.9 = 2.7 over 5 pairs, neg = 0.5 + 0.6 = 1.1 over 2.
    assert batch == pytest.approx(0.5 * 2.7 / 6 + 0.5 * 1.1 / 3, rel=1e-12)
    per_image = np.mean([affinity_loss(aff[i : i + 1], aff_label[i : i + 1]).item() for i in range(2)])
    assert abs(batch - per_image) > 1e-3


def test_affinity_loss_all_ignore_is_zero():
    aff = torch.rand(2, 6, 6, requires_grad=True)
    loss = affinity_loss(aff, torch.full((2, 6, 6), IGN))
    assert loss.item() == 0.0
    loss.backward()
    assert (aff.grad == 0).all()


def test_affinity_loss_gradient_per_pair():
    aff = torch.full((1, 2, 2), 0.5, requires_grad=True)
    aff_label = torch.tensor([[[1, 0], [IGN, 1]]])
    affinity_loss(aff, aff_label).backward()
    # ∂/∂A on a positive pair = −½/(N_pos + 1) = −1/6, on a negative pair ½/(N_neg + 1) = 1/4.
    expected = torch.tensor([[[-1 / 6, 1 / 4], [0.0, -1 / 6]]])
    torch.testing.assert_close(aff.grad, expected)


def test_affinity_loss_half_precision_does_not_overflow():
    aff = torch.full((4, 400, 400), 0.9, dtype=torch.float16)
    aff_label = torch.zeros(4, 400, 400, dtype=torch.long)  # 640 000 negatives: Σ ≈ 5.8e5 > fp16 max
    loss = affinity_loss(aff, aff_label)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.5 * 0.9 * 640000 / 640001, rel=1e-3)


@pytest.mark.parametrize(
    "aff, aff_label, match",
    [
        (torch.rand(1, 3, 3), torch.full((1, 3, 3), 2), "only hold"),
        (torch.rand(1, 3, 3), torch.zeros(1, 3, 3), "integer"),
        (torch.rand(1, 3, 3), torch.zeros(1, 4, 4, dtype=torch.long), "same shape"),
        (torch.rand(3, 3), torch.zeros(3, 3, dtype=torch.long), "same shape"),
    ],
)
def test_affinity_loss_rejects_bad_input(aff, aff_label, match):
    with pytest.raises(ValueError, match=match):
        affinity_loss(aff, aff_label)


# ----------------------------------------------------------------------------- total loss


def test_weclip_loss_is_seg_plus_tenth_aff():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    aff = torch.sigmoid(torch.randn(2, 30, 30, generator=g, dtype=torch.float64))
    label = random_label((2, 10, 12), 3, seed=5)
    total, parts = weclip_loss(logits, aff, label, (5, 6), radius=2)
    seg = balanced_ce_ref(logits.numpy(), label.numpy())
    aff_ref = affinity_loss_ref(aff.numpy(), affinity_label_ref(label.numpy(), (5, 6), 2))
    assert total.item() == pytest.approx(seg + 0.1 * aff_ref, rel=1e-10)
    assert parts["seg"] == pytest.approx(seg, rel=1e-10)
    assert parts["aff"] == pytest.approx(aff_ref, rel=1e-10)
    assert parts["total"] == pytest.approx(total.item(), rel=1e-12)
    assert all(isinstance(v, float) for v in parts.values())
    heavier, _ = weclip_loss(logits, aff, label, (5, 6), radius=2, aff_weight=1.0)
    assert heavier.item() == pytest.approx(seg + aff_ref, rel=1e-10)


def test_weclip_loss_default_radius_is_8():
    label = random_label((1, 24, 24), 3, seed=6)
    aff = torch.rand(1, 144, 144)
    logits = torch.randn(1, 3, 12, 12)
    _, default = weclip_loss(logits, aff, label, (12, 12))
    _, radius8 = weclip_loss(logits, aff, label, (12, 12), radius=8)
    _, radius2 = weclip_loss(logits, aff, label, (12, 12), radius=2)
    assert default == radius8 and default["aff"] != radius2["aff"]


# ----------------------------------------------------------------------------- schedule and optimiser


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 2e-9),  # base·ratio
        (25, 2e-3 * (1e-6 + (1 - 1e-6) * 0.5)),  # half-way through the warm-up
        (49, 2e-3 * (1e-6 + (1 - 1e-6) * 49 / 50)),  # last warm-up step, one increment short of base
        (50, 2e-3 * (1 - 50 / 30000)),  # poly takes over with the global step count
        (15000, 1e-3),  # mid-training: half the base rate
        (29999, 2e-3 / 30000),  # last step
        (30000, 0.0),
        (45000, 0.0),  # never negative
    ],
)
def test_poly_warmup_lr_values(step, expected):
    assert poly_warmup_lr(step, 2e-3, 30000) == pytest.approx(expected, rel=1e-12, abs=1e-20)


def test_poly_warmup_lr_power_and_no_warmup():
    assert poly_warmup_lr(15000, 2e-3, 30000, power=0.9) == pytest.approx(2e-3 * 0.5**0.9, rel=1e-12)
    assert poly_warmup_lr(31000, 2e-3, 30000, power=0.9) == 0.0
    assert poly_warmup_lr(0, 2e-3, 100, warmup_steps=0) == 2e-3
    assert poly_warmup_lr(10, 1.0, 100, warmup_steps=20, warmup_ratio=0.0) == pytest.approx(0.5)


def test_poly_warmup_lr_is_continuous_at_the_end_of_warmup():
    lrs = [poly_warmup_lr(s, 2e-3, 30000) for s in range(30000)]
    assert max(lrs) == lrs[50] < 2e-3
    assert all(b > a for a, b in zip(lrs[:50], lrs[1:51]))
    assert all(b < a for a, b in zip(lrs[50:], lrs[51:]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=-1), "step"),
        (dict(step=1.5), "step"),
        (dict(max_steps=0), "max_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(base_lr=-1.0), "base_lr"),
    ],
)
def test_poly_warmup_lr_rejects_bad_input(kwargs, match):
    args = dict(step=0, base_lr=1e-3, max_steps=100) | kwargs
    with pytest.raises(ValueError, match=match):
        poly_warmup_lr(**args)


def test_make_optimizer_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p])
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(2e-4 * 10)
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.01
    assert make_optimizer([p], lr=1e-4, weight_decay=0.0).param_groups[0]["weight_decay"] == 0.0


def test_training_decreases_the_loss():
    torch.manual_seed(0)
    grid, num_classes, steps, base_lr = (4, 5), 3, 50, 0.1
    coarse = random_label((2, 4, 5), num_classes, seed=7)
    label = F.interpolate(coarse[:, None].float(), scale_factor=4)[:, 0].long()  # (2, 16, 20), blocky
    logits = torch.nn.Parameter(torch.zeros(2, num_classes, *grid))
    f_u = torch.nn.Parameter(0.1 * torch.randn(2, 8, *grid))
    optimizer = make_optimizer([logits, f_u], lr=base_lr)
    history = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = poly_warmup_lr(step, base_lr, steps, warmup_steps=5)
        flat = f_u.flatten(2)
        aff = torch.sigmoid(flat.transpose(1, 2) @ flat)
        total, parts = weclip_loss(logits, aff, label, grid, radius=2)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(parts)
    first, last = history[0], history[-1]
    assert last["total"] < 0.35 * first["total"]
    assert last["seg"] < 0.35 * first["seg"] and last["aff"] < 0.1 * first["aff"]
