"""Predictor: caching, stage wiring against independent recomputation, boxes, validation, inputs."""
import io
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import rfm
from rfm import backbone, pipeline
from rfm.data import ImageError, load_image
from rfm.decoder import Decoder, feature_affinity
from rfm.par import par_refine
from conftest import SMALL_CLIP, voc_image

# The small test CLIP has 4 blocks; RefineParams' defaults (N0 = 7, last 8 blocks) are ViT-B/16's.
SMALL = dict(n0=2, static_layers=3)


def _sinkhorn_sym_power(a: np.ndarray, alpha: int) -> np.ndarray:
    """The CLIP-ES transition matrix written out in numpy: 3 × (columns, rows), symmetrise, matrix power."""
    a = a.astype(np.float64)
    for _ in range(3):
        a = a / a.sum(axis=0, keepdims=True)
        a = a / a.sum(axis=1, keepdims=True)
    a = (a + a.T) / 2
    return np.linalg.matrix_power(a, alpha)


def _propagate(t: np.ndarray, cams: np.ndarray, box: np.ndarray) -> np.ndarray:
    k, h, w = cams.shape
    out = (cams.reshape(k, -1) * box.reshape(k, -1)) @ t.T
    out = out - out.min(axis=1, keepdims=True)
    return (out / (out.max(axis=1, keepdims=True) + 1e-7)).reshape(k, h, w)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return Decoder(width=SMALL_CLIP["width"], num_blocks=SMALL_CLIP["layers"] - 1, embed_dim=32, num_classes=21,
                   heads=4, layers=1).eval()


@pytest.fixture(scope="module")
def photo(voc_mini):
    path, gt = voc_image(voc_mini, "2008_004430")
    return load_image(path), gt


@pytest.fixture()
def predictor(small_clip, decoder, photo):
    p = rfm.Predictor(small_clip, vocabulary="voc", decoder=decoder, device="cpu", max_side=160)
    p.set_image(photo[0], labels=["cat", "dog"])
    return p


def test_result_has_the_public_fields(predictor, photo):
    image = photo[0]
    h, w = image.shape[:2]
    result = predictor.refine(rfm.RefineParams(**SMALL))
    grid = backbone.network_size((h, w), 160, 16)
    grid = (grid[0] // 16, grid[1] // 16)
    assert result.class_names == ["cat", "dog"] and result.class_indices == [7, 11]
    for cam in (result.cam_initial, result.cam_static, result.cam_rfm):
        assert cam.shape == (2, h, w) and cam.dtype == np.float32
        assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    for cam in (result.patch.cam_initial, result.patch.cam_static, result.patch.cam_rfm):
        assert cam.shape == (2, *grid)
    assert result.label.shape == (h, w) and result.label.dtype == np.uint8
    assert set(np.unique(result.label)) <= {0, 8, 12}
    assert result.layer_scores.shape == (4,) and result.layer_keep.shape == (4,)
    assert result.box_mask.shape == (2, *grid) and result.box_mask.dtype == bool
    # the image-size CAM is CLIP-ES's bilinear resize of the patch CAM
    np.testing.assert_allclose(result.cam_initial[0], cv2.resize(result.patch.cam_initial[0], (w, h)), atol=1e-6)


def test_static_and_rfm_equal_the_equations_written_out(predictor):
    params = rfm.RefineParams(alpha=3, n0=2, static_layers=3, par_iterations=0)
    result = predictor.refine(params)
    features = predictor.features
    attn = features.attn.double().numpy()  # (N, n, n)
    cams = result.patch.cam_initial
    box = result.box_mask
    static = _propagate(_sinkhorn_sym_power(attn[-3:].mean(0), 3), cams, box)
    # the pipeline runs in float32, the reference in float64: α = 3 compounds rounding to ~1e-4
    np.testing.assert_allclose(result.patch.cam_static, static, atol=5e-4)

    aff_f = features.aff_f.double().numpy()
    scores = np.array([np.abs(aff_f - attn[l]).sum() for l in range(1, 4)])  # blocks 2..4
    keep = scores < scores.mean()
    np.testing.assert_allclose(result.layer_scores[1:], scores, rtol=1e-5)
    assert np.isnan(result.layer_scores[0]) and not result.layer_keep[0]
    np.testing.assert_array_equal(result.layer_keep[1:], keep)
    r = aff_f / keep.sum() * attn[1:][keep].sum(0)
    np.testing.assert_allclose(result.patch.cam_rfm, _propagate(_sinkhorn_sym_power(r, 3), cams, box), atol=5e-4)
    assert result.layer_threshold == pytest.approx(scores.mean(), rel=1e-5)


def test_decoder_affinity_is_computed_from_blocks_one_to_n_minus_one(small_clip, decoder, photo):
    p = rfm.Predictor(small_clip, decoder=decoder, device="cpu", max_side=160)
    p.set_image(photo[0], labels=["cat"])
    h, w = backbone.network_size(photo[0].shape[:2], 160, 16)
    x = backbone.to_tensor(backbone.resize_image(photo[0], (h, w)), small_clip.mean, small_clip.std)
    blocks = backbone.forward_blocks(small_clip, x)
    tokens = torch.stack([t[:, 1:] for t in blocks.tokens])
    expected = feature_affinity(decoder.fused_features(tokens, blocks.grid))[0]
    assert torch.allclose(p.features.aff_f, expected, atol=1e-6)


def test_pseudo_label_is_par_of_bg_and_refined_cams(predictor, photo):
    result = predictor.refine(rfm.RefineParams(par_iterations=5, bg_power=2.0, **SMALL))
    image = photo[0]
    h, w = image.shape[:2]  # 500×333 > max_side 160: PAR runs at the work size
    wh, ww = backbone.work_size((h, w), 160)
    cams = np.stack([cv2.resize(c, (ww, wh)) for c in result.patch.cam_rfm]).clip(0, 1)
    probs = np.concatenate([(1 - cams.max(0, keepdims=True)) ** 2, cams])
    small = backbone.resize_image(image, (wh, ww))
    expected = par_refine(small, torch.from_numpy(probs), iterations=5).numpy()
    np.testing.assert_allclose(result.probs, expected, atol=1e-5)
    label = np.array([0, 8, 12], dtype=np.uint8)[expected.argmax(0)]
    np.testing.assert_array_equal(result.label, cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST))


def test_refine_never_reruns_clip_and_set_labels_reruns_only_the_last_block(predictor, monkeypatch):
    monkeypatch.setattr(pipeline, "forward_blocks", lambda *a, **k: pytest.fail("backbone rerun"))
    first = predictor.refine(rfm.RefineParams(alpha=1, **SMALL))
    second = predictor.refine(rfm.RefineParams(alpha=4, n0=3, static_layers=2))
    assert not np.allclose(first.patch.cam_static, second.patch.cam_static)
    predictor.set_labels(["dog"])
    assert predictor.refine(rfm.RefineParams(**SMALL)).class_names == ["dog"]


def test_user_boxes_replace_the_mask_and_clip_the_refined_cams(predictor, photo):
    h, w = photo[0].shape[:2]
    # a box around the initial CAM's peak, so that the class has mass inside it
    peak = np.unravel_index(predictor.refine(rfm.RefineParams(**SMALL)).cam_initial[0].argmax(), (h, w))
    x0, y0 = max(0, peak[1] - 80), max(0, peak[0] - 75)
    box = (x0, y0, min(w, x0 + 160), min(h, y0 + 150))
    result = predictor.refine(rfm.RefineParams(boxes={"cat": [box]}, **SMALL))
    grid = result.box_mask.shape[1:]
    expected_patch = rfm.refine.boxes_to_patch_mask([box], (h, w), grid).numpy()
    np.testing.assert_array_equal(result.box_mask[0], expected_patch)
    outside = np.ones((h, w), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    for cams in (result.cam_static, result.cam_rfm):
        assert cams[0][outside].max() == 0
        assert cams[0][~outside].max() > 0
    assert not (result.label[outside] == 8).any()
    # the other class keeps its automatic boxes
    auto = predictor.refine(rfm.RefineParams(**SMALL))
    np.testing.assert_array_equal(result.box_mask[1], auto.box_mask[1])
    assert result.auto_boxes["cat"] == auto.auto_boxes["cat"]


def test_all_zero_and_constant_cams_give_no_nan(predictor):
    for value in (0.0, 0.5):
        predictor.features = replace(predictor.features, cams=torch.full_like(predictor.features.cams, value))
        result = predictor.refine(rfm.RefineParams(**SMALL))
        for arr in (result.cam_initial, result.cam_static, result.cam_rfm, result.probs):
            assert np.isfinite(arr).all()
        assert result.label.shape == result.image_size


def test_single_candidate_layer_falls_back_and_says_so(predictor):
    result = predictor.refine(rfm.RefineParams(n0=4, static_layers=3))  # one candidate; "abs" keeps iff S < mean: never
    assert result.rfm_fallback and not result.layer_keep.any()
    assert any("kept no layer" in n for n in result.notes)
    assert np.isfinite(result.cam_rfm).all() and result.cam_rfm.max() > 0


def test_without_decoder_rfm_is_none_and_explained(small_clip, photo):
    p = rfm.Predictor(small_clip, device="cpu", max_side=160)
    p.set_image(photo[0], labels=["cat"])
    result = p.refine(rfm.RefineParams(**SMALL))
    assert result.cam_rfm is None and result.patch.cam_rfm is None
    assert np.isnan(result.layer_scores).all() and not result.layer_keep.any()
    assert any("no decoder" in n for n in result.notes)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=0), "alpha must be 1..64"),
    (dict(alpha=54_000), "alpha must be 1..64, got 54000 .*underflows"),
    (dict(alpha=1.5), "alpha must be an integer"),
    (dict(n0=0), "n0 must be ≥ 1"),
    (dict(box_threshold=1.0), "box_threshold must be strictly between 0 and 1"),
    (dict(box_threshold=0), "box_threshold"),
    (dict(distance="l2"), "distance must be 'abs'"),
    (dict(par_iterations=-1), "par_iterations must be ≥ 0"),
    (dict(bg_power=0), "bg_power"),
    (dict(boxes={"cat": [(10, 10, 10, 50)]}), "zero area"),
    (dict(boxes={"cat": [(1, 2, 3)]}), "four numbers"),
    (dict(boxes={"horse": None}), "boxes for 'horse' must be a list"),
    (dict(boxes={"horse": [None]}), "four numbers"),
])
def test_bad_params_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rfm.RefineParams(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n0=5, static_layers=3), "n0=5 but this CLIP has 4 blocks"),
    (dict(n0=2, static_layers=9), "static_layers=9 but this CLIP has 4 blocks"),
    (dict(), "n0=7 but this CLIP has 4 blocks"),
    (dict(boxes={"horse": [(0, 0, 10, 10)]}), "not one of this image's classes"),
    (dict(boxes={"unicorn": [(0, 0, 10, 10)]}), "unknown class 'unicorn'"),
    (dict(boxes={"cat": [(0, 0, 600, 10)]}), "extends outside the 500×333 image"),
    (dict(boxes={"cat": [(-1, 0, 10, 10)]}), "extends outside"),
])
def test_params_that_do_not_fit_the_image_are_refused(predictor, kwargs, message):
    kwargs = {**SMALL, **kwargs} if kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        predictor.refine(rfm.RefineParams(**kwargs))


def test_bad_labels_are_refused(small_clip, photo):
    p = rfm.Predictor(small_clip, device="cpu", max_side=160)
    with pytest.raises(ValueError, match="at least one class"):
        p.set_image(photo[0], labels=[])
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        p.set_image(photo[0], labels=["cat", "unicorn"])
    with pytest.raises(RuntimeError, match="set_image first"):
        p.refine()


def test_labels_as_indices_and_custom_vocabulary(small_clip, photo):
    p = rfm.Predictor(small_clip, vocabulary="cat,sofa,lamp", device="cpu", max_side=96)
    p.set_image(photo[0], labels=[0, "lamp", np.int64(0)])
    result = p.refine(rfm.RefineParams(**SMALL))
    assert result.class_names == ["cat", "lamp"] and set(np.unique(result.label)) <= {0, 1, 3}


# ---------------------------------------------------------------- image inputs


def _png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_modes_are_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    cases = {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])),
        "grey16.png": Image.fromarray(grey16),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.png": Image.fromarray(rgb).convert("P"),
    }
    for name, img in cases.items():
        (tmp_path / name).write_bytes(_png_bytes(img, "JPEG" if name.endswith("jpg") else "PNG"))
        out = load_image(tmp_path / name)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png")[..., 1], rgb[..., 0])
    g16 = load_image(tmp_path / "grey16.png")[..., 0].astype(int)
    np.testing.assert_array_equal(g16, np.round(grey16 / 65535 * 255).astype(int))


def test_exif_rotation_is_applied(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :5] = 255  # a white band on the left
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (tmp_path / "rot.jpg").write_bytes(_png_bytes(img, "JPEG", exif=exif.tobytes(), quality=100))
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (30, 20, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now on top


def test_unreadable_truncated_and_tiny_images_are_refused(tmp_path, small_clip):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(tmp_path / "text.png")
    data = _png_bytes(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    p = rfm.Predictor(small_clip, device="cpu")
    with pytest.raises(ImageError, match="1×1 pixels"):
        p.set_image(np.zeros((1, 1, 3), np.uint8), labels=["cat"])
    with pytest.raises(ImageError, match="uint8"):
        p.set_image(np.zeros((32, 32, 3), np.float32), labels=["cat"])
    with pytest.raises(ImageError, match="RGB"):
        p.set_image(np.zeros((32, 32, 2), np.uint8), labels=["cat"])


def test_huge_image_is_processed_at_max_side(small_clip):
    image = np.zeros((10000, 10000, 3), np.uint8)
    image[2000:6000, 3000:9000] = 200
    p = rfm.Predictor(small_clip, device="cpu", max_side=128)
    p.set_image(image, labels=["cat"])
    assert p.features.grid == (8, 8) and p.features.work_image.shape == (128, 128, 3)
    result = p.refine(rfm.RefineParams(par_iterations=2, **SMALL))
    assert result.probs.shape == (2, 128, 128)
    assert result.label.shape == (10000, 10000)


def test_attention_rows_are_the_rows_of_the_patch_under_the_pixel(predictor, photo):
    h, w = photo[0].shape[:2]
    features = predictor.features
    gh, gw = features.grid
    rows = predictor.attention_rows(x=w - 1, y=0)  # top-right pixel → patch (0, gw − 1)
    assert rows.patch == (0, gw - 1)
    i = gw - 1
    np.testing.assert_allclose(rows.layers, features.attn[:, i].reshape(-1, gh, gw).numpy())
    np.testing.assert_allclose(rows.decoder, features.aff_f[i].reshape(gh, gw).numpy())
    centre = predictor.attention_rows(x=w / 2, y=h / 2)
    assert centre.patch == (int(gh / 2), int(gw / 2))
    with pytest.raises(ValueError, match="outside"):
        predictor.attention_rows(x=w, y=0)


def test_demo_models_fit_the_paper_defaults(photo):
    clip, decoder = rfm.demo_models(device="cpu")
    p = rfm.Predictor(clip, decoder=decoder, device="cpu")
    p.set_image(photo[0], labels=["cat", "dog"])
    result = p.refine()  # the defaults N0 = 7, last 8 layers need 12 blocks
    assert p.num_blocks == 12 and result.cam_rfm is not None
    assert np.isnan(result.layer_scores[:6]).all() and np.isfinite(result.layer_scores[6:]).all()


def test_label_with_ignore_marks_unconfident_pixels(predictor):
    result = predictor.refine(rfm.RefineParams(par_iterations=3, **SMALL))
    probs = result.probs.astype(np.float64)
    share = probs.max(0) / probs.sum(0)
    threshold = float(np.median(share))
    label = result.label_with_ignore(threshold)
    h, w = result.image_size
    expected = np.array([0, 8, 12], np.uint8)[probs.argmax(0)]
    expected[share < threshold] = 255
    np.testing.assert_array_equal(label, cv2.resize(expected, (w, h), interpolation=cv2.INTER_NEAREST))
    assert 0.3 < (label == 255).mean() < 0.7
    np.testing.assert_array_equal(result.label_with_ignore(0.0), result.label)
    with pytest.raises(ValueError, match="confidence"):
        result.label_with_ignore(1.5)
