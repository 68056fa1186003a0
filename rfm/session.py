"""One studio session's state and actions, without Gradio: what a browser tab has loaded, chosen,
drawn and computed, and the typed operations the app's events call.

Every tab owns a :class:`Session` (its own ``Predictor``, upload, boxes, result, ground truth,
decoder adaptation and export folder) over the :class:`Models` all tabs share. Model calls take
``Models.lock``, a first-come-first-served lock, so one tab's long decoder adaptation, which takes it
one step at a time, lets the other tabs' refinements in between its steps. Methods raise
:class:`UserMessage` with a sentence for the user; ``rfm.ui`` shows it in the status line.

Decoder adaptation replaces the decoder of this session's predictor only, and belongs to one image:
a new image (or vocabulary, or models) rebuilds the predictor with the shared decoder, and a class
change keeps the adapted decoder but clears its replay.
"""
from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import export, metrics, viz
from .backbone import ClipWeightsNotFound, load_clip
from .constants import STAGES
from .data import ImageError, read_image, xml_labels
from .decoder import load_decoder
from .demo import demo_models
from .params import Box, RefineParams, official_params
from .paths import ASSETS_DIR, CHECKPOINT_DIR, SYNTHETIC_DIR
from .predictor import AdaptSnapshot, AttentionRows, Predictor, Result
from .text import Vocabulary, get_vocabulary

# Generated scenes shown first in the gallery (an `rfm synth` folder: classes from its XML, masks beside).
SCENE_SAMPLES = SYNTHETIC_DIR / "samples"
# Classes worth trying on each sample photo (assets/README.md); spellings resolve through the vocabulary.
SAMPLE_CLASSES = {"astronaut": ("person",), "chelsea": ("cat",), "coffee": ("cup", "spoon", "diningtable")}
DISPLAY_SIDE = 768  # views are drawn at most this large; exports keep the original resolution
# at most this many A_f snapshots per adaptation: each is an (n, n) float32 matrix (4 MB at 512 px), kept per session
MAX_SNAPSHOTS = 20
MAX_ADAPT_STEPS = 200  # the slider's end: each step is a decoder forward and backward on this image
VOCABULARIES = {"Synthetic": "synthetic", "VOC": "voc", "COCO": "coco", "custom": None}
STAGE_TITLES = {"initial": "initial", "static": "static", "rfm": "RFM", "label": "label"}


class UserMessage(Exception):
    """Why an action could not go on, worded for the user (no image yet, a damaged file, …)."""


class FairLock:
    """A mutex granted in arrival order (a ticket lock): a thread that releases and re-acquires it
    between steps lets every thread already waiting go first, which ``threading.Lock`` does not
    promise."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def yield_turn(self) -> None:
        """Let every thread waiting now run once, then continue holding the lock."""
        self.release()
        self.acquire()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Models:
    """The CLIP and decoder every session shares, the lock that serialises model calls, and why
    weights are missing when they are."""

    def __init__(self, clip=None, decoder=None, *, demo: bool = False, error: str | None = None, device=None,
                 builtin: bool = False):
        self.clip, self.decoder, self.demo, self.error, self.device = clip, decoder, demo, error, device
        self.builtin = builtin  # the synthetic-scene CLIP: the app starts on its vocabulary and scenes
        self.lock = FairLock()
        self.version = 0  # bumped when the models change, so sessions rebuild their predictors

    @classmethod
    def load(cls, clip: str = "auto", decoder: str | None = None, device=None, demo: bool = False) -> "Models":
        """Load weights, or demo models with ``demo``. ``clip="auto"`` is OpenAI's ViT-B/16 when
        ``checkpoints/ViT-B-16.pt`` exists, else the built-in synthetic-scene CLIP with its decoder.
        Missing CLIP weights leave the app usable (the banner shows ``error`` and offers demo mode)."""
        if demo:
            return cls.from_demo(device)
        if clip == "auto":
            clip = "openai" if (CHECKPOINT_DIR / "ViT-B-16.pt").is_file() else "synthetic"
        builtin = clip == "synthetic"
        if builtin and decoder is None:
            decoder = "synthetic"
        try:
            model = load_clip("ViT-B-16", pretrained=clip, device=device)
        except ClipWeightsNotFound as err:
            return cls(error=str(err), device=device)
        return cls(model, load_decoder(decoder) if decoder else None, device=device, builtin=builtin)

    @classmethod
    def from_demo(cls, device=None) -> "Models":
        clip, decoder = demo_models(device=device)
        return cls(clip, decoder, demo=True, device=device)

    def enable_demo(self) -> None:
        with self.lock:
            if not self.demo:
                self.clip, self.decoder = demo_models(device=self.device)
                self.demo, self.version = True, self.version + 1

    @property
    def num_blocks(self) -> int:
        return self.clip.num_blocks if self.clip is not None else 12  # ViT-B/16 until weights arrive


# ---------------------------------------------------------------- the knobs


@dataclass(frozen=True)
class Controls:
    """The refinement knobs as the studio offers them (``LIMITS``: the sliders' ranges)."""

    alpha: int = 2
    n0: int = 7
    static_layers: int = 8
    box_threshold: float = 0.4
    bg_power: float = 1.0
    par_iterations: int = 20
    distance: str = "abs"

    LIMITS = {"alpha": (1, 4), "n0": (1, None), "static_layers": (1, None), "box_threshold": (0.05, 0.95),
              "bg_power": (0.25, 4.0), "par_iterations": (0, 50)}  # None: the CLIP's number of blocks
    SYMBOLS = {"alpha": "α", "n0": "N0", "static_layers": "static layers", "box_threshold": "λ",
               "bg_power": "p", "par_iterations": "PAR iterations"}

    @classmethod
    def defaults(cls, vocabulary: str | None = "voc") -> "Controls":
        """The official settings: VOC's, or COCO's λ = 0.7 and N0 = 3 for the COCO vocabulary."""
        d = official_params(vocabulary or "voc")
        return cls(d.alpha, d.n0, d.static_layers, d.box_threshold, d.bg_power, d.par_iterations, d.distance)

    def clamped(self, num_blocks: int) -> tuple["Controls", list[str]]:
        """Values typed outside the sliders' ranges brought inside them, with a note for each."""
        values, notes = {}, []
        for name, (low, high) in self.LIMITS.items():
            high = num_blocks if high is None else high
            raw = getattr(self, name)
            empty = raw is None or (isinstance(raw, float) and math.isnan(raw))
            value = getattr(Controls, name) if empty else min(max(raw, low), high)  # empty: the default
            if isinstance(low, int):
                value = int(round(value))
            if empty:
                notes.append(f"{self.SYMBOLS[name]} was empty: using {value}")
            elif value != raw:
                why = f"is outside {low}..{high}" if not low <= raw <= high else "is not a whole number"
                notes.append(f"{self.SYMBOLS[name]} = {raw:g} {why}: using {value}")
            values[name] = value
        distance = self.distance if self.distance in ("abs", "signed") else "abs"
        return replace(self, distance=distance, **values), notes

    def params(self, boxes: dict[str, list[Box]]) -> RefineParams:
        return RefineParams(alpha=self.alpha, n0=self.n0, static_layers=self.static_layers,
                            box_threshold=self.box_threshold, distance=self.distance, boxes=boxes,
                            bg_power=self.bg_power, par_iterations=self.par_iterations)

    def values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


# ---------------------------------------------------------------- uploads and samples


@dataclass(frozen=True)
class Upload:
    """An image file as the pipeline uses it: the user's own pixels, decoded once by ``rfm.data``."""

    path: Path
    name: str  # the file's own name (the path may be a server cache copy)
    rgb: np.ndarray  # (H, W, 3) uint8, original resolution, EXIF orientation applied
    notes: tuple[str, ...]
    jpeg_bytes: bytes | None  # the file itself when it is a plain RGB JPEG: "Add to dataset" keeps it
    display: np.ndarray  # the image as the views show it (long side ≤ DISPLAY_SIDE)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def scale(self) -> float:
        """Display pixels per original pixel."""
        return self.display.shape[1] / self.rgb.shape[1]


def read_upload(path: str | Path, max_side: int) -> Upload:
    """Decode an uploaded file, or raise :class:`UserMessage` saying in words what is wrong with it."""
    path = Path(path)
    try:
        image = read_image(path)
    except ImageError as err:
        raise UserMessage(f"⚠️ Cannot use this file: {str(err).replace(str(path), path.name)}.") from None
    height, width = image.rgb.shape[:2]
    notes = list(image.notes)
    if max(height, width) > max_side:
        notes.append(f"{width}×{height} image: analysed at long side {max_side}, exported at full size")
    # the file's own bytes only when they are what the pipeline saw (not CMYK, not turned by EXIF)
    jpeg = path.read_bytes() if image.format == "JPEG" and not image.notes else None
    return Upload(path, path.name, image.rgb, tuple(notes), jpeg, viz.thumbnail(image.rgb, DISPLAY_SIDE))


def sample_paths() -> list[Path]:
    """Generated scenes first, then the photos of assets/."""
    def images(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    return images(SCENE_SAMPLES / "JPEGImages") + images(ASSETS_DIR)


def sample_classes(path: Path, vocabulary: Vocabulary | None = None) -> tuple[str, ...]:
    """Classes worth trying on a sample, spelled as ``vocabulary`` spells them (those it lacks left
    out): a generated scene's annotation, or the list for a photo."""
    xml = path.parent.parent / "Annotations" / f"{path.stem}.xml"
    if xml.is_file():
        synthetic = get_vocabulary("synthetic")
        names = tuple(synthetic.class_names[i] for i in xml_labels(xml, synthetic))
    else:
        names = SAMPLE_CLASSES.get(path.stem, ())
    return names if vocabulary is None else map_classes(names, vocabulary)


def sample_mask(path: Path) -> Path | None:
    """A generated scene's own ground-truth mask (class index + 1, 255 outline band), if it has one."""
    mask = path.parent.parent / "SegmentationClass" / f"{path.stem}.png"
    return mask if mask.is_file() else None


def map_classes(names: Sequence[str], vocabulary: Vocabulary) -> tuple[str, ...]:
    """Class names respelled in ``vocabulary`` (COCO's 'dining table' for VOC's 'diningtable'), in
    order, without repeats; names it does not know are left out."""
    out: list[str] = []
    for name in names:
        try:
            mapped = vocabulary.class_names[vocabulary.index(name)]
        except ValueError:
            continue
        if mapped not in out:
            out.append(mapped)
    return tuple(out)


def vocabulary_spec(kind: str | None, custom: str | None) -> str:
    """The ``get_vocabulary`` spec of the vocabulary radio and the custom words box (either may be None)."""
    return VOCABULARIES.get(kind or "VOC") or (custom or "")


# ---------------------------------------------------------------- ground truth and live scores


@dataclass(frozen=True)
class GroundTruth:
    name: str
    mask: np.ndarray  # (H, W) integer: 0 background, class index + 1, 255 ignore
    class_names: tuple[str, ...]  # the vocabulary whose numbering the mask uses


@dataclass(frozen=True)
class Scores:
    """IoU of each stage against the ground truth: for one class, and the mean over the image's classes."""

    class_name: str
    iou: dict[str, float]  # stage → IoU of the shown class (NaN where the stage is missing)
    miou: dict[str, float]  # stage → mIoU over background, the chosen classes and any class of the mask
    classes: tuple[str, ...]  # the classes the mean runs over, background first


def read_ground_truth(path: str | Path, vocabulary: Vocabulary, size: tuple[int, int]) -> GroundTruth:
    """A VOC palette or class-index PNG (class index + 1, 255 ignore) of the image's size."""
    path = Path(path)
    try:
        mask = metrics.read_label_png(path)
    except (OSError, ValueError, SyntaxError) as err:
        raise UserMessage(f"⚠️ Ground-truth mask not used: {str(err).replace(str(path), path.name)}") from None
    if mask.shape != tuple(size):
        raise UserMessage(f"⚠️ Ground-truth mask not used: it is {mask.shape[1]}×{mask.shape[0]} but the image is "
                          f"{size[1]}×{size[0]}")
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(len(vocabulary) + 1), 255])
    if bad.size:
        raise UserMessage(f"⚠️ Ground-truth mask not used: values {bad[:5].tolist()} are not classes of the "
                          f"{vocabulary.name} vocabulary (0 background, 1..{len(vocabulary)}, 255 ignore)")
    return GroundTruth(path.name, mask.astype(np.int64), vocabulary.class_names)


def stage_scores(result: Result, gt: GroundTruth, class_name: str, vocabulary: Vocabulary) -> Scores:
    """IoU per stage against ``gt``. The CAM stages become labels as the pipeline's own background
    does (argmax over [(1 − max CAM)^p; CAMs], p the background power); 'label' is the PAR label."""
    num_classes = len(vocabulary) + 1
    keys = np.asarray(result.class_indices)
    predictions = {stage: result.cam(stage) for stage in ("initial", "static", "rfm")}
    predictions = {stage: None if cams is None else metrics.labels_from_cams(cams, keys, result.params.bg_power)
                   for stage, cams in predictions.items()}
    predictions["label"] = result.label
    shown = vocabulary.index(class_name) + 1
    present = set(np.unique(gt.mask[gt.mask != 255]).tolist())
    classes = sorted({0, *(k + 1 for k in result.class_indices), *present})
    iou, miou = {}, {}
    for stage, pred in predictions.items():
        if pred is None:
            iou[stage] = miou[stage] = math.nan
            continue
        per_class = metrics.iou_per_class(metrics.confusion_matrix(pred, gt.mask, num_classes))
        iou[stage] = float(per_class[shown])
        miou[stage] = float(np.nanmean(per_class[classes]))
    names = tuple("background" if c == 0 else vocabulary.class_names[c - 1] for c in classes)
    return Scores(class_name, iou, miou, names)


# ---------------------------------------------------------------- sweeping one image

@dataclass(frozen=True)
class ImageSweep:
    """mIoU of every stage over an N0 × α grid on one image against its ground truth."""

    upload: Upload  # the image it belongs to
    n0s: tuple[int, ...]
    alphas: tuple[int, ...]
    miou: dict[str, np.ndarray]  # stage → (len(n0s), len(alphas)); NaN where a stage is missing

    def best(self, stage: str) -> tuple[int, int] | None:
        """(row, column) of the highest mIoU of a stage (the first of equals), None if it has none."""
        return viz.best_cell(self.miou[stage])


def sweep_axes(num_blocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The grid of "sweep this image": N0 over the last six blocks (WeCLIP's candidates) and α over its slider."""
    low, high = Controls.LIMITS["alpha"]
    return tuple(range(max(1, num_blocks - 5), num_blocks + 1)), tuple(range(low, high + 1))


# ---------------------------------------------------------------- adaptation


@dataclass
class Adaptation:
    """A decoder fitted to one image in this session, and the snapshots its replay walks through."""

    stem: str
    steps: int = 0
    history: list[AdaptSnapshot] = field(default_factory=list)  # [before, *snapshots]
    losses: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, seg, aff, total)
    shown: int = 0  # index into history that refine() currently uses

    @property
    def snapshot(self) -> AdaptSnapshot | None:
        return self.history[self.shown] if self.history else None


# ---------------------------------------------------------------- the session


@dataclass(frozen=True)
class DatasetReport:
    folder: Path  # absolute
    stem: str
    total: int  # labelled images the folder holds
    added: int  # distinct images this session added


class Session:
    """One browser tab's work over shared :class:`Models`."""

    def __init__(self, models: Models, max_side: int = 512):
        self.models = models
        self.max_side = max_side
        self.lock = threading.RLock()  # one event of this tab at a time
        self.predictor: Predictor | None = None
        self._predictor_key = None
        self.upload: Upload | None = None
        self.classes: tuple[str, ...] = ()
        self.boxes: dict[str, list[Box]] = {}
        self.controls = Controls.defaults()
        self.result: Result | None = None
        self.pixel: tuple[float, float] | None = None  # original image pixel under inspection
        self.rows: AttentionRows | None = None  # attention rows of that pixel
        self.zoom_layer: int | None = None  # 1-based layer enlarged beside A_f
        self.gt: GroundTruth | None = None
        self.adaptation: Adaptation | None = None
        self.image_sweep: ImageSweep | None = None
        self.notes: list[str] = []  # said once in the status line by the next render
        self.dataset_stems: set[tuple[str, str]] = set()  # (folder, stem) added: images, not writes
        self.view_cache: dict = {}  # what the renderer last produced, so unchanged views are not resent
        self._encoded: Upload | None = None  # the upload the predictor's features were computed from
        self._gt_path: str | None = None  # the mask file self.gt was read from …
        self._gt_upload: Upload | None = None  # … for this image
        self._requests = 0  # refine requests announced, so a superseded one is dropped unrun
        self._requests_lock = threading.Lock()
        self._folder: Path | None = None

    def new_request(self) -> int:
        """Announce a refine request (before waiting for :attr:`lock`); returns its ticket."""
        with self._requests_lock:
            self._requests += 1
            return self._requests

    def is_superseded(self, ticket: int) -> bool:
        """A newer request was announced after ``ticket``: its result would be replaced unseen."""
        with self._requests_lock:
            return ticket != self._requests

    # ------------------------------------------------------------ image, classes, vocabulary

    @property
    def vocabulary(self) -> Vocabulary | None:
        return None if self.predictor is None else self.predictor.vocabulary

    @property
    def image(self) -> np.ndarray | None:
        return None if self.upload is None else self.upload.rgb

    def require_models(self) -> None:
        if self.models.clip is None:
            raise UserMessage("⚠️ No CLIP weights loaded: see the banner above, or click the demo mode button.")

    def set_vocabulary(self, spec: str, background: str | None) -> None:
        """A new vocabulary or background words: a fresh predictor (the shared decoder), the image kept."""
        self.require_models()
        key = (spec, background, self.models.version)
        if key == self._predictor_key:
            return
        words = [w.strip() for w in (background or "").split(",") if w.strip()] or None
        try:
            predictor = Predictor(self.models.clip, vocabulary=spec, decoder=self.models.decoder,
                                  device=self.models.device, max_side=self.max_side, background=words)
        except ValueError as err:
            raise UserMessage(f"⚠️ {err}") from None
        self.predictor, self._predictor_key, self._encoded = predictor, key, None
        self.result, self.classes = None, ()
        if self.gt is not None and self.gt.class_names != predictor.vocabulary.class_names:
            self.gt = None  # its numbers name another vocabulary's classes; _gt_path keeps it from being re-read
            self.notes.append("Ground-truth mask dropped: its class numbers belong to the previous vocabulary.")
        if self.adaptation is not None:
            self.notes.append(f"New image or vocabulary: back to the shared decoder (the one adapted to "
                              f"**{self.adaptation.stem}** belonged to the previous one).")
            self.adaptation = None

    def set_upload(self, path: str | Path | None) -> None:
        """A new image file. A file that cannot be used clears the image, with the reason in words."""
        if self.upload is not None and path and Path(path) == self.upload.path:
            return
        self.upload, self.result, self.rows, self.pixel, self.classes = None, None, None, None, ()
        if not path:
            raise UserMessage("Upload an image or pick a sample.")
        upload = read_upload(path, self.max_side)
        if self.adaptation is not None:
            self._predictor_key = None  # set_vocabulary builds a fresh predictor with the shared decoder
        self.upload = upload
        self.notes.extend(upload.notes)

    def analyse(self, path: str | Path | None, classes: Sequence[str], spec: str, background: str | None,
                boxes: Sequence[dict] = (), controls: Controls | None = None, gt: str | Path | None = None) -> None:
        """Image, classes, vocabulary, boxes or ground truth changed: CLIP runs only for a new image or
        vocabulary (``set_labels`` when only the classes changed), then :meth:`refine`."""
        self.require_models()
        self.set_upload(path)
        self.set_vocabulary(spec, background)
        classes = list(dict.fromkeys(classes or []))
        if not classes:
            self.result = None
            raise UserMessage("Choose the classes present in the image.")
        if self._encoded is not self.upload:
            self._encode(self.upload, classes)
        elif tuple(classes) != self.classes:
            self._relabel(classes)
        self.boxes = self.user_boxes(boxes, classes)
        try:
            self.set_ground_truth(gt)
        except UserMessage as err:  # a mask that does not fit is said, the views still come
            self.notes.append(str(err))
        self.refine(controls or self.controls)

    def _encode(self, upload: Upload, classes: list[str]) -> None:
        self.result, self.rows, self._encoded = None, None, None
        try:
            with self.models.lock:
                self.predictor.set_image(upload.rgb, classes)
        except ValueError as err:  # unknown class, an image smaller than one patch
            self.predictor.reset_image()  # set_image keeps the previous image's features on failure
            raise UserMessage(f"⚠️ {err}") from None
        self._encoded, self.classes = upload, tuple(classes)
        self._refresh_rows()

    def _relabel(self, classes: list[str]) -> None:
        try:
            with self.models.lock:
                if self.adaptation is not None and self.adaptation.history:
                    # the adapted decoder stays; its replay belonged to the old classes' pseudo labels
                    self.predictor.show_snapshot(self.adaptation.history[-1])
                self.predictor.set_labels(classes)
        except ValueError as err:
            raise UserMessage(f"⚠️ {err}") from None
        self.classes = tuple(classes)
        if self.adaptation is not None:
            self.adaptation.history, self.adaptation.losses, self.adaptation.shown = [], [], 0
            self._refresh_rows()  # A_f is the adapted decoder's again

    def user_boxes(self, boxes: Sequence[dict], classes: Sequence[str]) -> dict[str, list[Box]]:
        """The annotator's boxes per class, clamped to the image; a box of another label is reported."""
        height, width = self.upload.rgb.shape[:2]
        out: dict[str, list[Box]] = {}
        for box in boxes or []:
            if not box.get("label"):
                continue  # being drawn: the annotator asks for its class when the mouse is released
            x0, x1 = sorted(min(max(float(box[k]), 0.0), width) for k in ("xmin", "xmax"))
            y0, y1 = sorted(min(max(float(box[k]), 0.0), height) for k in ("ymin", "ymax"))
            if box["label"] not in classes:
                self.notes.append(f"A box labelled {box['label']!r} is ignored: label it with one of "
                                  f"{', '.join(classes)}.")
            elif x0 < x1 and y0 < y1:
                out.setdefault(box["label"], []).append((x0, y0, x1, y1))
        return out

    # ------------------------------------------------------------ refinement and inspection

    @property
    def is_ready(self) -> bool:
        """The predictor holds the features of the current upload and classes (not a previous image's)."""
        return (self.upload is not None and self.predictor is not None and self.predictor.features is not None
                and self._encoded is self.upload and bool(self.classes))

    def refine(self, controls: Controls) -> None:
        """Stages 4–6 with these knobs (clamped to the sliders' ranges, with a note)."""
        controls, notes = controls.clamped(self.models.num_blocks)
        self.controls = controls
        self.notes.extend(notes)
        if not self.is_ready:
            self.result = None
            raise UserMessage("Upload an image or pick a sample, and choose its classes.")
        try:
            params = controls.params(self.boxes)
            with self.models.lock:
                self.result = self.predictor.refine(params)
        except ValueError as err:
            raise UserMessage(f"⚠️ {err}") from None

    def sweep_image(self, controls: Controls) -> ImageSweep:
        """Score every (N0, α) of :func:`sweep_axes` on this image against its ground truth, every other knob
        as ``controls`` has it; one CLIP pass (the cached one), settings sharing their transition matrices."""
        controls, notes = controls.clamped(self.models.num_blocks)
        self.notes.extend(notes)
        if not self.is_ready or self.result is None:
            raise UserMessage("Analyse an image with its classes first.")
        if self.gt is None:
            raise UserMessage("Give the image's ground-truth mask (the accordion on the left) to sweep against it.")
        n0s, alphas = sweep_axes(self.models.num_blocks)
        miou = {stage: np.full((len(n0s), len(alphas)), np.nan) for stage in STAGES}
        shared: dict = {}
        try:
            with self.models.lock:
                for (i, n0), (j, alpha) in itertools.product(enumerate(n0s), enumerate(alphas)):
                    params = replace(controls, n0=n0, alpha=alpha).params(self.boxes)
                    result = self.predictor.refine(params, shared)
                    scores = stage_scores(result, self.gt, result.class_names[0], self.vocabulary)
                    for stage in STAGES:
                        miou[stage][i, j] = scores.miou[stage]
        except ValueError as err:
            raise UserMessage(f"⚠️ {err}") from None
        self.image_sweep = ImageSweep(self.upload, n0s, alphas, miou)
        return self.image_sweep

    @property
    def current_sweep(self) -> ImageSweep | None:
        """The last sweep, if it was of the image shown now."""
        sweep = self.image_sweep
        return sweep if sweep is not None and sweep.upload is self.upload else None

    def inspect(self, x: float | None, y: float | None) -> None:
        """What the patch under original image pixel (x, y) attends to, in every layer and in A_f."""
        if self.result is None:
            raise UserMessage("Analyse an image first, then click a pixel on a view.")
        if x is None or y is None:
            raise UserMessage("Give both x and y of the pixel to inspect.")
        try:
            with self.models.lock:
                self.rows = self.predictor.attention_rows(float(x), float(y))
        except ValueError as err:
            raise UserMessage(f"⚠️ {err}") from None
        self.pixel = (float(x), float(y))

    def zoom(self, layer: int | None) -> None:
        """Enlarge layer ``layer`` (1-based) of the inspected pixel beside A_f."""
        if layer is not None and not 1 <= layer <= self.models.num_blocks:
            raise UserMessage(f"⚠️ There is no layer {layer}.")
        self.zoom_layer = layer

    def _refresh_rows(self) -> None:
        """The inspected pixel's rows change with the image's features (and A_f with the decoder)."""
        if self.pixel is not None and self.predictor is not None and self.predictor.features is not None:
            height, width = self.predictor.features.size
            if self.pixel[0] < width and self.pixel[1] < height:
                with self.models.lock:
                    self.rows = self.predictor.attention_rows(*self.pixel)
            else:
                self.pixel, self.rows = None, None

    # ------------------------------------------------------------ ground truth

    def set_ground_truth(self, path: str | Path | None) -> None:
        """Score every stage against this mask from now on (None: stop scoring).

        A mask belongs to the image it came with: a new image under an unchanged mask drops it
        (with a note), a new mask is read and checked against the image.
        """
        path = str(path) if path else None
        if path == self._gt_path and self.upload is self._gt_upload:
            return
        stale = path is not None and path == self._gt_path and self.gt is not None
        self._gt_path, self._gt_upload, self.gt = path, self.upload, None
        if stale:
            self.notes.append("Ground-truth mask dropped: it belonged to the previous image.")
            return
        if path is None:
            return
        if self.upload is None or self.vocabulary is None:
            raise UserMessage("Load the image before its ground-truth mask.")
        self.gt = read_ground_truth(path, self.vocabulary, self.upload.rgb.shape[:2])

    def scores(self, class_name: str | None) -> Scores | None:
        if self.gt is None or self.result is None:
            return None
        names = self.result.class_names
        return stage_scores(self.result, self.gt, class_name if class_name in names else names[0], self.vocabulary)

    # ------------------------------------------------------------ decoder adaptation

    def adapt(self, steps: int, controls: Controls, progress: Callable[[int, int, dict], None] | None = None) -> None:
        """Fit a copy of the decoder (a fresh one when none is loaded) to this image with these knobs.

        The copy is this session's alone; the shared lock is held one optimisation step at a time,
        so other sessions' refinements run between the steps.
        """
        if self.result is None or not self.is_ready:
            raise UserMessage("Analyse an image first, then adapt the decoder to it.")
        try:
            steps = int(steps)
        except (TypeError, ValueError):
            raise UserMessage(f"⚠️ {steps!r} is not a number of steps.") from None
        if steps < 1:
            raise UserMessage("⚠️ Adapt for at least one step.")
        if steps > MAX_ADAPT_STEPS:
            self.notes.append(f"{steps} adaptation steps is more than {MAX_ADAPT_STEPS}: using {MAX_ADAPT_STEPS}")
            steps = MAX_ADAPT_STEPS
        controls, notes = controls.clamped(self.models.num_blocks)
        self.notes.extend(notes)
        losses: list[tuple[int, float, float, float]] = []
        lock = self.models.lock

        def step_done(step: int, total: int, values: dict) -> None:
            values = {k: float(v) for k, v in values.items()}
            losses.append((step, values["seg"], values["aff"], values["total"]))
            if progress is not None:
                progress(step, total, values)
            lock.yield_turn()

        adaptation = self.adaptation or Adaptation(self.upload.stem)
        try:
            with lock:
                if adaptation.history:  # adapting again starts from the adapted decoder: "before" is its A_f
                    self.predictor.show_snapshot(adaptation.history[-1])
                history = self.predictor.adapt_decoder(
                    steps=steps, params=controls.params(self.boxes), callback=step_done,
                    snapshot_every=max(1, math.ceil(steps / MAX_SNAPSHOTS)))
        except (ValueError, RuntimeError) as err:  # a decoder that does not fit this CLIP or vocabulary
            raise UserMessage(f"⚠️ Adaptation failed: {err}") from None
        adaptation.history, adaptation.losses, adaptation.shown = history, losses, len(history) - 1
        adaptation.steps += steps
        self.adaptation = adaptation
        self._refresh_rows()
        self.refine(controls)

    def replay(self, index: float | None, controls: Controls) -> None:
        """Refine with the decoder affinity of snapshot ``index`` (0 = before the adaptation)."""
        adaptation = self.adaptation
        if adaptation is None or not adaptation.history:
            raise UserMessage("Adapt the decoder to this image first; this slider then replays it.")
        i = min(max(int(round(float(index or 0))), 0), len(adaptation.history) - 1)
        with self.models.lock:
            self.predictor.show_snapshot(adaptation.history[i])
        adaptation.shown = i
        self._refresh_rows()
        self.refine(controls)

    # ------------------------------------------------------------ exports

    @property
    def folder(self) -> Path:
        """This session's download folder, made on the first export and removed by :meth:`close`."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="rfm-studio-"))
        return self._folder

    def _exportable(self) -> Result:
        if self.result is None:
            raise UserMessage("Nothing to export yet: analyse an image first.")
        return self.result

    def export_label(self) -> Path:
        """The pseudo label as a VOC palette PNG at the original resolution."""
        result = self._exportable()
        return export.save_label_png(result.label, self.folder / f"{self.upload.stem}_label.png", overwrite=True)

    def export_cams(self) -> Path:
        """CLIP-ES-style .npy: the final refined CAMs (RFM, else static), the initial ones as ``highres``."""
        r = self._exportable()
        return export.save_cams_npy(self.folder / f"{self.upload.stem}_cams.npy", r.class_indices, r.cam_final,
                                    overwrite=True, highres=r.cam_initial)

    def export_coco(self) -> Path:
        """COCO JSON with one RLE mask per class present in the pseudo label."""
        r = self._exportable()
        ids = [self.vocabulary.category_ids[i] for i in r.class_indices]
        height, width = r.image_size
        doc = export.coco_document(
            [{"id": 0, "file_name": self.upload.name, "height": height, "width": width}],
            export.label_to_coco(r.label, r.class_indices, ids, image_id=0),
            [{"id": i, "name": n} for i, n in zip(ids, r.class_names)])
        return export.save_coco_json(doc, self.folder / f"{self.upload.stem}_coco.json", overwrite=True)

    def export_figure(self) -> Path:
        """The side-by-side comparison figure (matplotlib: only on request, never per slider move)."""
        r = self._exportable()
        return viz.save_figure(viz.side_by_side_figure(self.upload.rgb, r),
                               self.folder / f"{self.upload.stem}_figure.png", overwrite=True)

    def add_to_dataset(self, folder: str | None, stem: str | None, overwrite: bool,
                       root: Path | None = None) -> DatasetReport:
        """Image and pseudo label into a VOC-layout folder; refuses to replace a pair unless ``overwrite``.

        ``root``: when the studio is served to other machines, the folder must lie inside it (a
        relative folder is taken from it), so a visitor cannot write anywhere the server may.
        """
        result = self._exportable()
        if not (folder or "").strip():
            raise UserMessage("Choose a dataset folder first.")
        if root is None:
            root = Path(folder.strip()).expanduser().absolute()
        else:
            base = root.resolve()
            root = (base / folder.strip()).resolve()
            if root != base and base not in root.parents:
                raise UserMessage(f"⚠️ Not saved: this studio is served to other machines, so datasets are written "
                                  f"only inside `{base}` (choose a folder there).")
        stem = (stem or "").strip() or self.upload.stem
        try:
            total = export.save_to_voc_dataset(root, stem, self.upload.rgb, result.label, overwrite=bool(overwrite),
                                               jpeg_bytes=self.upload.jpeg_bytes)
        except FileExistsError as err:
            raise UserMessage(f"⚠️ Not saved: {err}. Tick *overwrite existing files* to replace it.") from None
        except (ValueError, OSError) as err:
            raise UserMessage(f"⚠️ Not saved: {err}") from None
        self.dataset_stems.add((str(root), stem))
        return DatasetReport(root, stem, total, len(self.dataset_stems))

    def close(self) -> None:
        """Free the features and remove the download folder (the tab closed)."""
        if self.predictor is not None:
            self.predictor.reset_image()
        self.result, self.rows, self.upload, self.view_cache = None, None, None, {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def close_session(session: Session | None) -> None:
    if session is not None:
        session.close()
