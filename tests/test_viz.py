"""Tests for rfm.viz: colouring, overlays, the comparison figure and overlay files."""

import types

import numpy as np
import pytest
from PIL import Image

from rfm.export import voc_palette
from rfm.viz import (
    class_colors,
    colorize_cam,
    colorize_label,
    overlay_cam,
    overlay_label,
    save_figure,
    save_overlays,
    side_by_side_figure,
)

H, W = 24, 32


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def make_result(with_rfm=True, scores=None):
    rng = np.random.default_rng(1)
    cams = [rng.random((2, H, W), dtype=np.float32) for _ in range(3)]
    label = np.zeros((H, W), np.uint8)
    label[:10, :10] = 8           # "cat" (index 7)
    label[12:, 20:] = 12          # "dog" (index 11)
    label[0, :] = 255
    if scores is None:
        scores = np.array([np.nan] * 6 + [3.0, 2.0, 1.0, 2.5, 0.5, 1.5])
    finite = scores[np.isfinite(scores)]
    threshold = finite.mean() if finite.size else np.nan
    by_stage = {"initial": cams[0], "static": cams[1], "rfm": cams[2] if with_rfm else None}
    return types.SimpleNamespace(
        class_names=["cat", "dog"],
        class_indices=[7, 11],
        cam=by_stage.get,
        cam_initial=by_stage["initial"],
        cam_static=by_stage["static"],
        cam_rfm=by_stage["rfm"],
        label=label,
        layer_scores=scores,
        layer_keep=np.isfinite(scores) & (scores < threshold),
        layer_threshold=threshold,
        layer_margins=(scores - threshold) / (4 * 5) ** 2,  # a 4×5 patch grid: 400 token pairs
        num_tokens=4 * 5,
        params=types.SimpleNamespace(alpha=2, n0=7, distance="abs", box_threshold=0.4),
    )


def test_colorize_cam_jet_in_rgb_order():
    cam = np.array([[0.0, 1.0, 0.5, -3.0, 7.0]], np.float32)
    rgb = colorize_cam(cam)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    low, high = rgb[0, 0].astype(int), rgb[0, 1].astype(int)
    assert low[2] > 100 and low[2] > low[0] + 100 and low[2] > low[1] + 100  # JET 0 = dark blue
    assert high[0] > 100 and high[0] > high[1] + 100 and high[0] > high[2] + 100  # JET 1 = dark red
    np.testing.assert_array_equal(rgb[0, 3], rgb[0, 0])  # clipped below
    np.testing.assert_array_equal(rgb[0, 4], rgb[0, 1])  # clipped above


def test_colorize_cam_nan_safe():
    cam = np.full((4, 5), np.nan, np.float32)
    cam[0, 0] = 1.0
    rgb = colorize_cam(cam)
    np.testing.assert_array_equal(rgb[1, 1], colorize_cam(np.zeros((1, 1)))[0, 0])


def test_overlay_cam(image):
    cam = np.random.default_rng(2).random((H, W))
    out = overlay_cam(image, cam, opacity=0.5)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay_cam(image, cam, opacity=0.0), image)
    np.testing.assert_array_equal(overlay_cam(image, cam, opacity=1.0), colorize_cam(cam))
    expected = (image.astype(float) + colorize_cam(cam)) / 2
    assert np.abs(out - expected).max() <= 1


def test_overlay_errors(image):
    with pytest.raises(ValueError, match="does not match"):
        overlay_cam(image, np.zeros((H + 1, W)))
    with pytest.raises(ValueError, match="uint8"):
        overlay_cam(image.astype(np.float32), np.zeros((H, W)))
    with pytest.raises(ValueError, match="opacity"):
        overlay_label(image, np.zeros((H, W), np.uint8), opacity=2.0)


def test_colorize_and_overlay_label(image):
    label = make_result().label
    rgb = colorize_label(label)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, voc_palette()[label])
    out = overlay_label(image, label, opacity=0.6)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    background = label == 0
    np.testing.assert_array_equal(out[background], image[background])
    assert not np.array_equal(out[~background], image[~background])


def test_class_colors():
    assert class_colors([0, 14]) == [(128, 0, 0), (192, 128, 128)]
    with pytest.raises(ValueError, match="palette"):
        class_colors([255])


@pytest.mark.parametrize(
    "with_rfm, scores",
    [(True, None), (False, None), (False, np.full(12, np.nan))],
    ids=["rfm", "no-decoder", "all-nan-scores"],
)
def test_side_by_side_figure_saves_png(tmp_path, image, with_rfm, scores):
    fig = side_by_side_figure(image, make_result(with_rfm, scores))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert ("no decoder loaded" in texts) is not with_rfm
    titles = [ax.get_title() for ax in fig.axes]
    assert "cat: initial" in titles and "dog: pseudo label" in titles
    assert "α=2" in titles[-1] and "N0=7" in titles[-1] and "abs" in titles[-1]
    path = save_figure(fig, tmp_path / "figs" / "f.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    with pytest.raises(FileExistsError):
        save_figure(fig, path)


def test_layer_panel_colours_kept_and_rejected(image):
    result = make_result()
    ax = side_by_side_figure(image, result).axes[-1]
    labels = ax.get_legend_handles_labels()[1]
    assert "kept ($G^l = 1$)" in labels and "rejected ($G^l = 0$)" in labels
    assert any(label.startswith("threshold: ") for label in labels) and "$N_0$ = 7" in labels
    heights = sorted(bar.get_height() for bars in ax.containers for bar in bars)
    # bars are ΔS^l per pair from the threshold: the below-threshold (kept) ones point down
    np.testing.assert_allclose(heights, sorted((result.layer_scores[6:] - 1.75) / 400))
    assert ax.get_ylim()[0] == -ax.get_ylim()[1]


def test_save_overlays(tmp_path, image):
    result = make_result()
    result.class_names = ["traffic light", "a/b"]
    paths = save_overlays(image, result, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [f"{stage}_{name}.png" for stage in ("initial", "static", "rfm") for name in ("traffic_light", "a_b")]
        + ["label_overlay.png"]
    )
    with Image.open(tmp_path / "out" / "label_overlay.png") as png:
        assert png.mode == "RGB" and png.size == (W, H)
    with pytest.raises(FileExistsError):
        save_overlays(image, result, tmp_path / "out")
    assert len(save_overlays(image, result, tmp_path / "out", overwrite=True)) == 7


def test_save_overlays_without_decoder(tmp_path, image):
    paths = save_overlays(image, make_result(with_rfm=False), tmp_path)
    assert not any(p.name.startswith("rfm_") for p in paths) and len(paths) == 5
