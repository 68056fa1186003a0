"""Tests for rfm.par: PAR against an independent per-pixel implementation, its invariants, and
its effect on real photographs (voc-mini)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rfm.par import W2, background_score, par_refine, pseudo_label

VOC_MINI = Path("/work/shared/data/voc-mini")


# ---------------------------------------------------------------- independent reference (float64)
def naive_par(image_hw3: np.ndarray, probs_chw: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """PAR written pixel by pixel from REFERENCE §3.6, sharing no code with rfm.par."""
    img = image_hw3.astype(np.float64)
    height, width, _ = img.shape
    offsets, distances = [], []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                offsets.append((dy, dx))
                distances.append(math.sqrt(2) * d if dy and dx else float(d))
    distances = np.array(distances)

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    def clamp(y, x):
        return min(max(y, 0), height - 1), min(max(x, 0), width - 1)

    pos = softmax(-((distances / (distances.std(ddof=1) + 1e-8)) / 0.3) ** 2)
    affinity = np.zeros((height, width, len(offsets)))
    for y in range(height):
        for x in range(width):
            values = np.array([img[clamp(y + dy, x + dx)] for dy, dx in offsets])  # (K, 3)
            std = values.std(axis=0, ddof=1)
            per_channel = -((np.abs(values - img[y, x]) / (std + 1e-8)) / 0.3) ** 2
            affinity[y, x] = softmax(per_channel.mean(axis=1)) + 0.01 * pos

    maps = probs_chw.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(maps)
        for y in range(height):
            for x in range(width):
                for k, (dy, dx) in enumerate(offsets):
                    yy, xx = clamp(y + dy, x + dx)
                    new[:, y, x] += affinity[y, x, k] * maps[:, yy, xx]
        maps = new
    return maps


@pytest.mark.parametrize(
    "shape, dilations, iterations",
    [((9, 11), (1, 2, 4, 8, 12, 24), 3), ((7, 5), (1, 3), 4), ((1, 1), (1, 2), 2), ((6, 8), (2,), 5)],
)
def test_matches_naive_implementation(shape, dilations, iterations):
    rng = np.random.default_rng(sum(shape) + iterations)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    probs = rng.random((3, *shape))
    expected = naive_par(image, probs, iterations, dilations)
    got = par_refine(image, torch.from_numpy(probs), iterations=iterations, dilations=dilations)
    assert got.dtype == torch.float32 and got.shape == (3, *shape)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_image_layouts_and_ranges_agree():
    """uint8 HWC numpy, float CHW and 1×3×H×W tensors, and an affinely rescaled image (the RGB
    term divides by the local std) all give the same maps."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    probs = torch.rand(2, 10, 12, generator=torch.Generator().manual_seed(0))
    reference = par_refine(image, probs, iterations=4)
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    for variant in (chw / 255, chw[None], (chw - mean) / std, image.astype(np.float32)):
        torch.testing.assert_close(par_refine(variant, probs, iterations=4), reference, rtol=1e-4, atol=1e-6)


def test_affinity_rows_sum_to_one_plus_w2():
    """Propagating a constant map c gives (1 + w2)^n · c: every row of the affinity sums to 1.01."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    probs = torch.full((2, 13, 17), 0.7)
    probs[1] = 0.25
    out = par_refine(image, probs, iterations=6)
    assert W2 == 0.01
    expected = probs * (1 + W2) ** 6
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0)


def test_zero_iterations_is_identity_and_does_not_alias():
    probs = torch.rand(4, 8, 9)
    image = np.zeros((8, 9, 3), dtype=np.uint8)
    out = par_refine(image, probs, iterations=0)
    assert torch.equal(out, probs)
    out += 1
    assert not torch.equal(out, probs)


def test_input_is_not_modified():
    probs = torch.rand(3, 8, 9)
    before = probs.clone()
    par_refine(np.full((8, 9, 3), 50, np.uint8), probs, iterations=3)
    assert torch.equal(probs, before)


def test_constant_image_gives_no_nan_and_uniform_weights():
    """A flat image has std 0: every neighbour gets the same RGB logit, so PAR is a box blur
    with weights 1/48 (+ the position term) and nothing is NaN."""
    probs = torch.zeros(2, 20, 20)
    probs[0, :, :10] = 1
    probs[1, :, 10:] = 1
    out = par_refine(np.full((20, 20, 3), 128, np.uint8), probs, iterations=5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(0), torch.full((20, 20), 1.01**5), rtol=1e-5, atol=0)
    # Left/right symmetry of the input is preserved by the symmetric uniform kernel.
    torch.testing.assert_close(out[0], out[1].flip(-1), rtol=1e-5, atol=1e-6)


def test_single_outlier_pixel_on_flat_image_is_finite():
    image = np.zeros((9, 9, 3), np.uint8)
    image[4, 4] = 255  # its neighbours all equal each other: std 0 but a large difference
    out = par_refine(image, torch.rand(2, 9, 9), iterations=3)
    assert torch.isfinite(out).all()


def test_numpy_probs_and_float64_inputs():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    probs64 = rng.random((2, 6, 7))
    out = par_refine(image, probs64, iterations=2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, par_refine(image, torch.from_numpy(probs64).float(), iterations=2))


def test_read_only_and_negative_stride_numpy_inputs():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    probs = rng.random((2, 6, 7)).astype(np.float32)
    expected = par_refine(image[:, ::-1].copy(), probs[:, :, ::-1].copy(), iterations=2)
    image.flags.writeable = False
    torch.testing.assert_close(par_refine(image[:, ::-1], probs[:, :, ::-1], iterations=2), expected)


@pytest.mark.parametrize(
    "image, probs, kwargs, error, match",
    [
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 10), {}, ValueError, r"image is 8×9 .* probs are 8×10"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 9), {"iterations": -1}, ValueError, "iterations"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 9), {"iterations": 2.5}, ValueError, "iterations"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 9), {"dilations": (1, 0)}, ValueError, "dilations"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 9), {"dilations": ()}, ValueError, "dilations"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(2, 8, 9), {"dilations": (1.5,)}, ValueError, "dilations"),
        (np.zeros((8, 9), np.uint8), torch.rand(2, 8, 9), {}, ValueError, r"\(H, W, 3\)"),
        (np.zeros((8, 9, 4), np.uint8), torch.rand(2, 8, 9), {}, ValueError, r"\(H, W, 3\)"),
        (torch.zeros(4, 8, 9), torch.rand(2, 8, 9), {}, ValueError, r"\(3, H, W\)"),
        ([[0]], torch.rand(2, 8, 9), {}, TypeError, "numpy array or a torch tensor"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(8, 9), {}, ValueError, r"\(C, H, W\)"),
        (np.zeros((8, 9, 3), np.uint8), torch.rand(0, 8, 9), {}, ValueError, r"C ≥ 1"),
        (np.zeros((8, 9, 3), np.uint8), torch.full((2, 8, 9), float("nan")), {}, ValueError, "NaN"),
        (np.full((8, 9, 3), np.inf, np.float32), torch.rand(2, 8, 9), {}, ValueError, "image contains NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(image, probs, kwargs, error, match):
    with pytest.raises(error, match=match):
        par_refine(image, probs, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    probs = torch.rand(3, 40, 50)
    out = par_refine(image, probs.cuda(), iterations=5)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), par_refine(image, probs, iterations=5), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- background score, pseudo label
def test_background_score_matches_hand_computation():
    cams = torch.tensor([[[0.2, 0.9], [0.0, 1.0]], [[0.5, 0.1], [0.0, 0.3]]])
    torch.testing.assert_close(background_score(cams), torch.tensor([[[0.5, 0.1], [1.0, 0.0]]]))
    torch.testing.assert_close(background_score(cams, power=2), torch.tensor([[[0.25, 0.01], [1.0, 0.0]]]))
    # Overshoot from resizing is clipped rather than producing NaN under a fractional power.
    overshoot = torch.tensor([[[1.05, -0.1]]])
    torch.testing.assert_close(background_score(overshoot, power=0.5), torch.tensor([[[0.0, 1.0]]]))


def test_background_score_without_classes_is_all_background():
    bg = background_score(torch.zeros(0, 3, 4))
    assert bg.shape == (1, 3, 4) and torch.equal(bg, torch.ones(1, 3, 4))


@pytest.mark.parametrize(
    "cams, power, match",
    [
        (torch.rand(3, 4), 1.0, r"\(K, H, W\)"),
        (torch.rand(2, 3, 4), 0.0, "power"),
        (torch.rand(2, 3, 4), float("nan"), "power"),
        (torch.full((1, 2, 2), float("nan")), 1.0, "NaN"),
    ],
)
def test_background_score_rejects_bad_input(cams, power, match):
    with pytest.raises(ValueError, match=match):
        background_score(cams, power)


def test_pseudo_label_maps_channels_to_vocabulary_indices():
    probs = torch.tensor([[[0.9, 0.1, 0.3]], [[0.05, 0.8, 0.3]], [[0.05, 0.1, 0.4]]])
    label = pseudo_label(probs, class_ids=[7, 14])
    assert label.tolist() == [[0, 8, 15]]
    tie = torch.tensor([[[0.5]], [[0.5]]])
    assert pseudo_label(tie, [3]).item() == 0  # background wins ties
    with pytest.raises(ValueError, match="3 channels but 1 class ids"):
        pseudo_label(probs, [7])


# ---------------------------------------------------------------- real photographs (voc-mini)
def _voc_pairs():
    if not (VOC_MINI / "JPEGImages").is_dir() or not (VOC_MINI / "SegmentationClass").is_dir():
        pytest.skip(f"voc-mini data set not found at {VOC_MINI} (JPEGImages/ and SegmentationClass/)")
    from PIL import Image

    pairs = []
    for mask_path in sorted((VOC_MINI / "SegmentationClass").glob("*.png")):
        images = sorted((VOC_MINI / "JPEGImages").glob(mask_path.stem + ".*"))
        if images:
            image = np.asarray(Image.open(images[0]).convert("RGB"))
            pairs.append((mask_path.stem, image, np.asarray(Image.open(mask_path))))
    if not pairs:
        pytest.skip(f"no image/mask pairs in {VOC_MINI}")
    return pairs


def _coarse_cam(gt: np.ndarray, cls: int, shift: tuple[int, int]) -> np.ndarray:
    """A CAM-like map: the class mask at 1/16 resolution, upsampled, shifted and blurred."""
    import cv2

    height, width = gt.shape
    mask = (gt == cls).astype(np.float32)
    small = cv2.resize(mask, (max(1, width // 16), max(1, height // 16)), interpolation=cv2.INTER_AREA)
    cam = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    cam = cv2.GaussianBlur(np.roll(cam, shift, axis=(0, 1)), (0, 0), 4)
    return cam / max(float(cam.max()), 1e-6)


def _miou(label: np.ndarray, gt: np.ndarray, classes) -> float:
    valid = gt != 255
    ious = [((label == c) & (gt == c) & valid).sum() / ((label == c) | (gt == c))[valid].sum() for c in classes]
    return float(np.mean(ious))


# Images whose objects are compact: PAR's gain there is large (≥ 2.5 mIoU points with the degradation
# below), so each of them must improve on its own. Thin structures (bicycle spokes, aeroplane
# wings: vainf_001, vainf_120) can lose a little under 20 smoothing steps and count only in the total.
COMPACT_OBJECTS = ("2008_004430", "vainf_020", "vainf_023", "vainf_060", "vainf_114", "vainf_293")


def test_par_pulls_coarse_cams_onto_object_boundaries():
    """On real photographs, PAR moves shifted, blurred low-resolution masks back onto the object
    edges: the argmax label's mIoU (bg + present classes, 255 ignored) rises on every compact-object
    image, on at least 2/3 of all images, and by more than 2 points on average."""
    gains = {}
    for stem, image, gt in _voc_pairs():
        classes = [int(c) for c in np.unique(gt) if c not in (0, 255)]
        cams = torch.from_numpy(np.stack([_coarse_cam(gt, c, shift=(10, -8)) for c in classes]))
        probs = torch.cat([background_score(cams), cams])
        refined = par_refine(image, probs)
        vocab_ids = [c - 1 for c in classes]
        before = _miou(pseudo_label(probs, vocab_ids).numpy(), gt, [0, *classes])
        after = _miou(pseudo_label(refined, vocab_ids).numpy(), gt, [0, *classes])
        gains[stem] = after - before
    report = ", ".join(f"{stem}: {gain:+.3f}" for stem, gain in gains.items())
    compact = [stem for stem in COMPACT_OBJECTS if stem in gains]
    assert compact, f"none of {COMPACT_OBJECTS} found in {VOC_MINI}"
    assert all(gains[stem] > 0 for stem in compact), f"mIoU gains: {report}"
    assert sum(g > 0 for g in gains.values()) >= math.ceil(2 * len(gains) / 3), f"mIoU gains: {report}"
    assert np.mean(list(gains.values())) > 0.02, f"mIoU gains: {report}"
