"""RFM studio's web app: Gradio layout and event wiring over the ``rfm`` library.

Every browser session owns a :class:`Session` in ``gr.State`` (its own ``Predictor``, image, boxes,
result and export folder), so two tabs never see each other's work; all sessions share the one loaded
CLIP and decoder (:class:`Models`), and every model call holds its lock. The handlers are methods of
:class:`Studio` taking and returning plain values, so tests call them without a browser. Rendering is
``rfm.viz`` (numpy/OpenCV); nothing here computes what the library does not expose.

Decoder adaptation (``Predictor.adapt_decoder``) replaces the decoder of one session's predictor only,
and belongs to one image: a new image (or vocabulary, or models) rebuilds the predictor with the shared
decoder, and a class change keeps the adapted decoder but clears its replay.
"""
from __future__ import annotations

import html
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, Sequence

import gradio as gr
from gradio_image_annotation import image_annotator

import rfm
from rfm import export, viz
from rfm.backbone import ClipWeightsNotFound
from rfm.data import ImageError, load_image, xml_labels
from rfm.demo import DEMO_WARNING
from rfm.paths import ASSETS_DIR as ASSETS
from rfm.paths import CHECKPOINT_DIR, SYNTHETIC_DIR
from rfm.predictor import AdaptSnapshot
from rfm.text import get_vocabulary

# Generated scenes shown first in the gallery (an `rfm synth` folder: their classes come from its XML).
SCENE_SAMPLES = SYNTHETIC_DIR / "samples"
BUILTIN_NOTE = ("**Built-in model:** a small CLIP (ViT, 12 blocks, patch 16, width 128) and its WeCLIP decoder, "
                "trained on this machine on generated scenes (`rfm synth`; see `assets/synthetic/README.md`). "
                "It knows the synthetic vocabulary's 12 objects and 8 backgrounds; real photographs mean little "
                "to it. For real photos put OpenAI's `ViT-B-16.pt` at `checkpoints/ViT-B-16.pt` and restart, or "
                "start with `--clip PATH`.")
# Classes worth trying on each sample photo (assets/README.md); only those in the vocabulary are preselected.
SAMPLE_CLASSES = {"astronaut": ("person",), "chelsea": ("cat",),
                  "coffee": ("cup", "spoon", "dining table", "diningtable")}
DISPLAY_SIDE = 768  # views are drawn at most this large; exports keep the original resolution
TILE_SIDE = 192  # attention gallery tiles
# at most this many A_f snapshots per adaptation: each is an (n, n) float32 matrix (4 MB at 512 px), kept per session
MAX_SNAPSHOTS = 20
VOCABULARIES = {"Synthetic": "synthetic", "VOC": "voc", "COCO": "coco", "custom": None}
DISTANCES = [("abs — paper (Σ|A_f − A^l| < mean)", "abs"),
             ("signed — official code (Σ(A_f − A^l) ≤ mean)", "signed")]
NO_DECODER = ("**RFM needs the WeCLIP decoder.** Its feature affinity A_f scores and weights the CLIP layers, "
              "so without it only the initial and static CAMs exist and the pseudo label comes from the static "
              "CAM. Start the app with `--decoder PATH` (an official WeCLIP `.pth`, see `checkpoints/README.md`), "
              "or with `--demo` to explore the view with a random decoder — or fit one to this image with "
              "*Adapt decoder to this image* below.")


class Models:
    """The CLIP and decoder every session shares, the lock that serialises model calls, and why
    weights are missing when they are."""

    def __init__(self, clip=None, decoder=None, *, demo: bool = False, error: str | None = None, device=None,
                 builtin: bool = False):
        self.clip, self.decoder, self.demo, self.error, self.device = clip, decoder, demo, error, device
        self.builtin = builtin  # the synthetic-scene CLIP: the app starts on its vocabulary and scenes
        self.lock = threading.Lock()
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
            model = rfm.load_clip("ViT-B-16", pretrained=clip, device=device)
        except ClipWeightsNotFound as err:
            return cls(error=str(err), device=device)
        return cls(model, rfm.load_decoder(decoder) if decoder else None, device=device, builtin=builtin)

    @classmethod
    def from_demo(cls, device=None) -> "Models":
        clip, decoder = rfm.demo_models(device=device)
        return cls(clip, decoder, demo=True, device=device)

    def enable_demo(self) -> None:
        with self.lock:
            if not self.demo:
                self.clip, self.decoder = rfm.demo_models(device=self.device)
                self.demo, self.version = True, self.version + 1

    @property
    def num_blocks(self) -> int:
        return self.clip.num_blocks if self.clip is not None else 12  # ViT-B/16 until weights arrive


class Session:
    """One browser session's work: predictor, image, boxes, latest result, clicked pixel, exports."""

    def __init__(self):
        self.lock = threading.RLock()
        self.predictor: rfm.Predictor | None = None
        self.predictor_key = None
        self.image = None  # (H, W, 3) uint8 at the original resolution
        self.image_key: str | None = None
        self.stem = "image"
        self.display = None  # the image as the views show it
        self.scale = 1.0  # display pixels per original pixel
        self.classes: tuple[str, ...] = ()
        self.boxes: dict[str, list[tuple[float, float, float, float]]] = {}
        self.result: rfm.Result | None = None
        self.pixel: tuple[float, float] | None = None  # original image pixel under inspection
        self.rows = None  # attention rows of that pixel
        self.folder = Path(tempfile.mkdtemp(prefix="rfm-studio-"))
        self.saved = 0
        # decoder adaptation: the predictor's decoder was fitted to this image (stem), in this many steps
        self.adapted: str | None = None
        self.adapted_steps = 0
        self.history: list[AdaptSnapshot] = []  # [before, *snapshots]: what the replay slider walks through
        self.losses: list[tuple[int, float, float, float]] = []  # (step, seg, aff, total) of every step
        self.shown = 0  # index into history that refine() currently uses
        self.adapt_note: str | None = None  # why an adaptation was dropped, said once in the status line

    def clear_adaptation(self) -> None:
        """The predictor goes (or went) back to the shared decoder: forget the adaptation entirely."""
        self.adapted, self.adapted_steps, self.history, self.losses, self.shown = None, 0, [], [], 0

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def close_session(session: Session | None) -> None:
    if session is not None:
        session.close()


class Views(NamedTuple):
    """Everything a refinement or a click redraws, in the order of the view components."""

    initial: Any
    static: Any
    rfm: Any
    label: Any
    rfm_note: Any
    legend: str
    chart: Any
    layers: list
    affinity: Any
    status: str


@dataclass
class Controls:
    """The refinement knobs as the sliders deliver them."""

    alpha: float
    n0: float
    static_layers: float
    box_threshold: float
    bg_power: float
    par_iterations: float
    distance: str

    def params(self, boxes) -> rfm.RefineParams:
        return rfm.RefineParams(alpha=int(self.alpha), n0=int(self.n0), static_layers=int(self.static_layers),
                                box_threshold=float(self.box_threshold), distance=self.distance, boxes=boxes,
                                bg_power=float(self.bg_power), par_iterations=int(self.par_iterations))

    @classmethod
    def defaults(cls) -> "Controls":
        d = rfm.RefineParams()
        return cls(d.alpha, d.n0, d.static_layers, d.box_threshold, d.bg_power, d.par_iterations, d.distance)


class UserMessage(Exception):
    """Why a handler could not go on, worded for the user (no image yet, no weights, …)."""


def sample_paths() -> list[Path]:
    """Generated scenes first, then the photos of assets/."""
    def images(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    return images(SCENE_SAMPLES / "JPEGImages") + images(ASSETS)


def sample_classes(path: Path) -> tuple[str, ...]:
    """Classes worth trying on a sample: a generated scene's annotation, or the list for a photo."""
    xml = path.parent.parent / "Annotations" / f"{path.stem}.xml"
    if xml.is_file():
        vocabulary = get_vocabulary("synthetic")
        return tuple(vocabulary.class_names[i] for i in xml_labels(xml, vocabulary))
    return SAMPLE_CLASSES.get(path.stem, ())


def vocabulary_spec(kind: str, custom: str) -> str:
    return VOCABULARIES.get(kind) or custom


def class_colour_hex(vocabulary, classes: Sequence[str]) -> list[str]:
    indices = [vocabulary.index(c) for c in classes]
    return ["#{:02x}{:02x}{:02x}".format(*rgb) for rgb in viz.class_colors(indices)]


class Studio:
    """The app's event handlers over shared :class:`Models`; each takes and returns the session."""

    def __init__(self, models: Models, max_side: int = 512):
        self.models = models
        self.max_side = max_side

    # ------------------------------------------------------------ banners and vocabulary

    def banners(self):
        """(demo banner, weights banner group, weights message) visibility for the current models."""
        missing = self.models.clip is None
        message = (f"**No CLIP weights loaded.** {self.models.error}\n\nThen restart the app, or explore every "
                   f"view now in demo mode (random weights — heatmaps are meaningless).") if missing else ""
        return gr.update(visible=self.models.demo), gr.update(visible=missing), message

    def enable_demo(self):
        self.models.enable_demo()
        gr.Info("Demo mode on: random weights — heatmaps are meaningless.")
        return self.banners()

    def choose_vocabulary(self, kind: str, custom: str, classes: Sequence[str] | None):
        """New class choices (keeping the chosen ones that still exist) and the vocabulary's background words."""
        try:
            vocabulary = get_vocabulary(vocabulary_spec(kind, custom))
        except ValueError as err:
            gr.Warning(str(err))
            return gr.update(choices=[], value=[]), "", gr.update(visible=kind == "custom")
        kept = [c for c in classes or [] if c in vocabulary.class_names]
        return (gr.update(choices=list(vocabulary.class_names), value=kept), ", ".join(vocabulary.background),
                gr.update(visible=kind == "custom"))

    def choose_classes(self, kind: str, custom: str, classes: Sequence[str] | None, view_class: str | None):
        """Box labels and the view selector follow the chosen classes."""
        classes = list(classes or [])
        try:
            colours = class_colour_hex(get_vocabulary(vocabulary_spec(kind, custom)), classes)
        except ValueError:  # a class of a vocabulary being replaced: default colours until it settles
            colours = []
        shown = view_class if view_class in classes else (classes[0] if classes else None)
        return (gr.update(label_list=classes, label_colors=colours),
                gr.update(choices=classes, value=shown))

    def pick_sample(self, kind: str, custom: str, evt: gr.SelectData):
        """A sample photo into the annotator, with the classes worth trying on it preselected."""
        path = sample_paths()[evt.index]
        try:
            names = get_vocabulary(vocabulary_spec(kind, custom)).class_names
        except ValueError:
            names = ()
        suggested = [c for c in sample_classes(path) if c in names]
        return {"image": str(path), "boxes": []}, gr.update(value=suggested)

    @staticmethod
    def reset_controls():
        d = Controls.defaults()
        return tuple(getattr(d, f.name) for f in fields(Controls))

    # ------------------------------------------------------------ the pipeline

    def analyse(self, session: Session | None, annotated: dict | None, classes: Sequence[str] | None, kind: str,
                custom: str, background: str, alpha: float, n0: float, static_layers: float, box_threshold: float,
                bg_power: float, par_iterations: float, distance: str, view_class: str | None, show_auto: bool):
        """Image, classes, vocabulary or boxes changed: rerun CLIP only when the image, vocabulary or
        models changed (set_labels when only the classes did), then refine and redraw."""
        session = session or Session()
        controls = Controls(alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance)
        with session.lock:
            message, session.adapt_note = None, None
            try:
                self._prepare(session, annotated, list(classes or []), vocabulary_spec(kind, custom), background)
                self._refine(session, controls)
            except UserMessage as err:
                message = str(err)
            except (ValueError, ImageError) as err:
                gr.Warning(str(err))
                message = f"⚠️ {err}"
            names = list(session.result.class_names) if session.result else list(classes or [])
            shown = view_class if view_class in names else (names[0] if names else None)
            views = self._views(session, shown, show_auto, message)
            # the replay slider and loss curve disappear when a new image or class change dropped the history
            return (session, *views, gr.update(choices=names, value=shown), gr.update(visible=bool(session.history)),
                    self._loss_plot(session))

    def refine(self, session: Session | None, alpha: float, n0: float, static_layers: float, box_threshold: float,
               bg_power: float, par_iterations: float, distance: str, view_class: str | None, show_auto: bool):
        """A knob moved: only ``predictor.refine`` runs (no CLIP forward), then the views are redrawn."""
        session = session or Session()
        controls = Controls(alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance)
        with session.lock:
            message = None
            try:
                self._refine(session, controls)
            except UserMessage as err:
                message = str(err)
            except ValueError as err:
                gr.Warning(str(err))
                message = f"⚠️ {err}"
            return (session, *self._views(session, view_class, show_auto, message))

    def render(self, session: Session | None, view_class: str | None, show_auto: bool):
        """Only the display changed (class shown, automatic boxes): redraw, compute nothing."""
        session = session or Session()
        with session.lock:
            return (session, *self._views(session, view_class, show_auto))

    def inspect(self, session: Session | None, x: float | None, y: float | None, view_class: str | None,
                show_auto: bool):
        """Show what the patch under original image pixel (x, y) attends to in every layer and in A_f."""
        session = session or Session()
        with session.lock:
            message = None
            if session.result is None:
                message = "Analyse an image first, then click a pixel on a view."
            elif x is None or y is None:
                message = "Give both x and y of the pixel to inspect."
            else:
                try:
                    with self.models.lock:
                        session.rows = session.predictor.attention_rows(float(x), float(y))
                    session.pixel = (float(x), float(y))
                except ValueError as err:
                    gr.Warning(str(err))
                    message = f"⚠️ {err}"
            return (session, *self._views(session, view_class, show_auto, message))

    def select_pixel(self, session: Session | None, view_class: str | None, show_auto: bool, evt: gr.SelectData):
        """A click on a view: its display coordinates back to original pixels, then :meth:`inspect`."""
        session = session or Session()
        x, y = (v / session.scale for v in evt.index)
        return (round(x), round(y), *self.inspect(session, x, y, view_class, show_auto))

    # ------------------------------------------------------------ decoder adaptation

    def adapt(self, session: Session | None, steps: float, alpha: float, n0: float, static_layers: float,
              box_threshold: float, bg_power: float, par_iterations: float, distance: str, view_class: str | None,
              show_auto: bool, progress=gr.Progress()):
        """Fit a copy of the decoder (a fresh one when none is loaded) to the current image with the current
        refinement controls, then redraw with it. Holds the model lock throughout: the other sessions wait,
        but they never see this session's decoder (``adapt_decoder`` replaces this predictor's only)."""
        session = session or Session()
        controls = Controls(alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance)
        with session.lock:
            message = None
            try:
                if session.result is None:
                    raise UserMessage("Analyse an image first, then adapt the decoder to it.")
                steps = int(steps)
                losses: list[tuple[int, float, float, float]] = []

                def report(step: int, total: int, values: dict) -> None:
                    values = {k: float(v) for k, v in values.items()}
                    losses.append((step, values["seg"], values["aff"], values["total"]))
                    progress((step, total), desc=f"Adapting the decoder · loss {values['total']:.4g}", unit="steps")

                progress(0, desc="Adapting the decoder")
                with self.models.lock:
                    if session.history:  # adapting again starts from the adapted decoder: "before" is its A_f
                        self._show(session, len(session.history) - 1)
                    session.history = session.predictor.adapt_decoder(
                        steps=steps, params=controls.params(session.boxes), callback=report,
                        snapshot_every=max(1, math.ceil(steps / MAX_SNAPSHOTS)))
                session.losses, session.shown = losses, len(session.history) - 1
                session.adapted, session.adapted_steps = session.stem, session.adapted_steps + steps
                session.adapt_note = None
                self._refine(session, controls)
                self._refresh_rows(session)
            except UserMessage as err:
                message = str(err)
            except (ValueError, TypeError, RuntimeError) as err:  # bad steps from the API, a decoder misfit
                gr.Warning(str(err))
                message = f"⚠️ Adaptation failed: {err}"
            views = self._views(session, view_class, show_auto, message)
            return (session, *views, self._replay_slider(session), self._loss_plot(session))

    def replay(self, session: Session | None, index: float, alpha: float, n0: float, static_layers: float,
               box_threshold: float, bg_power: float, par_iterations: float, distance: str,
               view_class: str | None, show_auto: bool):
        """Show the adaptation as it was at snapshot ``index`` (0 = before it): refine with that A_f."""
        session = session or Session()
        controls = Controls(alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance)
        with session.lock:
            message = None
            try:
                if not session.history:
                    raise UserMessage("Adapt the decoder to this image first; this slider then replays it.")
                i = min(max(int(round(float(index or 0))), 0), len(session.history) - 1)
                with self.models.lock:
                    self._show(session, i)
                session.shown = i
                self._refine(session, controls)
                self._refresh_rows(session)
            except UserMessage as err:
                message = str(err)
            except ValueError as err:
                gr.Warning(str(err))
                message = f"⚠️ {err}"
            return (session, *self._views(session, view_class, show_auto, message), self._loss_plot(session))

    @staticmethod
    def _show(session: Session, i: int) -> None:
        """Make refine() use history[i]'s A_f; the caller holds the model lock."""
        session.predictor.show_snapshot(session.history[i])

    def _refresh_rows(self, session: Session) -> None:
        """The inspected pixel's A_f row changes with the decoder."""
        if session.pixel is not None:
            with self.models.lock:
                session.rows = session.predictor.attention_rows(*session.pixel)

    @staticmethod
    def _replay_slider(session: Session):
        if not session.history:
            return gr.update(visible=False)
        last = len(session.history) - 1
        every = session.history[1].step if last >= 1 else 1
        return gr.update(visible=True, minimum=0, maximum=last, value=session.shown, step=1,
                         label=f"adaptation step (replay): 0 = before, then every {every} step(s), {last} = "
                               f"step {session.history[-1].step}, the adapted decoder")

    @staticmethod
    def _loss_plot(session: Session):
        if not session.losses:
            return None
        return viz.loss_curve(session.losses, session.history[session.shown].step if session.history else None)

    @staticmethod
    def _adaptation_line(session: Session) -> str | None:
        if not session.adapted:
            return session.adapt_note
        line = (f"Decoder adapted to **{html.escape(session.adapted)}** ({session.adapted_steps} steps; this session "
                f"only, kept until a new image or vocabulary)")
        if not session.history:
            return line + " · replay cleared by the class change"
        snapshot = session.history[session.shown]
        if session.shown == 0:
            return line + (" · replay: before adaptation" +
                           (" (no decoder, so no RFM)" if snapshot.aff_f is None else ""))
        losses = {k: float(v) for k, v in snapshot.losses.items()}
        return line + (f" · replay: step {snapshot.step}/{session.history[-1].step}, loss {losses['total']:.4g} "
                       f"(seg {losses['seg']:.4g}, aff {losses['aff']:.4g})")

    def _prepare(self, session: Session, annotated: dict | None, classes: list[str], spec: str,
                 background: str) -> None:
        if self.models.clip is None:
            raise UserMessage(f"⚠️ No CLIP weights loaded. {self.models.error} — or click the demo mode button.")
        key = (spec, background, self.models.version)
        path = (annotated or {}).get("image")
        if session.adapted and path and path != session.image_key:
            # the adapted decoder was fitted to the previous image: a fresh predictor takes the shared one back
            session.adapt_note = (f"New image: back to the shared decoder (the one adapted to "
                                  f"**{html.escape(session.adapted)}** belonged to that image).")
            session.predictor_key = None
        if session.predictor_key != key:
            words = [w.strip() for w in background.split(",") if w.strip()] if background.strip() else None
            session.predictor = rfm.Predictor(self.models.clip, vocabulary=spec, decoder=self.models.decoder,
                                              device=self.models.device, max_side=self.max_side, background=words)
            session.predictor_key, session.image_key, session.result = key, None, None
            session.clear_adaptation()
        if not path:
            session.image_key, session.result, session.image = None, None, None
            raise UserMessage("Upload an image or pick a sample photo.")
        if not classes:
            session.result = None
            raise UserMessage("Choose the classes present in the image.")
        if (annotated or {}).get("orientation"):  # the annotator turns its display, not the file or the boxes
            session.result = None
            raise UserMessage("⚠️ Turning the photo in the image box is not supported: turn back to 0°, or upload a "
                              "rotated file (EXIF orientation is applied automatically).")
        if path != session.image_key:
            self._set_image(session, path, classes)
        elif tuple(classes) != session.classes:
            with self.models.lock:
                if session.history:  # the adapted decoder stays; its replay belonged to the old classes' labels
                    self._show(session, len(session.history) - 1)
                session.predictor.set_labels(classes)
            session.classes, session.rows, session.history, session.losses = tuple(classes), None, [], []
        session.boxes = self._user_boxes(session, (annotated or {}).get("boxes") or [], classes)
        if session.pixel is not None and session.rows is None:
            with self.models.lock:
                session.rows = session.predictor.attention_rows(*session.pixel)

    def _set_image(self, session: Session, path: str, classes: list[str]) -> None:
        session.image_key, session.result = None, None
        image = load_image(path)
        with self.models.lock:
            session.predictor.set_image(image, classes)
        session.image, session.image_key, session.stem = image, path, Path(path).stem
        session.display = viz.thumbnail(image, DISPLAY_SIDE)
        session.scale = session.display.shape[1] / image.shape[1]
        session.classes, session.pixel, session.rows = tuple(classes), None, None

    def _user_boxes(self, session: Session, boxes: list[dict], classes: list[str]) -> dict[str, list]:
        """The annotator's boxes per class, clamped to the image; boxes of other labels are reported."""
        height, width = session.image.shape[:2]
        out: dict[str, list] = {}
        for box in boxes:
            x0, x1 = sorted(min(max(float(box[k]), 0.0), width) for k in ("xmin", "xmax"))
            y0, y1 = sorted(min(max(float(box[k]), 0.0), height) for k in ("ymin", "ymax"))
            if not box.get("label"):
                continue  # being drawn: the annotator asks for its class when the mouse is released
            if box["label"] not in classes:
                gr.Warning(f"a box labelled {box['label']!r} is ignored: label it with one of {', '.join(classes)}")
            elif x0 < x1 and y0 < y1:
                out.setdefault(box["label"], []).append((x0, y0, x1, y1))
        return out

    def _refine(self, session: Session, controls: Controls) -> None:
        if session.predictor is None or session.image_key is None:
            raise UserMessage("Upload an image or pick a sample photo, and choose its classes.")
        params = controls.params(session.boxes)
        with self.models.lock:
            session.result = session.predictor.refine(params)

    # ------------------------------------------------------------ rendering

    def _views(self, session: Session, view_class: str | None, show_auto: bool, message: str | None = None) -> Views:
        result = session.result
        if result is None:
            return Views(None, None, None, None, gr.update(visible=False), "", None, [], None,
                         self._status(message, None, adaptation=self._adaptation_line(session)))
        k = result.class_names.index(view_class) if view_class in result.class_names else 0
        name = result.class_names[k]
        colour = viz.class_colors([result.class_indices[k]])[0]
        size = session.display.shape[:2]
        marker = None if session.pixel is None else (session.pixel[0] * session.scale, session.pixel[1] * session.scale)

        def decorate(view, boxes):
            if show_auto:
                view = viz.draw_boxes(view, boxes, (255, 255, 255), 2, session.scale)
            view = viz.draw_boxes(view, session.boxes.get(name, []), colour, 3, session.scale)
            return view if marker is None else viz.draw_marker(view, marker)

        def cam_view(cams):
            if cams is None:
                return None
            return decorate(viz.overlay_cam(session.display, viz.fit(cams[k], size)), result.auto_boxes.get(name, []))

        layers, affinity = self._attention_views(session, result)
        return Views(cam_view(result.cam_initial), cam_view(result.cam_static), cam_view(result.cam_rfm),
                     self._label_view(session, result, show_auto, marker),
                     gr.update(visible=result.cam_rfm is None), self._legend(result),
                     viz.layer_score_chart(result.layer_scores, result.layer_keep, result.layer_threshold),
                     layers, affinity, self._status(message, result, session.boxes, self._adaptation_line(session)))

    @staticmethod
    def _label_view(session: Session, result, show_auto: bool, marker) -> Any:
        """The pseudo label over the image; automatic boxes of every class in that class's colour."""
        label = viz.overlay_label(session.display, viz.fit(result.label, session.display.shape[:2]))
        if show_auto:
            for name, colour in zip(result.class_names, viz.class_colors(result.class_indices)):
                label = viz.draw_boxes(label, result.auto_boxes.get(name, []), colour, 2, session.scale)
        return label if marker is None else viz.draw_marker(label, marker)

    def _attention_views(self, session: Session, result) -> tuple[list, Any]:
        """Gallery of (tile, caption) per layer l = 1..N, and the A_f tile, for the inspected pixel."""
        rows = session.rows
        if rows is None or session.pixel is None:
            return [], None
        small = viz.thumbnail(session.image, TILE_SIDE)
        point = (session.pixel[0] * small.shape[1] / session.image.shape[1],
                 session.pixel[1] * small.shape[0] / session.image.shape[0])
        tiles = []
        for l, row in enumerate(rows.layers, start=1):
            score, kept = result.layer_scores[l - 1], bool(result.layer_keep[l - 1])
            if math.isnan(score):  # outside N0..N, or no decoder to score against
                border, caption = viz.INACTIVE_RGB, f"l={l} · S=– · not a candidate"
            else:
                border = viz.KEPT_RGB if kept else viz.REJECTED_RGB
                caption = f"l={l} · S={score:.5g} · {'kept' if kept else 'rejected'}"
            tiles.append((viz.attention_tile(small, row, point, border), caption))
        affinity = None if rows.decoder is None else viz.attention_tile(small, rows.decoder, point)
        return tiles, affinity

    @staticmethod
    def _legend(result) -> str:
        swatches = [f'<span style="display:inline-block;width:14px;height:14px;background:rgb{rgb};'
                    f'vertical-align:middle;border:1px solid #444"></span>&nbsp;{html.escape(name)}'
                    for name, rgb in zip(result.class_names, viz.class_colors(result.class_indices))]
        return ('<div class="legend">Pseudo label classes: ' + " &nbsp; ".join(swatches) +
                " &nbsp; (background: no colour)</div>")

    def _status(self, message: str | None, result, boxes: dict | None = None, adaptation: str | None = None) -> str:
        lines = [f"**Demo mode: {DEMO_WARNING}.**"] if self.models.demo else []
        if message:
            lines.append(message)
        if adaptation:
            lines.append(adaptation)
        if result is not None:
            kept = [str(l) for l, k in enumerate(result.layer_keep, start=1) if k]
            lines.append(f"Classes: {', '.join(result.class_names)} · RFM kept layers: "
                         f"{', '.join(kept) if kept else 'none'}")
            if boxes:
                lines.append("Your boxes: " + ", ".join(f"{name} ×{len(b)}" for name, b in boxes.items()))
            lines += result.notes
        return "\n\n".join(lines)

    # ------------------------------------------------------------ exports

    def _final(self, session: Session | None):
        if session is None or session.result is None:
            raise UserMessage("Nothing to export yet: analyse an image first.")
        return session.result

    def _export(self, session: Session | None, write) -> tuple:
        try:
            result = self._final(session)
            with session.lock:
                path = write(result)
        except (UserMessage, ValueError) as err:
            gr.Warning(str(err))
            return session, None
        return session, str(path)

    def export_label(self, session: Session | None):
        """The pseudo label as a VOC palette PNG at the original resolution."""
        return self._export(session, lambda r: export.save_label_png(
            r.label, session.folder / f"{session.stem}_label.png", overwrite=True))

    def export_cams(self, session: Session | None):
        """CLIP-ES-style .npy: final refined CAMs (RFM, else static) and the initial CAMs as ``highres``."""
        def write(r):
            return export.save_cams_npy(session.folder / f"{session.stem}_cams.npy", r.class_indices, r.cam_final,
                                        overwrite=True, highres=r.cam_initial)
        return self._export(session, write)

    def export_coco(self, session: Session | None):
        """COCO JSON with one RLE mask per class present in the pseudo label."""
        def write(r):
            ids = [session.predictor.vocabulary.category_ids[i] for i in r.class_indices]
            height, width = r.image_size
            doc = export.coco_document(
                [{"id": 0, "file_name": f"{session.stem}.png", "height": height, "width": width}],
                export.label_to_coco(r.label, r.class_indices, ids, image_id=0),
                [{"id": i, "name": n} for i, n in zip(ids, r.class_names)])
            return export.save_coco_json(doc, session.folder / f"{session.stem}_coco.json", overwrite=True)
        return self._export(session, write)

    def export_figure(self, session: Session | None):
        """The side-by-side comparison figure (matplotlib: only on request, never per slider move)."""
        return self._export(session, lambda r: viz.save_figure(
            viz.side_by_side_figure(session.image, r), session.folder / f"{session.stem}_figure.png", overwrite=True))

    def add_to_dataset(self, session: Session | None, folder: str, stem: str, overwrite: bool):
        """Image and pseudo label into a VOC-layout folder; refuses to replace a pair unless ``overwrite``."""
        try:
            result = self._final(session)
            if not (folder or "").strip():
                raise UserMessage("Choose a dataset folder first.")
            with session.lock:
                total = export.save_to_voc_dataset(Path(folder).expanduser(), (stem or session.stem).strip(),
                                                   session.image, result.label, overwrite=bool(overwrite))
        except FileExistsError as err:
            gr.Warning(f"{err} — tick 'overwrite' to replace it.")
            return session, f"⚠️ Not saved: {err}. Tick *overwrite existing files* to replace it."
        except (UserMessage, ValueError, OSError) as err:
            gr.Warning(str(err))
            return session, f"⚠️ {err}"
        session.saved += 1
        return session, (f"Saved **{html.escape(stem or session.stem)}** · {total} labelled image(s) in "
                         f"`{folder}` · {session.saved} added in this session")


# ---------------------------------------------------------------- layout and wiring


def build_app(studio: Studio) -> gr.Blocks:
    """The Blocks app: inputs and controls on the left, the four views and the layer inspector on the right."""
    n_blocks = studio.models.num_blocks
    d = Controls.defaults()
    with gr.Blocks(title="RFM studio") as app:
        session = gr.State(None, delete_callback=close_session)
        gr.Markdown("# RFM studio\n"
                    "CLIP-ES initial CAM → static refinement → WeCLIP's RFM → AFA's PAR pseudo label.")
        demo_banner = gr.Markdown(f"## ⚠️ Demo mode: {DEMO_WARNING}. Every view works; nothing in it means "
                                  f"anything.", visible=studio.models.demo, elem_id="demo-banner")
        gr.Markdown(BUILTIN_NOTE, visible=studio.models.builtin, elem_id="builtin-banner")
        with gr.Group(visible=studio.models.clip is None, elem_id="weights-banner") as weights_banner:
            weights_message = gr.Markdown(studio.banners()[2])
            demo_button = gr.Button("Explore in demo mode (random weights — heatmaps are meaningless)",
                                    variant="primary", elem_id="demo-button")
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                annotator = image_annotator(
                    label="Image — draw boxes to confine a class (pick the box's class when asked)",
                    image_type="filepath", label_list=[], sources=["upload", "clipboard"],
                    show_remove_button=True, box_min_size=4, elem_id="annotator")
                samples = gr.Gallery([str(p) for p in sample_paths()], label="Samples: generated scenes, then photos (click one)",
                                     columns=3, height=130, allow_preview=False, elem_id="samples")
                start = "Synthetic" if studio.models.builtin else "VOC"
                kind = gr.Radio(list(VOCABULARIES), value=start, label="Vocabulary", elem_id="vocabulary")
                custom = gr.Textbox(label="Custom classes (comma-separated)", placeholder="lamp, mug, desk",
                                    visible=False, elem_id="custom-words")
                background = gr.Textbox(", ".join(get_vocabulary(VOCABULARIES[start]).background), lines=2,
                                        elem_id="background", label="Background words (comma-separated; Enter to apply)")
                classes = gr.Dropdown(list(get_vocabulary(VOCABULARIES[start]).class_names), value=[], multiselect=True,
                                      label="Classes in the image", elem_id="classes")
                with gr.Accordion("Refinement", open=True):
                    alpha = gr.Slider(1, 4, d.alpha, step=1, label="α (matrix power)", elem_id="alpha")
                    n0 = gr.Slider(1, n_blocks, d.n0, step=1, label=f"N0 (first RFM layer, 1..{n_blocks})",
                                   elem_id="n0")
                    static_layers = gr.Slider(1, n_blocks, d.static_layers, step=1, elem_id="static-layers",
                                              label="static layers (last blocks averaged by CLIP-ES)")
                    box_threshold = gr.Slider(0.05, 0.95, d.box_threshold, step=0.05, elem_id="box-threshold",
                                              label="box threshold λ")
                    bg_power = gr.Slider(0.25, 4, d.bg_power, step=0.25, label="background power p",
                                         elem_id="bg-power")
                    par_iterations = gr.Slider(0, 50, d.par_iterations, step=1, elem_id="par-iterations",
                                               label="PAR iterations (0 = off)")
                    distance = gr.Radio(DISTANCES, value=d.distance, label="RFM distance", elem_id="distance")
                    reset = gr.Button("Reset to paper defaults", elem_id="reset")
            with gr.Column(scale=5):
                status = gr.Markdown(studio._status(None, None), elem_id="status")
                with gr.Row():
                    # a dropdown that accepts any value: a click racing a class change must not be rejected
                    view_class = gr.Dropdown([], label="Class shown in the views", allow_custom_value=True,
                                             elem_id="view-class")
                    show_auto = gr.Checkbox(False, label="show automatic boxes", elem_id="show-auto")
                with gr.Row():
                    views = [gr.Image(label=title, format="jpeg", interactive=False, elem_id=eid, min_width=160)
                             for title, eid in (("Initial CAM (CLIP-ES)", "view-initial"),
                                                ("Static refinement (CLIP-ES)", "view-static"),
                                                ("RFM refinement (WeCLIP)", "view-rfm"),
                                                ("PAR pseudo label", "view-label"))]
                rfm_note = gr.Markdown(NO_DECODER, visible=False, elem_id="rfm-note")
                with gr.Row():
                    gr.Image(viz.cam_colorbar(), label="CAM colour scale (JET, 0..1)", interactive=False,
                             height=70, container=True, elem_id="colorbar")
                    legend = gr.HTML(elem_id="legend")
                gr.Markdown("### Layers — click a pixel on any view to see what its patch attends to")
                with gr.Row():
                    pixel_x = gr.Number(None, label="pixel x", precision=0, minimum=0, elem_id="pixel-x")
                    pixel_y = gr.Number(None, label="pixel y", precision=0, minimum=0, elem_id="pixel-y")
                    inspect_button = gr.Button("Inspect pixel", elem_id="inspect")
                with gr.Row():
                    layers = gr.Gallery(label="Attention row of the pixel's patch, per layer (S^l; green kept, red "
                                              "rejected, grey not a candidate)", columns=4, format="jpeg",
                                        allow_preview=False, scale=3, elem_id="layers")
                    affinity = gr.Image(label="Decoder affinity A_f row", format="jpeg", interactive=False, scale=1,
                                        elem_id="affinity")
                chart = gr.Image(label="Layer scores S^l against the threshold", format="png", interactive=False,
                                 elem_id="chart")
                with gr.Accordion("Decoder adaptation — fit the decoder to this image", open=True,
                                  elem_id="adaptation"):
                    gr.Markdown("Trains a copy of the decoder (a fresh one when none is loaded) on this image alone "
                                "with WeCLIP's losses, from the cached CLIP outputs and the refinement settings above; "
                                "the pseudo label it learns from is remade from the static CAM, then from RFM. "
                                "Only this session uses the result, and only for this image: a new image goes "
                                "back to the shared decoder. The slider then replays how A_f, the kept layers "
                                "and the RFM CAM changed.")
                    with gr.Row(equal_height=True):
                        adapt_steps = gr.Slider(5, 200, 40, step=1, label="adaptation steps", scale=3,
                                                elem_id="adapt-steps")
                        adapt_button = gr.Button("Adapt decoder to this image", variant="primary", scale=1,
                                                 elem_id="adapt")
                    replay = gr.Slider(0, 1, 1, step=1, label="adaptation step (replay)", visible=False,
                                       elem_id="replay")
                    # always shown: the adaptation's progress bar is drawn here, next to the button
                    loss_plot = gr.Image(label="Adaptation losses (the progress bar runs here)", format="png",
                                         interactive=False, height=200, elem_id="adapt-losses")
                with gr.Accordion("Export", open=True):
                    with gr.Row():
                        export_buttons = {name: gr.Button(text, elem_id=f"export-{name}") for name, text in (
                            ("label", "Pseudo label PNG"), ("cams", "CAMs .npy"), ("coco", "COCO JSON"),
                            ("figure", "Figure PNG"))}
                    download = gr.File(label="Download", interactive=False, height=80, elem_id="download")
                    with gr.Row():
                        dataset_folder = gr.Textbox("out/dataset", label="Dataset folder (VOC layout)",
                                                    elem_id="dataset-folder")
                        dataset_stem = gr.Textbox(label="File name (default: the image's)", elem_id="dataset-stem")
                        overwrite = gr.Checkbox(False, label="overwrite existing files", elem_id="overwrite")
                    add_button = gr.Button("Add to dataset", elem_id="add-to-dataset")
                    dataset_status = gr.Markdown("No image added in this session yet.", elem_id="dataset-status")

        _wire(app, studio, SimpleNamespace(
            session=session, demo_banner=demo_banner, weights_banner=weights_banner, weights_message=weights_message,
            demo_button=demo_button, annotator=annotator, samples=samples, kind=kind, custom=custom,
            background=background, classes=classes, alpha=alpha, n0=n0, static_layers=static_layers,
            box_threshold=box_threshold, bg_power=bg_power, par_iterations=par_iterations, distance=distance,
            reset=reset, status=status, view_class=view_class, show_auto=show_auto, views=views, rfm_note=rfm_note,
            legend=legend, pixel_x=pixel_x, pixel_y=pixel_y, inspect_button=inspect_button, layers=layers,
            affinity=affinity, chart=chart, export_buttons=export_buttons, download=download,
            dataset_folder=dataset_folder, dataset_stem=dataset_stem, overwrite=overwrite, add_button=add_button,
            dataset_status=dataset_status, adapt_steps=adapt_steps, adapt_button=adapt_button, replay=replay,
            loss_plot=loss_plot))
    return app


def _wire(app: gr.Blocks, studio: Studio, ui: SimpleNamespace) -> None:
    """Events. Public endpoints (api_name) first, so the private chains reusing a handler do not take its name."""
    controls = [ui.alpha, ui.n0, ui.static_layers, ui.box_threshold, ui.bg_power, ui.par_iterations, ui.distance]
    view_outputs = [*ui.views, ui.rfm_note, ui.legend, ui.chart, ui.layers, ui.affinity, ui.status]
    display = [ui.view_class, ui.show_auto]
    vocab = [ui.kind, ui.custom]
    analyse = dict(fn=studio.analyse, inputs=[ui.session, ui.annotator, ui.classes, *vocab, ui.background, *controls,
                                               *display],
                   outputs=[ui.session, *view_outputs, ui.view_class, ui.replay, ui.loss_plot])
    choose_classes = dict(fn=studio.choose_classes, inputs=[*vocab, ui.classes, ui.view_class],
                          outputs=[ui.annotator, ui.view_class], api_visibility="private")
    private = dict(api_visibility="private")

    # a new image, new boxes or a sample's value all arrive as the annotator's change
    ui.annotator.change(**analyse, api_name="analyse", trigger_mode="always_last")
    gr.on([c.change for c in controls], studio.refine, [ui.session, *controls, *display],
          [ui.session, *view_outputs], api_name="refine", trigger_mode="always_last")
    gr.on([ui.view_class.input, ui.show_auto.input], studio.render, [ui.session, *display],
          [ui.session, *view_outputs], api_name="render", trigger_mode="always_last")
    gr.on([ui.inspect_button.click, ui.pixel_x.submit, ui.pixel_y.submit], studio.inspect,
          [ui.session, ui.pixel_x, ui.pixel_y, *display], [ui.session, *view_outputs], api_name="inspect")
    ui.reset.click(studio.reset_controls, outputs=controls, api_name="reset")  # the sliders' change refines
    ui.adapt_button.click(studio.adapt, [ui.session, ui.adapt_steps, *controls, *display],
                          [ui.session, *view_outputs, ui.replay, ui.loss_plot], api_name="adapt",
                          show_progress_on=[ui.loss_plot, ui.views[2]])  # one bar by the button, one on RFM
    # input, not change: the adapt handler setting the slider to its end must not replay what it just drew
    ui.replay.input(studio.replay, [ui.session, ui.replay, *controls, *display],
                    [ui.session, *view_outputs, ui.loss_plot], api_name="replay", trigger_mode="always_last")
    for name, button in ui.export_buttons.items():
        button.click(getattr(studio, f"export_{name}"), [ui.session], [ui.session, ui.download],
                     api_name=f"export_{name}")
    ui.add_button.click(studio.add_to_dataset, [ui.session, ui.dataset_folder, ui.dataset_stem, ui.overwrite],
                        [ui.session, ui.dataset_status], api_name="add_to_dataset")

    banners = [ui.demo_banner, ui.weights_banner, ui.weights_message]
    app.load(studio.banners, outputs=banners, **private)
    ui.demo_button.click(studio.enable_demo, outputs=banners, api_name="demo_mode").then(**analyse, **private)
    gr.on([ui.kind.input, ui.custom.submit], studio.choose_vocabulary, [*vocab, ui.classes],
          [ui.classes, ui.background, ui.custom], **private).then(**choose_classes).then(**analyse, **private)
    ui.classes.input(**choose_classes).then(**analyse, **private)
    ui.background.submit(**analyse, **private)
    ui.samples.select(studio.pick_sample, vocab, [ui.annotator, ui.classes], **private).then(**choose_classes)
    for view in ui.views:
        view.select(studio.select_pixel, [ui.session, *display], [ui.pixel_x, ui.pixel_y, ui.session, *view_outputs],
                    **private)


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Queue on (model calls are serialised by ``Models.lock`` anyway; rendering may overlap)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    return app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ASSETS)], **kwargs)
