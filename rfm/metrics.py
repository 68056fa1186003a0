"""Segmentation metrics of ``rfm eval`` (CLIP-ES evaluation, REFERENCE §2.5), pure numpy.

Confusion matrix convention
---------------------------
``conf[g, p]`` counts pixels whose ground truth is class ``g`` and whose prediction is ``p``
(rows = ground truth, columns = prediction). Ground-truth pixels equal to ``ignore_index`` (255)
are skipped. :func:`confusion_matrix` returns **C + 1 columns**: the last one counts pixels with a
valid ground truth whose prediction is not a class index (``pred < 0`` or ``pred >= C``, in
practice the 255 "ignore" region of confidence-thresholded pseudo labels). Such a pixel is a
**miss** for its ground-truth class (a false negative: it lowers that class's recall, IoU and the
pixel accuracy) and a false positive for no class. Every metric function also accepts a plain
(C, C) matrix.

With TP_c = conf[c, c], FN_c = Σ_{all columns} conf[c, :] − TP_c and FP_c = Σ_g conf[g, c] − TP_c:

- IoU_c = TP_c / (TP_c + FP_c + FN_c), NaN when class c is absent from both ground truth and
  prediction; mIoU = nanmean_c IoU_c (CLIP-ES / chainercv ``calc_semantic_segmentation_iou``).
- precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c) (NaN on a zero denominator).
- pixel accuracy = Σ_c TP_c / Σ conf.

CAM predictions
---------------
A CAM file (CLIP-ES ``.npy``, §2.4) holds ``keys`` (K,) 0-based class ids and CAMs (K, H, W).
Labels = argmax over [bg; cams] mapped through [0, keys + 1], with bg = (1 − max_k cams)^p
(p ≥ 1) or the constant p (0 < p < 1, CLIP-ES's padding for non-attention CAMs). CLIP-ES searches
p ∈ {1, 2} for attention CAMs and reports the best; :func:`evaluate_folder` does the same.

CAM files are read by :func:`load_cam_npy`, which never runs code from the file: the pickle
payload goes through an unpickler that only knows ``numpy.ndarray``, ``numpy.dtype`` and numpy's
``_reconstruct``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .constants import IGNORE_INDEX
from .data import load_npy_dict
from .fileio import save_json

__all__ = [
    "EvalReport",
    "confusion_matrix",
    "evaluate_folder",
    "format_table",
    "iou_per_class",
    "labels_from_cams",
    "load_cam_npy",
    "mean_iou",
    "pixel_accuracy",
    "precision_recall",
    "report_to_dict",
    "resolve_class_names",
    "save_report_json",
]


# --------------------------------------------------------------------------------------------
# Safe loading of CLIP-ES / rfm .npy CAM files
# --------------------------------------------------------------------------------------------

def load_cam_npy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A CAM ``.npy`` (CLIP-ES format, §2.4), read by :func:`rfm.data.load_npy_dict` (no pickle code runs)."""
    obj = load_npy_dict(path)
    if "keys" not in obj:
        raise ValueError(f"{path}: CAM dict has no 'keys' entry (has {sorted(obj)})")
    return obj


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """(C, C + 1) int64 confusion matrix of an (H, W) prediction against its (H, W) ground truth.

    ``conf[g, p]`` = #pixels with gt == g and pred == p for 0 ≤ g, p < C; column C counts
    pixels with a valid gt whose prediction is outside 0..C−1 (e.g. predicted 255 = ignore):
    misses for the gt class, false positives for nobody. Pixels with gt == ``ignore_index``
    are skipped whatever their prediction. A gt value outside 0..C−1 that is not
    ``ignore_index`` raises :class:`ValueError` (wrong ``num_classes``).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    for name, array in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise TypeError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        valid = gt != ignore_index
        gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])
        raise ValueError(f"ground truth holds values {bad[:10].tolist()} outside 0..{num_classes - 1} "
                         f"(ignore = {ignore_index}); is num_classes right?")
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    width = num_classes + 1
    counts = np.bincount(gt * width + pred, minlength=num_classes * width)
    return counts.reshape(num_classes, width).astype(np.int64)


def _counts(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, gt total = TP + FN, predicted total = TP + FP), each (C,) float64."""
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C + 1), got {conf.shape}")
    c = conf.shape[0]
    conf = conf.astype(np.float64)
    tp = np.diagonal(conf[:, :c]).copy()
    return tp, conf.sum(axis=1), conf[:, :c].sum(axis=0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(C,) IoU_c = TP_c / (TP_c + FP_c + FN_c) = conf[c,c] / (row_c + col_c − conf[c,c]); NaN if absent from both."""
    tp, gt_total, pred_total = _counts(conf)
    return _ratio(tp, gt_total + pred_total - tp)


def mean_iou(conf: np.ndarray) -> float:
    """mIoU = nanmean_c IoU_c: classes absent from both ground truth and prediction are left out (NaN if none)."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def precision_recall(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((C,) precision TP/(TP+FP), (C,) recall TP/(TP+FN)); NaN where never predicted / absent from gt."""
    tp, gt_total, pred_total = _counts(conf)
    return _ratio(tp, pred_total), _ratio(tp, gt_total)


def pixel_accuracy(conf: np.ndarray) -> float:
    """Σ_c TP_c / Σ conf over all non-ignored gt pixels (predicted-ignore pixels count as wrong); NaN if empty."""
    tp, gt_total, _ = _counts(conf)
    total = gt_total.sum()
    return float(tp.sum() / total) if total > 0 else math.nan


# --------------------------------------------------------------------------------------------
# CAMs → labels
# --------------------------------------------------------------------------------------------


def _check_power(bg_power: float) -> float:
    p = float(bg_power)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"bg_power must be a positive number, got {bg_power!r}")
    return p


def _cam_argmax(cams: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max_k cams (H, W), foreground label keys[argmax_k] + 1 (H, W) int64) for K ≥ 1."""
    index = np.argmax(cams, axis=0)
    fg_max = np.take_along_axis(cams, index[None], axis=0)[0]
    return fg_max, (keys.astype(np.int64) + 1)[index]


def _bg_score(fg_max: np.ndarray, bg_power: float) -> np.ndarray:
    """(1 − max cams)^p for p ≥ 1, the constant p for p < 1, in the CAMs' dtype as CLIP-ES computes it."""
    dtype = fg_max.dtype if np.issubdtype(fg_max.dtype, np.floating) else np.float64
    p = int(bg_power) if float(bg_power).is_integer() else float(bg_power)
    if p < 1:
        return np.asarray(p, dtype=dtype)
    score = 1 - fg_max.astype(dtype, copy=False)
    return score if p == 1 else np.power(score, p)  # x¹ is x exactly; numpy's float16 power is slow


def labels_from_cams(cams: np.ndarray, keys: np.ndarray, bg_power: float) -> np.ndarray:
    """(H, W) uint8 labels from (K, H, W) CAMs with (K,) 0-based ``keys`` (REFERENCE §2.5).

    scores = [bg; cams] with bg = (1 − max_k cams)^p (p ≥ 1) or the constant p (0 < p < 1);
    label = [0, keys + 1][argmax scores]. Ties go to the first entry (background first, then the
    lower k), as ``np.argmax``; so all-zero CAMs give background everywhere, as does K = 0.
    """
    cams = np.asarray(cams)
    keys = np.asarray(keys).reshape(-1)
    p = _check_power(bg_power)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {keys.size}, got {cams.shape}")
    if keys.size and (keys.min() < 0 or keys.max() + 1 >= IGNORE_INDEX):
        raise ValueError(f"keys must be 0-based class ids in 0..{IGNORE_INDEX - 2}, got {keys.tolist()}")
    if keys.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    fg_max, fg_label = _cam_argmax(cams, keys)
    # argmax over [bg; cams] is 0 exactly when bg >= every cam, i.e. bg >= max_k cams.
    return np.where(_bg_score(fg_max, p) >= fg_max, 0, fg_label).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Folder evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """Result of :func:`evaluate_folder`; metrics are for ``bg_power`` (the best searched p) for CAMs."""

    miou: float
    iou: np.ndarray  # (C,)
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,)
    pixel_acc: float
    confusion: np.ndarray  # (C, C + 1), last column = predicted outside 0..C-1 (ignore)
    class_names: tuple[str, ...]
    num_images: int
    bg_power: float | None  # None for PNG predictions
    per_power: dict = field(default_factory=dict)  # p → mIoU for every searched p ({} for PNG)
    missing: list = field(default_factory=list)  # gt stems without a prediction (not evaluated)
    pred_format: str = "png"  # "png" or "npy"
    cam_key: str | None = None  # CAM entry evaluated for npy predictions

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_class_names(spec: str | Sequence[str] | None, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names with background first: 'voc' (21), 'coco' (81), 'synthetic' (13), 'a,b,c' or a sequence of
    foreground names (background is prepended), or None: VOC for 21 classes, COCO for 81,
    else 'class 1'… ``num_classes``, when given, must match."""
    if spec is None:
        if num_classes in (None, 21):
            spec = "voc"
        elif num_classes == 81:
            spec = "coco"
        else:
            if num_classes < 1:
                raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
            return ("background",) + tuple(f"class {i}" for i in range(1, num_classes))
    if isinstance(spec, str):
        from .text import NAMED

        if spec.lower() in NAMED:
            names = ("background",) + NAMED[spec.lower()].class_names
        else:
            names = ("background",) + tuple(n.strip() for n in spec.split(",") if n.strip())
    else:
        names = ("background",) + tuple(str(n) for n in spec)
    if len(names) < 2:
        raise ValueError(f"no class names in {spec!r}")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names (background included) for num_classes={num_classes}")
    return names


def read_label_png(path: Path) -> np.ndarray:
    """(H, W) integer class-index map of a palette / grayscale PNG."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16", "1"):
                raise ValueError(f"{path}: mode {image.mode} image; expected a single-channel "
                                 "class-index PNG (palette or grayscale)")
            return np.asarray(image)
    except (OSError, SyntaxError) as err:  # Pillow's errors for damaged or non-image files
        raise ValueError(f"{path}: cannot read the label PNG ({err})") from None


def _list_files(folder: Path, suffix: str, exclude: set) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() == suffix and p.is_file() and not p.name.startswith(".")
            and p.resolve() not in exclude}


def _read_cams(path: Path, cam_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """((K, H, W) CAMs, (K,) 0-based keys) of a CAM file, checked against ``num_classes``."""
    record = load_cam_npy(path)
    if cam_key not in record:
        raise ValueError(f"{path}: no '{cam_key}' entry (has {sorted(record)})")
    cams, keys = record[cam_key], record["keys"].reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"{path}: '{cam_key}' must be (K, H, W) with K = len(keys) = {keys.size}, "
                         f"got {cams.shape}")
    if not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"{path}: '{cam_key}' holds {cams.dtype} values, expected floating-point CAMs")
    if not np.isfinite(cams).all():  # NaN compares false everywhere: the file would silently score 0
        raise ValueError(f"{path}: '{cam_key}' holds NaN or infinite values")
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"{path}: keys must be integer class ids, got {keys.dtype}")
    if keys.size and (keys.min() < 0 or keys.max() + 1 >= num_classes):
        raise ValueError(f"{path}: keys {keys.tolist()} do not fit num_classes={num_classes} "
                         "(keys are 0-based foreground ids, label = key + 1)")
    return cams, keys


def power_key(p: float) -> float | int:
    p = float(p)
    return int(p) if p.is_integer() else p


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, num_classes: int = 21,
                    class_names: Sequence[str] | None = None, bg_powers: Sequence[float] = (1, 2),
                    progress: bool = True, *, cam_key: str = "attn_highres",
                    exclude: Iterable[str | os.PathLike] = ()) -> EvalReport:
    """Evaluate every prediction in ``pred_dir`` against ``gt_dir/<stem>.png``.

    Predictions are ``<stem>.png`` label maps if the folder holds any ``.png`` (other files are
    ignored), else ``<stem>.npy`` CAM files (:func:`load_cam_npy`, entry ``cam_key``). Each
    prediction needs its ground truth (else :class:`ValueError`); ground truths without a
    prediction are not evaluated and are listed in ``report.missing``. Files are streamed one
    at a time. For CAMs one confusion matrix per p in ``bg_powers`` is accumulated in the same
    pass; the report holds the best p's metrics (the first on ties) and ``per_power`` all mIoUs.
    ``class_names`` is the full list, background first (default: see :func:`resolve_class_names`).
    Files in ``exclude`` are never taken as predictions.
    """
    from tqdm import tqdm

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    names = (resolve_class_names(None, num_classes) if class_names is None
             else tuple(str(n) for n in class_names))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for num_classes={num_classes}")
    excluded = {Path(p).resolve() for p in exclude}

    preds = _list_files(pred_dir, ".png", excluded)
    pred_format = "png"
    if not preds:
        preds = _list_files(pred_dir, ".npy", excluded)
        pred_format = "npy"
    if not preds:
        raise ValueError(f"{pred_dir} holds no .png label maps or .npy CAM files")
    gts = _list_files(gt_dir, ".png", set())
    orphans = [s for s in preds if s not in gts]
    if orphans:
        raise ValueError(f"{len(orphans)} prediction(s) have no ground truth {gt_dir}/<stem>.png: "
                         f"{', '.join(orphans[:5])}{' …' if len(orphans) > 5 else ''}")
    missing = sorted(s for s in gts if s not in preds)

    powers = [None] if pred_format == "png" else [power_key(_check_power(p)) for p in bg_powers]
    if not powers:
        raise ValueError("bg_powers is empty")
    powers = list(dict.fromkeys(powers))  # drop repeats, keep order
    confs = {p: np.zeros((num_classes, num_classes + 1), dtype=np.int64) for p in powers}

    for stem in tqdm(preds, desc="eval", unit="img", disable=not progress):
        path = preds[stem]
        gt = read_label_png(gts[stem])
        if gt.ndim != 2:
            raise ValueError(f"{gts[stem]}: ground truth must be (H, W), got {gt.shape}")
        if pred_format == "png":
            labels = {None: read_label_png(path)}
            size = labels[None].shape
        else:
            cams, keys = _read_cams(path, cam_key, num_classes)
            size = cams.shape[1:]
        if size != gt.shape:
            raise ValueError(f"{path}: prediction size {size} does not match ground truth "
                             f"{gts[stem]} size {gt.shape}")
        if pred_format == "npy":
            if keys.size == 0:
                labels = {p: np.zeros(size, dtype=np.int64) for p in powers}
            else:
                fg_max, fg_label = _cam_argmax(cams, keys)  # shared by every p
                labels = {p: np.where(_bg_score(fg_max, p) >= fg_max, 0, fg_label) for p in powers}
        for p, label in labels.items():
            try:
                confs[p] += confusion_matrix(label, gt, num_classes)
            except ValueError as err:
                raise ValueError(f"{gts[stem]}: {err}") from None

    per_power = {p: mean_iou(confs[p]) for p in powers} if pred_format == "npy" else {}
    best = powers[0]
    if per_power:  # max() keeps the first of equal values, so the first p wins ties; NaN never wins
        best = max(powers, key=lambda p: -math.inf if math.isnan(per_power[p]) else per_power[p])
    conf = confs[best]
    precision, recall = precision_recall(conf)
    return EvalReport(miou=mean_iou(conf), iou=iou_per_class(conf), precision=precision, recall=recall,
                      pixel_acc=pixel_accuracy(conf), confusion=conf, class_names=names,
                      num_images=len(preds), bg_power=best, per_power=per_power, missing=missing,
                      pred_format=pred_format, cam_key=cam_key if pred_format == "npy" else None)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_table(report: EvalReport) -> str:
    """Terminal table: per-class IoU / precision / recall (%) and gt pixels, then mIoU, pixel accuracy, best p."""
    width = max(12, max(len(n) for n in report.class_names))
    gt_pixels = report.confusion.sum(axis=1)
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'prec':>7}  {'recall':>7}  {'gt px':>11}",
             "-" * (width + 41)]
    for i, name in enumerate(report.class_names):
        lines.append(f"{name:<{width}}  {percent(report.iou[i]):>7}  {percent(report.precision[i]):>7}  "
                     f"{percent(report.recall[i]):>7}  {int(gt_pixels[i]):>11}")
    lines.append("-" * (width + 41))
    counted = int(np.isfinite(report.iou).sum())
    lines.append(f"mIoU            {percent(report.miou)}  (mean over the {counted} of {report.num_classes} "
                 "classes in gt or prediction)")
    lines.append(f"pixel accuracy  {percent(report.pixel_acc)}")
    total = report.confusion.sum()
    unlabelled = int(report.confusion[:, -1].sum()) if report.confusion.shape[1] > report.num_classes else 0
    if unlabelled:
        lines.append(f"predicted ignore on labelled pixels: {unlabelled} ({percent(unlabelled / total)}%), "
                     "counted as misses")
    if report.bg_power is not None:
        searched = ", ".join(f"p={p}: {percent(m)}" for p, m in report.per_power.items())
        lines.append(f"best bg power   p={report.bg_power}  ({searched})")
    lines.append(f"images          {report.num_images} ({report.pred_format})")
    if report.missing:
        shown = ", ".join(report.missing[:5]) + (" …" if len(report.missing) > 5 else "")
        lines.append(f"warning: {len(report.missing)} ground-truth mask(s) have no prediction and were "
                     f"not evaluated: {shown}")
    return "\n".join(lines)


def _json_number(value):
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def report_to_dict(report: EvalReport) -> dict:
    """JSON-ready dict of a report; NaN becomes None (null)."""
    gt_pixels = report.confusion.sum(axis=1)
    pred_pixels = report.confusion[:, :report.num_classes].sum(axis=0)
    return {
        "miou": _json_number(report.miou),
        "pixel_acc": _json_number(report.pixel_acc),
        "bg_power": report.bg_power,
        "per_power": {str(p): _json_number(m) for p, m in report.per_power.items()},
        "num_images": report.num_images,
        "num_classes": report.num_classes,
        "pred_format": report.pred_format,
        "cam_key": report.cam_key,
        "classes": [
            {"index": i, "name": name, "iou": _json_number(report.iou[i]),
             "precision": _json_number(report.precision[i]), "recall": _json_number(report.recall[i]),
             "gt_pixels": int(gt_pixels[i]), "pred_pixels": int(pred_pixels[i])}
            for i, name in enumerate(report.class_names)
        ],
        "confusion": report.confusion.tolist(),
        "confusion_note": "rows = ground truth, columns = prediction; the last column counts labelled "
                          "pixels predicted outside 0..C-1 (ignore), counted as misses",
        "missing": list(report.missing),
    }


def save_report_json(report: EvalReport, path: str | os.PathLike) -> Path:
    """Write :func:`report_to_dict` as UTF-8 JSON (NaN → null), atomically, replacing ``path``."""
    return save_json(report_to_dict(report), path, overwrite=True, allow_nan=False)
