"""RFM studio's web app: Gradio layout and event wiring only.

A tab's state and actions are a :class:`rfm.session.Session` (kept in ``gr.State``); what it shows
comes from :mod:`rfm.render`. The handlers of :class:`Studio` turn component values into typed
calls (the seven refinement sliders become one :class:`Controls`, the two display inputs one
:class:`Display`) and the rendered values into component updates, leaving out the views that did
not change. No handler lets an exception reach Gradio: every failure is one line in the status.
"""
from __future__ import annotations

import atexit
import html
import logging
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import gradio as gr

from . import viz
from .components import LenientSlider, OriginalFileAnnotator
from .constants import STAGES
from .demo import DEMO_WARNING
from .paths import ASSETS_DIR, SYNTHETIC_DIR
from .render import Display, Views, loss_plot, render, replay_range, sweep_prompt, sweep_view
from .session import (VOCABULARIES, Controls, Models, Session, UserMessage, close_session,
                      map_classes, sample_classes, sample_mask, sample_paths, vocabulary_spec)
from .text import get_vocabulary

log = logging.getLogger("rfm.ui")

BUILTIN_NOTE = ("**Built-in model:** a small CLIP and WeCLIP decoder trained here on generated scenes; it knows the "
                "synthetic vocabulary only, and real photographs mean little to it. For real photos put OpenAI's "
                "`ViT-B-16.pt` at `checkpoints/ViT-B-16.pt` (see `assets/synthetic/README.md`).")
DISTANCES = [("abs — paper (Σ|A_f − A^l| < mean)", "abs"),
             ("signed — official code (Σ(A_f − A^l) ≤ mean)", "signed")]
NO_DECODER = ("**RFM needs the WeCLIP decoder**: its affinity A_f scores and weights the CLIP layers. Start the app "
              "with `--decoder PATH`, or fit one to this image with *Adapt decoder to this image* below.")
VIEW_TITLES = (("Initial CAM", "CLIP-ES", "view-initial"), ("Static", "CLIP-ES", "view-static"),
               ("RFM", "WeCLIP", "view-rfm"), ("PAR label", "AFA", "view-label"))
CSS = """
.view-title {font-size: 0.85em; margin: 0 0 2px 2px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis}
.view img {max-height: 28vh; object-fit: contain}
#layers .caption-label {white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
                        max-width: none !important; position: static !important; font-size: 0.75em}
#layers .thumbnail-item {height: auto !important; aspect-ratio: auto !important}
#layers .thumbnail-item img {object-fit: contain !important; height: auto !important}
#status {font-size: 0.9em}
.banner p {margin: 0}
"""


class Studio:
    """The app's event handlers over shared :class:`Models`; each takes and returns the session."""

    def __init__(self, models: Models, max_side: int = 512, dataset_root: Path | None = None):
        self.models = models
        self.max_side = max_side
        self.dataset_root = dataset_root  # None: any folder (served to this machine only)
        self._tabs: dict[str, Session] = {}  # browser session hash → its Session, to free it on unload
        self._tabs_lock = threading.Lock()
        atexit.register(self.close_all)

    def session(self, session: Session | None) -> Session:
        return session if session is not None else Session(self.models, self.max_side)

    def open_tab(self, request: gr.Request) -> Session:
        """Page load: the tab's session, known by the browser's session hash so that unload can free it."""
        session = Session(self.models, self.max_side)
        with self._tabs_lock:
            self._tabs[request.session_hash] = session
        return session

    def close_tab(self, request: gr.Request) -> None:
        """The tab closed: free its features and download folder now (Gradio drops the state an hour later)."""
        with self._tabs_lock:
            session = self._tabs.pop(request.session_hash, None)
        close_session(session)

    def close_all(self) -> None:
        with self._tabs_lock:
            sessions, self._tabs = list(self._tabs.values()), {}
        for session in sessions:
            close_session(session)

    @property
    def open_tabs(self) -> int:
        return len(self._tabs)

    # ------------------------------------------------------------ what every view handler returns

    @staticmethod
    def _act(action: Callable[[], object]) -> str | None:
        """Run an action; its failure becomes the status line's message instead of an error badge."""
        try:
            action()
        except UserMessage as err:
            return str(err)
        except Exception as err:  # a bug must not freeze the tab: say it, log it, keep the session
            log.exception("studio action failed")
            return f"⚠️ Something went wrong ({type(err).__name__}: {html.escape(str(err))}); the session is kept."
        return None

    @staticmethod
    def _outputs(views: Views) -> list:
        """View values in ``Views.names()`` order; gr.skip() for those the browser already shows."""
        out = []
        for name in Views.names():
            value = getattr(views, name)
            if name not in views.changed:
                out.append(gr.skip())
            elif name == "rfm_missing":
                out.append(gr.update(visible=value))
            else:
                out.append(value)
        return out

    def _views(self, session: Session, display: Display, message: str | None = None) -> list:
        """Call it last in a handler: once render() has run, its views count as shown."""
        try:
            return self._outputs(render(session, display, message))
        except Exception as err:  # resend everything next time: the browser got none of this render
            log.exception("rendering failed")
            session.view_cache.clear()
            return [gr.skip()] * (len(Views.names()) - 1) + [
                f"⚠️ Could not draw the views ({type(err).__name__}: {html.escape(str(err))})."]

    @staticmethod
    def _replay_slider(session: Session):
        spec = replay_range(session)
        return gr.update(visible=False) if spec is None else gr.update(visible=True, step=1, **spec)

    # ------------------------------------------------------------ banners and vocabulary

    def banners(self):
        """(demo banner, weights banner group, weights message) for the current models."""
        missing = self.models.clip is None
        message = (f"**No CLIP weights loaded.** {self.models.error}\n\nThen restart the app, or explore every "
                   f"view now in demo mode (random weights — heatmaps are meaningless).") if missing else ""
        return gr.update(visible=self.models.demo), gr.update(visible=missing), message

    def enable_demo(self):
        self.models.enable_demo()
        gr.Info("Demo mode on: random weights — heatmaps are meaningless.")
        return self.banners()

    def choose_vocabulary(self, kind: str | None, custom: str | None, classes: Sequence[str] | None):
        """Class choices of the new vocabulary (the chosen ones respelled, e.g. VOC's 'diningtable' as
        COCO's 'dining table'), its background words, and its official λ and N0."""
        spec = vocabulary_spec(kind, custom)
        defaults = Controls.defaults(spec)
        show_custom = gr.update(visible=kind == "custom")
        try:
            vocabulary = get_vocabulary(spec)
        except ValueError:  # custom chosen, no words yet
            return (gr.update(choices=[], value=[]), "", show_custom, gr.skip(), gr.skip())
        kept = list(map_classes(classes or [], vocabulary))
        return (gr.update(choices=list(vocabulary.class_names), value=kept), ", ".join(vocabulary.background),
                show_custom, defaults.box_threshold, defaults.n0)

    def choose_classes(self, kind: str | None, custom: str | None, classes: Sequence[str] | None,
                       view_class: str | None):
        """Box labels (in colours legible on the image) and the view selector follow the chosen classes."""
        classes = list(classes or [])
        try:
            vocabulary = get_vocabulary(vocabulary_spec(kind, custom))
            colours = ["#{:02x}{:02x}{:02x}".format(*viz.display_color(c))
                       for c in viz.class_colors([vocabulary.index(c) for c in classes])]
        except ValueError:  # a class of a vocabulary being replaced: default colours until it settles
            colours = []
        shown = view_class if view_class in classes else (classes[0] if classes else None)
        return gr.update(label_list=classes, label_colors=colours), gr.update(choices=classes, value=shown)

    def pick_sample(self, kind: str | None, custom: str | None, evt: gr.SelectData):
        """A sample into the annotator, the classes worth trying on it, and a generated scene's own mask."""
        path = sample_paths()[evt.index]
        try:
            suggested = list(sample_classes(path, get_vocabulary(vocabulary_spec(kind, custom))))
        except ValueError:
            suggested = []
        mask = sample_mask(path)
        return {"image": str(path), "boxes": []}, gr.update(value=suggested), None if mask is None else str(mask)

    @staticmethod
    def reset_controls(kind: str | None = "VOC", custom: str | None = ""):
        return Controls.defaults(vocabulary_spec(kind, custom)).values()

    # ------------------------------------------------------------ the pipeline

    def analyse(self, session: Session | None, annotated: dict | None, classes: Sequence[str] | None,
                kind: str | None, custom: str | None, background: str | None, gt: str | None,
                controls: Controls, display: Display):
        """Image, classes, vocabulary, boxes or ground truth changed: CLIP reruns only when needed."""
        session = self.session(session)
        annotated = annotated or {}
        with session.lock:
            def action():
                if annotated.get("orientation"):  # the annotator turns its display, not the file or the boxes
                    session.result = None
                    raise UserMessage("⚠️ Turning the photo in the image box is not supported: turn back to 0°, "
                                      "or upload a rotated file (EXIF orientation is applied automatically).")
                session.analyse(annotated.get("image"), list(classes or []), vocabulary_spec(kind, custom),
                                background, annotated.get("boxes") or [], controls, gt)

            message = self._act(action)
            names = list(session.result.class_names) if session.result else list(classes or [])
            shown = display.view_class if display.view_class in names else (names[0] if names else None)
            extra = (gr.update(choices=names, value=shown), self._replay_slider(session), loss_plot(session),
                     *self._clamped(controls, session))
            return (session, *self._views(session, display._replace(view_class=shown), message), *extra)

    def _clamped(self, asked: Controls, session: Session) -> list:
        """Each slider's value where it had to be clamped, else gr.skip() (echoing a value back while
        the user drags would pull the handle to an older position)."""
        try:
            clamped, _ = asked.clamped(self.models.num_blocks)
        except (TypeError, ValueError):  # not numbers at all (an API call): the status says so
            return [gr.skip()] * len(asked.values())
        return [gr.skip() if a == b else b for a, b in zip(asked.values(), clamped.values())]

    def refine(self, session: Session | None, controls: Controls, display: Display):
        """A knob moved: only the refinement runs (no CLIP forward); a request superseded while it
        waited is dropped unrun."""
        session = self.session(session)
        ticket = session.new_request()
        with session.lock:
            if session.is_superseded(ticket):
                return (session, *[gr.skip()] * (len(Views.names()) + len(controls.values())))
            message = self._act(lambda: session.refine(controls))
            clamped = self._clamped(controls, session)
            return (session, *self._views(session, display, message), *clamped)

    def render(self, session: Session | None, display: Display):
        """Only the display changed (class shown, automatic boxes): redraw, compute nothing."""
        session = self.session(session)
        with session.lock:
            return (session, *self._views(session, display))

    def inspect(self, session: Session | None, x: float | None, y: float | None, display: Display):
        """Show what the patch under original image pixel (x, y) attends to in every layer and in A_f."""
        session = self.session(session)
        with session.lock:
            message = self._act(lambda: session.inspect(x, y))
            return (session, *self._views(session, display, message))

    def select_pixel(self, session: Session | None, view_class: str | None, show_auto: bool, evt: gr.SelectData):
        """A click on a view: its display coordinates back to original pixels, then :meth:`inspect`."""
        session = self.session(session)
        if session.upload is None:
            return (None, None, *self.inspect(session, None, None, Display(view_class, show_auto)))
        x, y = (v / session.upload.scale for v in evt.index)
        return (round(x), round(y), *self.inspect(session, x, y, Display(view_class, show_auto)))

    def zoom_layer(self, session: Session | None, view_class: str | None, show_auto: bool, evt: gr.SelectData):
        """A click on a layer tile enlarges it beside A_f."""
        session = self.session(session)
        with session.lock:
            message = self._act(lambda: session.zoom(int(evt.index) + 1))
            return (session, *self._views(session, Display(view_class, show_auto), message))

    # ------------------------------------------------------------ decoder adaptation

    def adapt(self, session: Session | None, steps: float, controls: Controls, display: Display,
              progress: Callable | None = None):
        """Fit a copy of the decoder to the current image, then redraw with it."""
        session = self.session(session)

        def report(step: int, total: int, losses: dict) -> None:
            if progress is not None:
                progress((step, total), desc=f"Adapting the decoder · loss {losses['total']:.4g}", unit="steps")

        with session.lock:
            message = self._act(lambda: session.adapt(steps, controls, report))
            replay, losses = self._replay_slider(session), loss_plot(session)
            return (session, *self._views(session, display, message), replay, losses)

    def replay(self, session: Session | None, index: float, controls: Controls, display: Display):
        """Show the adaptation as it was at snapshot ``index`` (0 = before it)."""
        session = self.session(session)
        with session.lock:
            message = self._act(lambda: session.replay(index, controls))
            losses = loss_plot(session)
            return (session, *self._views(session, display, message), losses)

    # ------------------------------------------------------------ sweeping this image

    def sweep(self, session: Session | None, stage: str, controls: Controls):
        """Score the N0 × α grid on this image against its ground truth; show one stage's heatmap."""
        session = self.session(session)
        with session.lock:
            message = self._act(lambda: session.sweep_image(controls))
            image, caption = sweep_view(session, stage)
            return session, image, message or caption

    def sweep_stage(self, session: Session | None, stage: str):
        """Another stage's heatmap of the same sweep."""
        session = self.session(session)
        with session.lock:
            return sweep_view(session, stage)

    def pick_sweep_cell(self, session: Session | None, controls: Controls, display: Display, x: float, y: float):
        """A click at (x, y) on the heatmap: its cell's N0 and α go to the sliders, and the views refine."""
        session = self.session(session)
        with session.lock:
            sweep = session.current_sweep
            cell = None if sweep is None else viz.sweep_cell_at(x, y, sweep.miou["label"].shape)
            if cell is None:
                return (session, *[gr.skip()] * (len(Views.names()) + len(controls.values())))
            picked = replace(controls, n0=sweep.n0s[cell[0]], alpha=sweep.alphas[cell[1]])
            message = self._act(lambda: session.refine(picked))
            sliders = [picked.alpha, picked.n0] + [gr.skip()] * (len(controls.values()) - 2)
            return (session, *self._views(session, display, message), *sliders)

    # ------------------------------------------------------------ exports

    def _export(self, session: Session | None, write: Callable[[Session], Path]):
        session = self.session(session)
        with session.lock:
            path = None

            def action():
                nonlocal path
                path = write(session)

            message = self._act(action)
        if message:
            gr.Warning(message.removeprefix("⚠️ "))
        return session, None if path is None else str(path)

    def export_label(self, session):
        return self._export(session, Session.export_label)

    def export_cams(self, session):
        return self._export(session, Session.export_cams)

    def export_coco(self, session):
        return self._export(session, Session.export_coco)

    def export_figure(self, session):
        return self._export(session, Session.export_figure)

    def add_to_dataset(self, session: Session | None, folder: str | None, stem: str | None, overwrite: bool):
        """Image and pseudo label into a VOC-layout folder; refuses to replace a pair unless ``overwrite``."""
        session = self.session(session)
        with session.lock:
            report = None

            def action():
                nonlocal report
                report = session.add_to_dataset(folder, stem, overwrite, root=self.dataset_root)

            message = self._act(action)
        if report is None:
            return session, message
        return session, (f"Saved **{html.escape(report.stem)}** · {report.total} labelled image(s) in "
                         f"`{report.folder}` (split `ImageSets/Segmentation/train.txt`) · {report.added} image(s) "
                         f"added in this session")


# ---------------------------------------------------------------- layout


def build_app(studio: Studio) -> gr.Blocks:
    """Inputs on the left; the four views with the sliders right under them, then the layer inspector."""
    n_blocks = studio.models.num_blocks
    start = "Synthetic" if studio.models.builtin else "VOC"
    d = Controls.defaults(VOCABULARIES[start])
    vocabulary = get_vocabulary(VOCABULARIES[start])
    # delete_cache: Gradio's copies of uploads older than a day go, checked hourly
    with gr.Blocks(title="RFM studio", delete_cache=(3600, 86400)) as app:
        session = gr.State(None, delete_callback=close_session)
        gr.Markdown("**RFM studio** · CLIP-ES initial CAM → static refinement → WeCLIP's RFM → AFA's PAR pseudo label",
                    elem_classes="banner")
        demo_banner = gr.Markdown(f"⚠️ **Demo mode: {DEMO_WARNING}.** Every view works; nothing in it means anything.",
                                  visible=studio.models.demo, elem_id="demo-banner", elem_classes="banner")
        gr.Markdown(BUILTIN_NOTE, visible=studio.models.builtin, elem_id="builtin-banner", elem_classes="banner")
        with gr.Group(visible=studio.models.clip is None, elem_id="weights-banner") as weights_banner:
            weights_message = gr.Markdown(studio.banners()[2])
            demo_button = gr.Button("Explore in demo mode (random weights — heatmaps are meaningless)",
                                    variant="primary", elem_id="demo-button")
        with gr.Row():
            with gr.Column(scale=3, min_width=300):
                annotator = OriginalFileAnnotator(
                    label="Image — drag to draw a box that confines a class", image_type="filepath", label_list=[],
                    sources=["upload", "clipboard"], show_remove_button=True, box_min_size=4, height=260,
                    elem_id="annotator")
                samples = gr.Gallery([str(p) for p in sample_paths()], label="Samples (click one)", columns=5,
                                     height=96, allow_preview=False, elem_id="samples")
                kind = gr.Radio(list(VOCABULARIES), value=start, label="Vocabulary", elem_id="vocabulary")
                custom = gr.Textbox(label="Custom classes (comma-separated, Enter to apply)", placeholder="lamp, mug",
                                    visible=False, elem_id="custom-words")
                classes = gr.Dropdown(list(vocabulary.class_names), value=[], multiselect=True,
                                      label="Classes in the image", elem_id="classes")
                with gr.Accordion("Background words", open=False):
                    background = gr.Textbox(", ".join(vocabulary.background), lines=2, elem_id="background",
                                            label="Background words (comma-separated; Enter to apply)")
                with gr.Accordion("Ground truth (optional): live IoU per stage", open=False):
                    gt = gr.File(label="Mask PNG (VOC palette or class index + 1, 255 ignore)", file_types=[".png"],
                                 height=80, elem_id="gt")
            with gr.Column(scale=8):
                with gr.Row(equal_height=True):
                    # a dropdown that accepts any value: a click racing a class change must not be rejected
                    view_class = gr.Dropdown([], label="Class shown", allow_custom_value=True, scale=3,
                                             elem_id="view-class", container=False)
                    show_auto = gr.Checkbox(False, label="show automatic boxes", scale=2, elem_id="show-auto",
                                            container=False)
                with gr.Row(elem_id="views"):
                    views = []
                    for title, source, eid in VIEW_TITLES:
                        with gr.Column(min_width=150):
                            gr.HTML(f'<div class="view-title"><b>{title}</b> ({source})</div>')
                            views.append(gr.Image(show_label=False, format="jpeg", interactive=False, elem_id=eid,
                                                  elem_classes="view", buttons=["fullscreen"], min_width=150))
                rfm_note = gr.Markdown(NO_DECODER, visible=False, elem_id="rfm-note")
                with gr.Row():
                    alpha = LenientSlider(1, 4, d.alpha, step=1, label="α (matrix power)", elem_id="alpha")
                    n0 = LenientSlider(1, n_blocks, d.n0, step=1, label=f"N0 (first RFM layer, 1..{n_blocks})",
                                       elem_id="n0")
                    box_threshold = LenientSlider(0.05, 0.95, d.box_threshold, step=0.05, label="box threshold λ",
                                                  elem_id="box-threshold")
                with gr.Row():
                    static_layers = LenientSlider(1, n_blocks, d.static_layers, step=1, elem_id="static-layers",
                                                  label="static layers (last blocks averaged)")
                    bg_power = LenientSlider(0.25, 4, d.bg_power, step=0.25, label="background power p",
                                             elem_id="bg-power")
                    par_iterations = LenientSlider(0, 50, d.par_iterations, step=1, elem_id="par-iterations",
                                                   label="PAR iterations (0 = off)")
                with gr.Row(equal_height=True):
                    distance = gr.Radio(DISTANCES, value=d.distance, label="RFM distance", elem_id="distance", scale=4)
                    reset = gr.Button("Reset to the official settings", elem_id="reset", scale=1)
                status = gr.Markdown("Pick a sample or upload an image, then choose its classes.", elem_id="status")
                with gr.Row(equal_height=True):
                    gr.Image(viz.cam_colorbar(), show_label=False, interactive=False, height=44, buttons=[],
                             container=False, elem_id="colorbar", scale=1)
                    legend = gr.HTML(elem_id="legend")
                chart = gr.Image(show_label=False, format="png", interactive=False, buttons=[], elem_id="chart")
                gr.Markdown("**Layers** — click a pixel on any view to see what its patch attends to; click a tile "
                            "to enlarge it beside A_f")
                with gr.Row():
                    pixel_x = gr.Number(None, label="pixel x", precision=0, elem_id="pixel-x")
                    pixel_y = gr.Number(None, label="pixel y", precision=0, elem_id="pixel-y")
                    inspect_button = gr.Button("Inspect pixel", elem_id="inspect")
                layers = gr.Gallery(label="Attention row of the pixel's patch per layer (green kept, red rejected, "
                                          "grey not a candidate)", columns=6, format="jpeg", allow_preview=False,
                                    object_fit="contain", height="auto", elem_id="layers")
                with gr.Row(equal_height=True):
                    zoom = gr.Image(label="The clicked layer", format="jpeg", interactive=False, buttons=[],
                                    elem_id="zoom")
                    affinity = gr.Image(label="Decoder affinity A_f row", format="jpeg", interactive=False,
                                        buttons=[], elem_id="affinity")
                with gr.Accordion("Decoder adaptation — fit the decoder to this image", open=True,
                                  elem_id="adaptation"):
                    gr.Markdown("Trains a copy of the decoder (a fresh one when none is loaded) on this image alone "
                                "with WeCLIP's losses, from the cached CLIP outputs and the settings above. Only "
                                "this tab uses it, and only for this image; other tabs keep refining meanwhile. "
                                "The slider then replays how A_f, the kept layers and the RFM CAM changed.")
                    with gr.Row(equal_height=True):
                        adapt_steps = LenientSlider(5, 200, 40, step=1, label="adaptation steps", scale=3,
                                                elem_id="adapt-steps")
                        adapt_button = gr.Button("Adapt decoder to this image", variant="primary", scale=1,
                                                 elem_id="adapt")
                    replay = gr.Slider(0, 1, 1, step=1, label="adaptation step (replay)", visible=False,
                                       elem_id="replay")
                    loss_image = gr.Image(label="Adaptation losses (the progress bar runs here)", format="png",
                                          interactive=False, height=200, buttons=[], elem_id="adapt-losses")
                with gr.Accordion("Sweep this image — N0 × α against the ground truth", open=False,
                                  elem_id="image-sweep"):
                    with gr.Row(equal_height=True):
                        sweep_stage = gr.Radio(list(STAGES), value="label", label="Stage shown", scale=3,
                                               elem_id="sweep-stage")
                        sweep_button = gr.Button("Sweep this image", variant="primary", scale=1, elem_id="sweep")
                    sweep_caption = gr.Markdown(sweep_prompt(n_blocks), elem_id="sweep-caption")
                    sweep_heatmap = gr.Image(show_label=False, format="png", interactive=False, buttons=[],
                                             elem_id="sweep-heatmap")
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

        _wire(app, studio, SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("app", "studio")}))
    return app


# ---------------------------------------------------------------- wiring


def _wire(app: gr.Blocks, studio: Studio, ui: SimpleNamespace) -> None:
    """Events. Public endpoints (api_name) first, so the private chains reusing a handler do not take its name."""
    controls = [ui.alpha, ui.n0, ui.static_layers, ui.box_threshold, ui.bg_power, ui.par_iterations, ui.distance]
    display = [ui.view_class, ui.show_auto]
    knobs = [*controls, *display]  # always last among a handler's inputs: see _knob_values
    view_outputs = [*ui.views, ui.rfm_note, ui.legend, ui.chart, ui.layers, ui.zoom, ui.affinity, ui.status]
    assert len(view_outputs) == len(Views.names())
    clamped = controls  # a typed value outside a slider's range comes back clamped
    vocab = [ui.kind, ui.custom]
    quiet = dict(show_progress="hidden", trigger_mode="always_last")
    private = dict(api_visibility="private")
    analyse = dict(fn=_with_knobs(studio.analyse),
                   inputs=[ui.session, ui.annotator, ui.classes, *vocab, ui.background, ui.gt, *knobs],
                   outputs=[ui.session, *view_outputs, ui.view_class, ui.replay, ui.loss_image, *clamped])
    choose_classes = dict(fn=studio.choose_classes, inputs=[*vocab, ui.classes, ui.view_class],
                          outputs=[ui.annotator, ui.view_class], **private)

    # a new image, new boxes or a sample's value all arrive as the annotator's change
    ui.annotator.change(**analyse, api_name="analyse", trigger_mode="always_last")
    # input, not change: a value the app sets itself (reset, COCO's settings, a clamp) must not refine twice
    gr.on([c.input for c in controls], _with_knobs(studio.refine), [ui.session, *knobs],
          [ui.session, *view_outputs, *clamped], api_name="refine", **quiet)
    gr.on([ui.view_class.input, ui.show_auto.input], _with_display(studio.render), [ui.session, *display],
          [ui.session, *view_outputs], api_name="render", **quiet)
    gr.on([ui.inspect_button.click, ui.pixel_x.submit, ui.pixel_y.submit], _with_display(studio.inspect),
          [ui.session, ui.pixel_x, ui.pixel_y, *display], [ui.session, *view_outputs], api_name="inspect")
    ui.reset.click(studio.reset_controls, vocab, controls, api_name="reset").then(
        _with_knobs(studio.refine), [ui.session, *knobs], [ui.session, *view_outputs, *clamped], **private)

    def adapt(session, steps, *values, progress=gr.Progress()):
        return studio.adapt(session, steps, *_knob_values(values), progress=progress)

    ui.adapt_button.click(adapt, [ui.session, ui.adapt_steps, *knobs],
                          [ui.session, *view_outputs, ui.replay, ui.loss_image], api_name="adapt",
                          show_progress_on=[ui.loss_image, ui.views[2]])  # one bar by the button, one on RFM
    # input, not change: the adapt handler setting the slider to its end must not replay what it just drew
    ui.replay.input(_with_knobs(studio.replay), [ui.session, ui.replay, *knobs],
                    [ui.session, *view_outputs, ui.loss_image], api_name="replay", **quiet)
    def sweep_image(session, stage, *values):
        return studio.sweep(session, stage, Controls(*values))

    ui.sweep_button.click(sweep_image, [ui.session, ui.sweep_stage, *controls],
                          [ui.session, ui.sweep_heatmap, ui.sweep_caption], api_name="sweep_image")
    ui.sweep_stage.input(studio.sweep_stage, [ui.session, ui.sweep_stage], [ui.sweep_heatmap, ui.sweep_caption],
                         **private)

    def pick_sweep_cell(session, alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance,
                        view_class, show_auto, evt: gr.SelectData):
        knobs = Controls(alpha, n0, static_layers, box_threshold, bg_power, par_iterations, distance)
        return studio.pick_sweep_cell(session, knobs, Display(view_class, show_auto), *evt.index)

    ui.sweep_heatmap.select(pick_sweep_cell, [ui.session, *knobs], [ui.session, *view_outputs, *controls], **private)
    for name, button in ui.export_buttons.items():
        button.click(getattr(studio, f"export_{name}"), [ui.session], [ui.session, ui.download],
                     api_name=f"export_{name}")
    ui.add_button.click(studio.add_to_dataset, [ui.session, ui.dataset_folder, ui.dataset_stem, ui.overwrite],
                        [ui.session, ui.dataset_status], api_name="add_to_dataset")

    app.load(studio.open_tab, outputs=[ui.session], **private)
    app.unload(studio.close_tab)
    banners = [ui.demo_banner, ui.weights_banner, ui.weights_message]
    app.load(studio.banners, outputs=banners, **private)
    ui.demo_button.click(studio.enable_demo, outputs=banners, api_name="demo_mode").then(**analyse, **private)
    gr.on([ui.kind.input, ui.custom.submit], studio.choose_vocabulary, [*vocab, ui.classes],
          [ui.classes, ui.background, ui.custom, ui.box_threshold, ui.n0], **private).then(
        **choose_classes).then(**analyse, **private)
    ui.classes.input(**choose_classes).then(**analyse, **private)
    gr.on([ui.background.submit, ui.gt.upload, ui.gt.clear], **analyse, **private)
    ui.annotator.upload(lambda: None, outputs=ui.gt, **private)  # a mask belongs to the image it came with
    ui.samples.select(studio.pick_sample, vocab, [ui.annotator, ui.classes, ui.gt], **private).then(**choose_classes)
    for view in ui.views:
        view.select(studio.select_pixel, [ui.session, *display], [ui.pixel_x, ui.pixel_y, ui.session, *view_outputs],
                    **private)
    ui.layers.select(studio.zoom_layer, [ui.session, *display], [ui.session, *view_outputs], **private)


def _knob_values(values: Sequence) -> tuple:
    """The trailing seven slider values and two display values of a handler's inputs, typed."""
    return (*values[:-9], Controls(*values[-9:-2]), Display(*values[-2:]))


def _with_knobs(handler: Callable) -> Callable:
    """Gradio passes component values positionally; the handler takes one Controls and one Display."""
    def call(*values):
        return handler(*_knob_values(values))

    call.__name__ = handler.__name__  # Gradio names endpoints after the function
    return call


def _with_display(handler: Callable) -> Callable:
    def call(*values):
        return handler(*values[:-2], Display(*values[-2:]))

    call.__name__ = handler.__name__
    return call


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Queue on (model calls are serialised by ``Models.lock``; rendering may overlap)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    return app.launch(server_name=host, server_port=port, share=share, css=CSS,
                      allowed_paths=[str(ASSETS_DIR), str(SYNTHETIC_DIR)], **kwargs)
