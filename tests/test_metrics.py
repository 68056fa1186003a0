"""Tests for rfm.metrics: confusion/IoU, CAM → labels, folder evaluation, safe .npy loading, `eval` CLI."""

import argparse
import io
import json
import os
import pickle
import shutil
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from rfm.export import save_cams_npy, save_label_png
from rfm.cli import build_parser, cmd_eval, parse_bg_powers
from rfm.metrics import (
    EvalReport,
    confusion_matrix,
    evaluate_folder,
    format_table,
    iou_per_class,
    labels_from_cams,
    load_cam_npy,
    mean_iou,
    pixel_accuracy,
    precision_recall,
    resolve_class_names,
    save_report_json,
)
from rfm.viz import save_confusion_png

# ---------------------------------------------------------------------------------------------
# Metrics on a hand-computable case
# ---------------------------------------------------------------------------------------------

GT = np.array([[0, 0, 1, 1],
               [0, 2, 2, 1],
               [255, 2, 2, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 1, 1],
                 [0, 2, 255, 0]], dtype=np.uint8)
# Pairs (gt, pred), the gt-255 pixel (2,0) skipped (its prediction 0 must not count):
#   gt 0: (0,0) ×3 [r0c0 r1c0 r2c3], (0,1) ×1 [r0c1]      → row [3, 1, 0 | 0]
#   gt 1: (1,1) ×3 [r0c2 r0c3 r1c3]                       → row [0, 3, 0 | 0]
#   gt 2: (2,2) ×2 [r1c1 r2c1], (2,1) [r1c2], (2,255) [r2c2] → row [0, 1, 2 | 1]
# IoU_0 = 3 / (3 + FP 0 + FN 1) = 3/4
# IoU_1 = 3 / (3 + FP 2 + FN 0) = 3/5
# IoU_2 = 2 / (2 + FP 0 + FN 2) = 1/2   (the predicted 255 is a miss; dropping it would give 2/3)
# mIoU = (3/4 + 3/5 + 1/2) / 3 = 37/60; pixel accuracy = 8/11
# precision = 3/3, 3/5, 2/2; recall = 3/4, 3/3, 2/4
EXPECTED_CONF = [[3, 1, 0, 0], [0, 3, 0, 0], [0, 1, 2, 1]]
EXPECTED_IOU = [Fraction(3, 4), Fraction(3, 5), Fraction(1, 2)]


def test_hand_computed_case():
    conf = confusion_matrix(PRED, GT, 3)
    assert conf.dtype == np.int64 and conf.tolist() == EXPECTED_CONF
    np.testing.assert_allclose(iou_per_class(conf), [float(f) for f in EXPECTED_IOU])
    assert mean_iou(conf) == pytest.approx(float(Fraction(37, 60)))
    assert pixel_accuracy(conf) == pytest.approx(8 / 11)
    precision, recall = precision_recall(conf)
    np.testing.assert_allclose(precision, [1, 3 / 5, 1])
    np.testing.assert_allclose(recall, [3 / 4, 1, 1 / 2])


def test_absent_class_is_nan_and_left_out_of_the_mean():
    conf = confusion_matrix(PRED, GT, 4)  # class 3 appears in neither
    assert conf.shape == (4, 5)
    iou = iou_per_class(conf)
    assert np.isnan(iou[3])
    np.testing.assert_allclose(iou[:3], [float(f) for f in EXPECTED_IOU])
    assert mean_iou(conf) == pytest.approx(float(Fraction(37, 60)))
    precision, recall = precision_recall(conf)
    assert np.isnan(precision[3]) and np.isnan(recall[3])
    # Predicted but absent from gt: IoU 0 (not NaN), precision 0, recall NaN.
    pred = PRED.copy()
    pred[0, 0] = 3
    conf = confusion_matrix(pred, GT, 4)
    iou = iou_per_class(conf)
    assert iou[3] == 0.0 and precision_recall(conf)[0][3] == 0.0 and np.isnan(precision_recall(conf)[1][3])
    assert mean_iou(conf) == pytest.approx(np.mean(iou))


def test_predicted_ignore_is_a_miss_and_plain_square_matrix_accepted():
    conf = confusion_matrix(PRED, GT, 3)
    assert conf[:, 3].tolist() == [0, 0, 1]  # the extra column
    # A (C, C) matrix without that column treats the pixel as if it had not been labelled.
    square = conf[:, :3]
    assert iou_per_class(square)[2] == pytest.approx(2 / 3)
    assert pixel_accuracy(square) == pytest.approx(8 / 10)
    with pytest.raises(ValueError, match="confusion matrix"):
        iou_per_class(np.zeros((3, 5)))


def test_all_ignored_gives_nan():
    conf = confusion_matrix(PRED, np.full_like(GT, 255), 3)
    assert conf.sum() == 0
    assert np.isnan(mean_iou(conf)) and np.isnan(pixel_accuracy(conf))


def test_confusion_matches_python_loop():
    rng = np.random.default_rng(0)
    c = 5
    gt = rng.integers(0, c, size=(23, 17))
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = rng.integers(0, c, size=gt.shape)
    pred[rng.random(gt.shape) < 0.1] = 255
    pred[0, :3] = [7, 200, 5]  # other out-of-range predictions join the ignore column
    expected = np.zeros((c, c + 1), dtype=np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g == 255:
            continue
        expected[g, p if 0 <= p < c else c] += 1
    conf = confusion_matrix(pred.astype(np.uint8), gt.astype(np.uint8), c)
    np.testing.assert_array_equal(conf, expected)
    # IoU straight from the loop's counts
    for k in range(c):
        tp = expected[k, k]
        union = expected[k].sum() + expected[:, k].sum() - tp
        assert iou_per_class(conf)[k] == pytest.approx(tp / union)


def test_confusion_errors():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(PRED, np.where(GT == 2, 3, GT), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:, :3], GT, 3)
    with pytest.raises(TypeError):
        confusion_matrix(PRED.astype(float), GT, 3)


# ---------------------------------------------------------------------------------------------
# CAMs → labels
# ---------------------------------------------------------------------------------------------

# Six pixels, K = 2 CAMs with keys [4, 11] → labels 5 and 12. Per pixel (cam0, cam1), max m:
#   a (0.9, 0.1):  p=1 bg 0.1 → 5;    p=2 bg 0.01 → 5;    const 0.3 → 5
#   b (0.3, 0.6):  p=1 bg 0.4 → 12;   p=2 bg 0.16 → 12;   const 0.3 → 12
#   c (0.4, 0.2):  p=1 bg 0.6 → 0;    p=2 bg 0.36 → 5;    const 0.3 → 5
#   d (0, 0):      bg 1 → 0;          bg 1 → 0;           const 0.3 → 0
#   e (0.5, 0.5):  p=1 bg 0.5 ties → 0 (bg first); p=2 bg 0.25 → 5 (first class); const → 5
#   f (0.2, 0.35): p=1 bg 0.65 → 0;   p=2 bg 0.4225 → 0;  const 0.3 → 12
HAND_CAMS = np.array([[[0.9, 0.3, 0.4, 0.0, 0.5, 0.2]],
                      [[0.1, 0.6, 0.2, 0.0, 0.5, 0.35]]])
HAND_KEYS = np.array([4, 11])


@pytest.mark.parametrize("power, expected", [
    (1, [5, 12, 0, 0, 0, 0]),
    (2, [5, 12, 5, 0, 5, 0]),
    (0.3, [5, 12, 5, 0, 5, 12]),
])
def test_labels_from_cams_by_hand(power, expected):
    labels = labels_from_cams(HAND_CAMS, HAND_KEYS, power)
    assert labels.dtype == np.uint8 and labels.shape == (1, 6)
    assert labels[0].tolist() == expected


def test_labels_from_cams_zero_and_empty():
    assert not labels_from_cams(np.zeros((3, 4, 5), np.float16), np.array([0, 1, 2]), 1).any()
    empty = labels_from_cams(np.zeros((0, 4, 5), np.float16), np.zeros(0, np.int64), 2)
    assert empty.shape == (4, 5) and not empty.any()
    with pytest.raises(ValueError):
        labels_from_cams(HAND_CAMS, HAND_KEYS, 0)
    with pytest.raises(ValueError):
        labels_from_cams(HAND_CAMS, np.array([4]), 1)


@pytest.mark.parametrize("power", [1, 2, 3, 0.4])
def test_labels_from_cams_equals_literal_argmax(power):
    """Same as CLIP-ES: concatenate the bg score (in the CAMs' float16), argmax, map through keys + 1."""
    rng = np.random.default_rng(1)
    cams = (rng.integers(0, 9, size=(3, 20, 30)) / 8).astype(np.float16)  # coarse values → many ties
    keys = np.array([2, 7, 19])
    if power < 1:
        bg = np.full((1, 20, 30), power, dtype=np.float16)
    else:
        bg = np.power(1 - np.max(cams, axis=0, keepdims=True), power)
    assert bg.dtype == np.float16
    expected = np.pad(keys + 1, (1, 0))[np.argmax(np.concatenate([bg, cams]), axis=0)]
    np.testing.assert_array_equal(labels_from_cams(cams, keys, power), expected)


def test_labels_from_cams_uses_float16_like_clip_es():
    """m = float16(0.382): in float16 (1 − m)² rounds to 0.382 ≥ m → background; in float64 it is
    0.38183 < m → class. CLIP-ES computes the score in the file's float16, so background."""
    cams = np.array([[[0.382]]], dtype=np.float16)
    assert labels_from_cams(cams, np.array([0]), 2)[0, 0] == 0
    assert labels_from_cams(cams.astype(np.float64), np.array([0]), 2)[0, 0] == 1


# ---------------------------------------------------------------------------------------------
# Safe .npy loading
# ---------------------------------------------------------------------------------------------

CALLED = []


def _side_effect(*args):
    CALLED.append(args)
    return 0


class _Evil:
    def __init__(self, reducer):
        self.reducer = reducer

    def __reduce__(self):
        return self.reducer


def test_load_cam_npy_round_trip(tmp_path):
    record = {"keys": np.array([3, 14], dtype=np.int64),
              "attn_highres": np.random.default_rng(0).random((2, 5, 7)).astype(np.float16),
              "highres": np.arange(70, dtype=np.float32).reshape(2, 5, 7)}
    np.save(tmp_path / "a.npy", record)
    loaded = load_cam_npy(tmp_path / "a.npy")
    assert sorted(loaded) == sorted(record)
    for key, value in record.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    # The writer of this project
    save_cams_npy(tmp_path / "b.npy", [0, 19], np.ones((2, 3, 4)), highres=np.zeros((2, 3, 4)))
    loaded = load_cam_npy(tmp_path / "b.npy")
    assert loaded["keys"].tolist() == [0, 19] and loaded["attn_highres"].dtype == np.float16


def test_load_cam_npy_reads_numpy1_protocol3_files(tmp_path):
    """CLIP-ES wrote its files with NumPy 1.x: protocol 3, GLOBAL 'numpy.core.multiarray _reconstruct'."""
    from numpy.lib import format as npy_format

    record = {"keys": np.array([1], dtype=np.int64), "attn_highres": np.full((1, 2, 3), 0.5, np.float16)}
    payload = pickle.dumps(np.array(record, dtype=object), protocol=3)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in payload
    payload = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
    (tmp_path / "old.npy").write_bytes(buffer.getvalue() + payload)
    loaded = load_cam_npy(tmp_path / "old.npy")
    np.testing.assert_array_equal(loaded["attn_highres"], record["attn_highres"])


def test_load_cam_npy_refuses_malicious_pickles(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "system.npy", {"keys": np.zeros(1, np.int64), "x": _Evil((os.system, (f"touch {marker}",)))},
            allow_pickle=True)
    np.save(tmp_path / "flag.npy", {"keys": _Evil((_side_effect, ("ran",)))}, allow_pickle=True)
    CALLED.clear()
    with pytest.raises(ValueError, match="not allowed"):
        load_cam_npy(tmp_path / "system.npy")
    with pytest.raises(ValueError, match="not allowed"):
        load_cam_npy(tmp_path / "flag.npy")
    assert not marker.exists() and CALLED == []
    # The payload is live: an unrestricted load does run it (so the test above can fail).
    np.load(tmp_path / "flag.npy", allow_pickle=True)
    assert CALLED == [("ran",)]


def test_load_cam_npy_refuses_non_cam_files(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 3, 4), np.float16))
    with pytest.raises(ValueError, match="plain float16 array"):
        load_cam_npy(tmp_path / "plain.npy")
    np.save(tmp_path / "list.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a CAM dict|plain object"):
        load_cam_npy(tmp_path / "list.npy")
    np.save(tmp_path / "objarr.npy", {"keys": np.array([1, 2], dtype=object)}, allow_pickle=True)
    with pytest.raises(ValueError, match="numeric array"):
        load_cam_npy(tmp_path / "objarr.npy")
    np.save(tmp_path / "nokeys.npy", {"attn_highres": np.zeros((1, 2, 2))}, allow_pickle=True)
    with pytest.raises(ValueError, match="'keys'"):
        load_cam_npy(tmp_path / "nokeys.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a npy file at all")
    with pytest.raises(ValueError, match="not a valid .npy"):
        load_cam_npy(tmp_path / "junk.npy")
    good = io.BytesIO()
    np.save(good, {"keys": np.zeros(3, np.int64)}, allow_pickle=True)
    (tmp_path / "cut.npy").write_bytes(good.getvalue()[:-20])
    with pytest.raises(ValueError, match="corrupt"):
        load_cam_npy(tmp_path / "cut.npy")


# ---------------------------------------------------------------------------------------------
# Folder evaluation on voc-mini
# ---------------------------------------------------------------------------------------------


def _masks(root):
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))}


def test_identical_predictions_score_one(voc_mini, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in (voc_mini / "SegmentationClass").glob("*.png"):
        shutil.copy(p, pred / p.name)
    report = evaluate_folder(pred, voc_mini / "SegmentationClass", progress=False)
    masks = _masks(voc_mini)
    present = sorted(set(np.unique(np.concatenate([m.ravel() for m in masks.values()])).tolist()) - {255})
    assert report.num_images == len(masks) == 11 and report.missing == []
    assert report.miou == 1.0 and report.pixel_acc == 1.0
    assert np.flatnonzero(np.isfinite(report.iou)).tolist() == present
    assert np.all(report.iou[present] == 1.0)
    assert report.bg_power is None and report.per_power == {} and report.pred_format == "png"
    assert report.class_names[0] == "background" and report.class_names[15] == "person"
    labelled = sum(int((m != 255).sum()) for m in masks.values())
    assert report.confusion.sum() == labelled


def test_corrupted_predictions_expected_drop(voc_mini, tmp_path):
    """Relabel every horse (13) as dog (12) and blank the top half of the aeroplanes (1) in one image."""
    pred = tmp_path / "pred"
    masks = _masks(voc_mini)
    removed = 0
    for stem, gt in masks.items():
        label = gt.copy()
        label[gt == 13] = 12
        if stem == "vainf_000":
            top = np.zeros(gt.shape, bool)
            top[: gt.shape[0] // 2] = True
            removed = int((top & (gt == 1)).sum())
            label[top & (gt == 1)] = 0
        save_label_png(label, pred / f"{stem}.png")
    assert removed > 0
    report = evaluate_folder(pred, voc_mini / "SegmentationClass", progress=False)

    # Independent expectation from pixel counts.
    n = {c: sum(int((m == c).sum()) for m in masks.values()) for c in range(21)}
    expected = {c: 1.0 for c in range(21) if n[c] > 0}
    expected[13] = 0.0  # never predicted any more
    expected[12] = 0.0  # absent from gt, now predicted
    expected[1] = (n[1] - removed) / n[1]
    expected[0] = n[0] / (n[0] + removed)
    for c in range(21):
        if c in expected:
            assert report.iou[c] == pytest.approx(expected[c]), c
        else:
            assert np.isnan(report.iou[c]), c
    assert report.miou == pytest.approx(np.mean(list(expected.values())))
    labelled = sum(n.values())
    assert report.pixel_acc == pytest.approx((labelled - n[13] - removed) / labelled)
    assert report.recall[1] == pytest.approx((n[1] - removed) / n[1]) and report.precision[1] == 1.0


def test_pseudo_label_ignore_regions_lower_recall(voc_mini, tmp_path):
    pred = tmp_path / "pred"
    masks = _masks(voc_mini)
    stem, gt = next(iter(masks.items()))
    label = gt.copy()
    fg = np.flatnonzero((gt.ravel() != 0) & (gt.ravel() != 255))
    hidden = fg[::3]
    label.ravel()[hidden] = 255
    save_label_png(label, pred / f"{stem}.png")
    report = evaluate_folder(pred, voc_mini / "SegmentationClass", progress=False)
    cls = int(gt.ravel()[fg[0]])
    assert report.recall[cls] == pytest.approx(1 - hidden.size / fg.size)
    assert report.precision[cls] == 1.0
    assert report.iou[cls] == pytest.approx(1 - hidden.size / fg.size)
    assert report.confusion[cls, -1] == hidden.size
    assert len(report.missing) == len(masks) - 1


# ---------------------------------------------------------------------------------------------
# Folder evaluation on synthetic data: CAMs, missing files, errors
# ---------------------------------------------------------------------------------------------


def _synthetic_gt(folder, count=3, size=(12, 16)):
    """GT masks: class 3 in a left block, class 8 in a right block, a 255 border row."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = {}
    for i in range(count):
        gt = np.zeros(size, np.uint8)
        gt[2:8, 1 + i:6 + i] = 3
        gt[4:10, 9:14] = 8
        gt[-1] = 255
        save_label_png(gt, folder / f"img{i}.png")
        masks[f"img{i}"] = gt
    return masks


def _cams_for(gt):
    """CAMs with fg pixels at 0.45 and bg at 0.2: p=1 (bg 0.55) misses every object, p=2 (0.3025) gets all.

    Channel order: class 8 first, then 3, then an absent class 5 at 0.1 (keys 0-based: 7, 2, 4)."""
    cams = np.full((3,) + gt.shape, 0.2, np.float32)
    cams[0][gt == 8] = 0.45
    cams[1][gt == 3] = 0.45
    cams[2] = 0.1
    return np.array([7, 2, 4]), cams


def test_npy_power_search_picks_p2(tmp_path):
    masks = _synthetic_gt(tmp_path / "gt")
    pred = tmp_path / "pred"
    for stem, gt in masks.items():
        keys, cams = _cams_for(gt)
        if stem == "img0":  # one CLIP-ES style file written directly with np.save
            pred.mkdir()
            np.save(pred / f"{stem}.npy", {"keys": keys, "attn_highres": cams.astype(np.float16)})
        else:
            save_cams_npy(pred / f"{stem}.npy", keys, cams, highres=np.zeros_like(cams))
    report = evaluate_folder(pred, tmp_path / "gt", progress=False)
    assert report.pred_format == "npy" and report.cam_key == "attn_highres"
    assert report.bg_power == 2 and list(report.per_power) == [1, 2]
    assert report.per_power[2] == 1.0 and report.miou == 1.0
    # p = 1: everything is background → IoU_bg = #bg / #labelled, IoU_3 = IoU_8 = 0.
    labelled = sum(int((m != 255).sum()) for m in masks.values())
    n_bg = sum(int((m == 0).sum()) for m in masks.values())
    assert report.per_power[1] == pytest.approx((n_bg / labelled + 0 + 0) / 3)
    assert np.flatnonzero(np.isfinite(report.iou)).tolist() == [0, 3, 8]  # absent class 5 never wins

    # The initial CAMs (all zero) give only background; a range of powers is searched in one pass.
    report = evaluate_folder(pred, tmp_path / "gt", bg_powers=parse_bg_powers("1:3"), progress=False,
                             cam_key="highres", exclude=[pred / "img0.npy"])
    assert report.num_images == 2 and report.missing == ["img0"]
    assert list(report.per_power) == [1, 2, 3] and report.bg_power == 1  # all tie → first
    assert report.iou[3] == 0.0 and report.recall[0] == 1.0


def test_missing_predictions_are_listed(tmp_path):
    masks = _synthetic_gt(tmp_path / "gt", count=4)
    for stem in ("img1", "img3"):
        save_label_png(masks[stem], tmp_path / "pred" / f"{stem}.png")
    report = evaluate_folder(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert report.num_images == 2 and report.missing == ["img0", "img2"]
    assert report.miou == 1.0
    assert report.confusion.sum() == sum(int((masks[s] != 255).sum()) for s in ("img1", "img3"))
    table = format_table(report)
    assert "2 ground-truth mask(s) have no prediction" in table and "img0, img2" in table


def test_folder_errors(tmp_path):
    masks = _synthetic_gt(tmp_path / "gt")
    # size mismatch, PNG
    save_label_png(masks["img0"][:-2], tmp_path / "p1" / "img0.png")
    with pytest.raises(ValueError, match=r"img0\.png: prediction size \(10, 16\) does not match"):
        evaluate_folder(tmp_path / "p1", tmp_path / "gt", progress=False)
    # size mismatch, npy
    keys, cams = _cams_for(masks["img1"])
    save_cams_npy(tmp_path / "p2" / "img1.npy", keys, cams[:, :, :-1])
    with pytest.raises(ValueError, match=r"img1\.npy: prediction size \(12, 15\)"):
        evaluate_folder(tmp_path / "p2", tmp_path / "gt", progress=False)
    # prediction without ground truth
    save_label_png(masks["img0"], tmp_path / "p3" / "other.png")
    with pytest.raises(ValueError, match="no ground truth.*other"):
        evaluate_folder(tmp_path / "p3", tmp_path / "gt", progress=False)
    # empty folder
    (tmp_path / "p4").mkdir()
    with pytest.raises(ValueError, match="no .png label maps or .npy"):
        evaluate_folder(tmp_path / "p4", tmp_path / "gt", progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate_folder(tmp_path / "nope", tmp_path / "gt", progress=False)
    # RGB prediction, keys beyond num_classes, missing CAM entry
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "p5.png")
    (tmp_path / "p5").mkdir()
    shutil.move(tmp_path / "p5.png", tmp_path / "p5" / "img0.png")
    with pytest.raises(ValueError, match="mode RGB"):
        evaluate_folder(tmp_path / "p5", tmp_path / "gt", progress=False)
    save_cams_npy(tmp_path / "p6" / "img0.npy", [25], np.zeros((1, 12, 16)))
    with pytest.raises(ValueError, match="num_classes=21"):
        evaluate_folder(tmp_path / "p6", tmp_path / "gt", progress=False)
    with pytest.raises(ValueError, match="no 'nope' entry"):
        evaluate_folder(tmp_path / "p6", tmp_path / "gt", progress=False, cam_key="nope")
    # gt value beyond num_classes names the file
    with pytest.raises(ValueError, match=r"img0\.png.*outside 0\.\.4"):
        evaluate_folder(tmp_path / "gt", tmp_path / "gt", num_classes=5, progress=False)


def test_png_wins_over_npy_in_mixed_folder(tmp_path):
    masks = _synthetic_gt(tmp_path / "gt", count=2)
    save_label_png(masks["img0"], tmp_path / "pred" / "img0.png")
    np.save(tmp_path / "pred" / "img1.npy", np.zeros(3))  # would be refused if it were read
    report = evaluate_folder(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert report.pred_format == "png" and report.num_images == 1 and report.missing == ["img1"]


# ---------------------------------------------------------------------------------------------
# Reports and the `eval` command
# ---------------------------------------------------------------------------------------------


def _parse(argv):
    return build_parser().parse_args(argv)


def test_parse_bg_powers_and_class_names():
    assert parse_bg_powers("1,2") == (1, 2)
    assert parse_bg_powers("1:10") == tuple(range(1, 11))
    assert parse_bg_powers("0.2:0.5:0.1") == (0.2, 0.3, 0.4, 0.5)
    assert parse_bg_powers("1, 3:4") == (1, 3, 4)
    for bad in ("", "a", "3:1", "0", "-1", "1:2:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bg_powers(bad)
    assert len(resolve_class_names("voc")) == 21 and len(resolve_class_names("coco")) == 81
    assert resolve_class_names("coco")[:2] == ("background", "person")
    assert resolve_class_names("cat, dog") == ("background", "cat", "dog")
    assert resolve_class_names(None, 4) == ("background", "class 1", "class 2", "class 3")
    with pytest.raises(ValueError):
        resolve_class_names("voc", 81)


def test_eval_command_end_to_end(tmp_path, capsys):
    masks = _synthetic_gt(tmp_path / "gt")
    for stem, gt in masks.items():
        keys, cams = _cams_for(gt)
        save_cams_npy(tmp_path / "pred" / f"{stem}.npy", keys, cams)
    args = _parse(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                   "--bg-power", "1:3", "--no-progress"])
    assert cmd_eval(args) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "best bg power   p=2" in out and "horse" in out
    doc = json.loads((tmp_path / "pred_eval.json").read_text())
    assert doc["miou"] == 1.0 and doc["bg_power"] == 2 and set(doc["per_power"]) == {"1", "2", "3"}
    assert doc["classes"][1]["iou"] is None and doc["classes"][3]["iou"] == 1.0  # NaN → null
    assert doc["classes"][8]["name"] == "cat" and len(doc["confusion"]) == 21 and len(doc["confusion"][0]) == 22
    with Image.open(tmp_path / "pred_confusion.png") as im:
        im.verify()
        assert im.format == "PNG"
    # The reports sit beside the prediction folder, never in it, and a second run works.
    assert {p.suffix for p in (tmp_path / "pred").iterdir()} == {".npy"}
    assert cmd_eval(args) == 0

    # PNG predictions, custom class names, explicit output paths
    save_label_png(np.where(masks["img0"] == 8, 3, masks["img0"]).astype(np.uint8), tmp_path / "lab" / "img0.png")
    args = _parse(["eval", "--pred", str(tmp_path / "lab"), "--gt", str(tmp_path / "gt"),
                   "--class-names", ",".join(f"c{i}" for i in range(1, 9)), "--no-progress",
                   "--json", str(tmp_path / "r" / "e.json"), "--confusion-png", str(tmp_path / "r" / "c.png")])
    assert cmd_eval(args) == 0
    captured = capsys.readouterr()
    assert "2 ground-truth mask(s)" in captured.err
    doc = json.loads((tmp_path / "r" / "e.json").read_text())
    assert doc["num_classes"] == 9 and doc["classes"][8]["name"] == "c8" and doc["classes"][8]["iou"] == 0.0
    assert doc["bg_power"] is None and doc["per_power"] == {} and doc["missing"] == ["img1", "img2"]
    assert Image.open(tmp_path / "r" / "c.png").size[0] > 100


def test_report_writers_handle_ignore_column(tmp_path):
    conf = confusion_matrix(PRED, GT, 3)
    precision, recall = precision_recall(conf)
    report = EvalReport(miou=mean_iou(conf), iou=iou_per_class(conf), precision=precision, recall=recall,
                        pixel_acc=pixel_accuracy(conf), confusion=conf, class_names=("bg", "a", "b"),
                        num_images=1, bg_power=None)
    table = format_table(report)
    assert "61.67" in table and "72.73" in table and "predicted ignore on labelled pixels: 1" in table
    save_report_json(report, tmp_path / "r.json")
    save_report_json(report, tmp_path / "r.json")  # replaces
    assert json.loads((tmp_path / "r.json").read_text())["confusion"] == EXPECTED_CONF
    save_confusion_png(report, tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as im:
        im.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "r.json"]  # no temp files left
