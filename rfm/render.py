"""What the studio shows for a session, as plain values: the four views, legend, layer chart and
gallery, A_f and the enlarged layer, and the status line in Markdown. No Gradio here; ``rfm.ui``
puts these values into components.

Every call remembers what it produced in ``session.view_cache``; a view whose inputs did not change
comes back as the same object and is left out of ``Views.changed``, so the app does not encode and
resend it (an α change redraws three views, not seventeen images).
"""
from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from . import viz
from .demo import DEMO_WARNING
from .session import STAGE_TITLES, Scores, Session, sweep_axes

TILE_SIDE = 192  # layer gallery tiles (long side)
ZOOM_SIDE = 320  # the enlarged layer and A_f, side by side at the same size
AFFINITY_BORDER = (90, 90, 90)


class Display(NamedTuple):
    """How the views are shown, as opposed to what is computed."""

    view_class: str | None = None
    show_auto: bool = False


@dataclass
class Views:
    """Everything an event redraws, in the order of the app's view outputs."""

    initial: np.ndarray | None
    static: np.ndarray | None
    rfm: np.ndarray | None
    label: np.ndarray | None
    rfm_missing: bool  # no decoder: the RFM view is replaced by a note
    legend: str
    chart: np.ndarray | None
    layers: list  # [(tile, caption)] for l = 1..N
    zoom: np.ndarray | None  # the clicked layer's tile, enlarged
    affinity: np.ndarray | None  # the A_f row, at the zoom's size
    status: str
    changed: frozenset = frozenset()  # names of the fields that differ from the previous render

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "changed")


class _Same:
    """A cache key part that compares by identity (tensors and arrays do not compare to one bool)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def render(session: Session, display: Display = Display(), message: str | None = None) -> Views:
    """The session's views; ``message`` (why the last action stopped) and the session's pending
    notes lead the status line."""
    cache = session.view_cache
    changed = set()

    def cached(name: str, key, make):
        entry = cache.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = make()
        cache[name] = (key, value)
        if entry is None or not (value is None and entry[1] is None):
            changed.add(name)
        return value

    result = session.result
    notes, session.notes = session.notes, []
    status = status_text(session, display, message, notes)
    if result is None:
        values = dict(initial=None, static=None, rfm=None, label=None, rfm_missing=False, legend="", chart=None,
                      layers=[], zoom=None, affinity=None)
        out = {name: cached(name, ("empty",), lambda v=v: v) for name, v in values.items()}
        return Views(**out, status=status, changed=frozenset(changed | {"status"}))

    names = result.class_names
    k = names.index(display.view_class) if display.view_class in names else 0
    upload = session.upload
    marker = None if session.pixel is None else (session.pixel[0] * upload.scale, session.pixel[1] * upload.scale)
    class_boxes = tuple(session.boxes.get(names[k], ()))
    shown_auto = tuple(result.auto_boxes.get(names[k], ())) if display.show_auto and not class_boxes else ()
    common = (_Same(upload), k, class_boxes, shown_auto, marker)

    def cam_view(stage: str):
        cams = result.cam(stage)
        if cams is None:
            return None
        view = viz.overlay_cam(upload.display, viz.fit(cams[k], upload.display.shape[:2]))
        return _decorate(view, session, names[k], shown_auto, marker, result)

    patch = result.patch
    initial, static, rfm = (cached(stage, (_digest(maps), *common), lambda s=stage: cam_view(s))
                            for stage, maps in (("initial", patch.cam_initial), ("static", patch.cam_static),
                                                ("rfm", patch.cam_rfm)))
    label_key = (_Same(upload), _digest(result.probs), tuple(result.class_indices),
                 tuple(sorted(session.boxes.items())), display.show_auto,
                 marker, tuple(map(tuple, result.auto_boxes.items())) if display.show_auto else ())
    label = cached("label", label_key, lambda: label_view(session, display.show_auto, marker))
    selection = (_digest(result.layer_scores, result.layer_keep), result.params.n0)
    chart = cached("chart", selection, lambda: viz.layer_margin_chart(
        result.layer_margins, result.layer_keep, result.params.n0, threshold_per_pair(result)))
    rows = session.rows
    layers = cached("layers", (_Same(rows), _Same(upload), *selection), lambda: layer_tiles(session))
    zoom = cached("zoom", (_Same(rows), _Same(upload), session.zoom_layer, *selection), lambda: zoom_tile(session))
    affinity = cached("affinity", (_Same(rows), _Same(upload)), lambda: affinity_tile(session))
    rfm_missing = cached("rfm_missing", (result.cam_rfm is None,), lambda: result.cam_rfm is None)
    legend = cached("legend", (tuple(names), tuple(result.class_indices)), lambda: legend_html(result))
    return Views(initial, static, rfm, label, rfm_missing, legend, chart, layers, zoom, affinity, status,
                 frozenset(changed | {"status"}))


def _decorate(view: np.ndarray, session: Session, name: str, auto: tuple, marker, result) -> np.ndarray:
    """A CAM view with this class's user boxes (or, on request, its automatic ones) and the marker."""
    colour = viz.display_color(viz.class_colors([result.class_indices[result.class_names.index(name)]])[0])
    scale = session.upload.scale
    if auto:
        view = viz.draw_labelled_boxes(view, auto, (255, 255, 255), "auto", scale)
    boxes = session.boxes.get(name, [])
    if boxes:
        view = viz.draw_labelled_boxes(view, boxes, colour, name, scale, thickness=3)
    return view if marker is None else viz.draw_marker(view, marker)


def label_view(session: Session, show_auto: bool, marker) -> np.ndarray:
    """The pseudo label over the image, with every class's user boxes and, on request, the automatic
    boxes of the classes that have none."""
    result, upload = session.result, session.upload
    view = viz.overlay_label(upload.display, viz.fit(result.label, upload.display.shape[:2]))
    for name, colour in zip(result.class_names, viz.class_colors(result.class_indices)):
        colour = viz.display_color(colour)
        user = session.boxes.get(name, [])
        if user:
            view = viz.draw_labelled_boxes(view, user, colour, name, upload.scale, thickness=3)
        elif show_auto and result.auto_boxes.get(name):
            view = viz.draw_labelled_boxes(view, result.auto_boxes[name], colour, f"{name} (auto)", upload.scale)
    return view if marker is None else viz.draw_marker(view, marker)


# ---------------------------------------------------------------- layers


def threshold_per_pair(result) -> float:
    """The selection threshold, mean S^l over the candidates, per token pair (÷ (hw)²)."""
    return result.layer_threshold / float(result.num_tokens) ** 2


def layer_caption(result, layer: int) -> str:
    """'l=9 · kept · ΔS/pair −3.12e-06 · S/pair 0.501234' for a candidate; why not for the others."""
    i = layer - 1
    margin = float(result.layer_margins[i])
    if math.isnan(margin):
        if result.cam_rfm is None and layer >= result.params.n0:
            return f"l={layer} · not scored (no decoder)"
        return f"l={layer} · not a candidate (l < N0 = {result.params.n0})"
    verdict = "kept" if result.layer_keep[i] else "rejected"
    return (f"l={layer} · {verdict} · ΔS/pair {margin:+.3e} · "
            f"S/pair {float(result.layer_scores[i]) / float(result.num_tokens) ** 2:.6f}")


def _layer_border(result, i: int) -> tuple[int, int, int]:
    if math.isnan(float(result.layer_margins[i])):
        return viz.INACTIVE_RGB
    return viz.KEPT_RGB if result.layer_keep[i] else viz.REJECTED_RGB


def _pixel_in(session: Session, image: np.ndarray) -> tuple[float, float]:
    rgb = session.upload.rgb
    return (session.pixel[0] * image.shape[1] / rgb.shape[1], session.pixel[1] * image.shape[0] / rgb.shape[0])


def layer_tiles(session: Session) -> list:
    """(tile, caption) per layer l = 1..N for the inspected pixel; tiles keep the image's aspect ratio."""
    rows, result = session.rows, session.result
    if rows is None or session.pixel is None:
        return []
    small = viz.thumbnail(session.upload.rgb, TILE_SIDE)
    point = _pixel_in(session, small)
    return [(viz.attention_tile(small, row, point, _layer_border(result, l - 1)), layer_caption(result, l))
            for l, row in enumerate(rows.layers, start=1)]


def zoom_tile(session: Session) -> np.ndarray | None:
    """The clicked layer's attention row, at the A_f tile's size."""
    rows, layer = session.rows, session.zoom_layer
    if rows is None or layer is None or session.pixel is None or layer > len(rows.layers):
        return None
    big = viz.thumbnail(session.upload.rgb, ZOOM_SIDE)
    return viz.attention_tile(big, rows.layers[layer - 1], _pixel_in(session, big),
                              _layer_border(session.result, layer - 1))


def affinity_tile(session: Session) -> np.ndarray | None:
    rows = session.rows
    if rows is None or rows.decoder is None or session.pixel is None:
        return None
    big = viz.thumbnail(session.upload.rgb, ZOOM_SIDE)
    return viz.attention_tile(big, rows.decoder, _pixel_in(session, big), AFFINITY_BORDER)


# ---------------------------------------------------------------- text


def legend_html(result) -> str:
    swatches = [f'<span style="display:inline-block;width:14px;height:14px;background:rgb{rgb};'
                f'vertical-align:middle;border:1px solid #444"></span>&nbsp;{html.escape(name)}'
                for name, rgb in zip(result.class_names, viz.class_colors(result.class_indices))]
    return ('<div class="legend">Pseudo label: ' + " &nbsp; ".join(swatches) +
            " &nbsp; (background: no colour)</div>")


def selection_line(result) -> str:
    """Which layers RFM kept, and every candidate's ΔS^l per pair against the threshold."""
    kept = [str(l) for l, k in enumerate(result.layer_keep, start=1) if k]
    p = result.params
    line = (f"Classes: {', '.join(result.class_names)} · RFM kept layers: {', '.join(kept) if kept else 'none'} · "
            f"shown with α {p.alpha}, N0 {p.n0}, λ {p.box_threshold:g}, static {p.static_layers}, p {p.bg_power:g}, "
            f"PAR {p.par_iterations}, {p.distance}")
    margins = result.layer_margins
    if np.isfinite(margins).any():
        rule = "kept if < 0" if result.params.distance == "abs" else "kept if ≤ 0"
        parts = [f"{l}: {m:+.2e}{' ✓' if k else ''}" for l, (m, k) in
                 enumerate(zip(margins, result.layer_keep), start=1) if np.isfinite(m)]
        line += (f"\n\nΔS^l per pair vs threshold {threshold_per_pair(result):.6f} ({result.params.distance}, {rule}): "
                 + " · ".join(parts))
    return line


def scores_line(scores: Scores) -> str:
    def row(values: dict) -> str:
        return " · ".join(f"{STAGE_TITLES[s]} {'–' if math.isnan(v) else f'{100 * v:.1f}'}" for s, v in values.items())

    return (f"IoU % vs ground truth for **{html.escape(scores.class_name)}**: {row(scores.iou)}\n\n"
            f"mIoU % over {', '.join(map(html.escape, scores.classes))}: {row(scores.miou)}")


def adaptation_line(session: Session) -> str | None:
    a = session.adaptation
    if a is None:
        return None
    line = f"Decoder adapted to **{html.escape(a.stem)}** ({a.steps} steps; this session only, kept until a new image)"
    if not a.history:
        return line + " · replay cleared by the class change"
    snapshot = a.snapshot
    if a.shown == 0:
        return line + (" · replay: before adaptation" + (" (no decoder, so no RFM)" if snapshot.aff_f is None else ""))
    losses = {k: float(v) for k, v in snapshot.losses.items()}
    return line + (f" · replay: step {snapshot.step}/{a.history[-1].step}, loss {losses['total']:.4g} "
                   f"(seg {losses['seg']:.4g}, aff {losses['aff']:.4g})")


def status_text(session: Session, display: Display, message: str | None = None,
                notes: list[str] | tuple = ()) -> str:
    lines = [f"**Demo mode: {DEMO_WARNING}.**"] if session.models.demo else []
    if message:
        lines.append(message)
    lines += [n if n.startswith("⚠️") else f"ℹ️ {n}" for n in notes]
    adaptation = adaptation_line(session)
    if adaptation:
        lines.append(adaptation)
    result = session.result
    if result is not None:
        lines.append(selection_line(result))
        if session.boxes:
            lines.append("Your boxes: " + ", ".join(f"{name} ×{len(b)}" for name, b in session.boxes.items()))
        scores = session.scores(display.view_class)
        if scores is not None:
            lines.append(scores_line(scores))
        lines += result.notes
    return "\n\n".join(lines)


def loss_plot(session: Session) -> np.ndarray | None:
    a = session.adaptation
    if a is None or not a.losses:
        return None
    return viz.loss_curve(a.losses, None if a.snapshot is None else a.snapshot.step)


def replay_range(session: Session) -> dict[str, Any] | None:
    """The replay slider's range, position and label, or None when there is nothing to replay."""
    a = session.adaptation
    if a is None or not a.history:
        return None
    last = len(a.history) - 1
    every = a.history[1].step if last >= 1 else 1
    return dict(minimum=0, maximum=last, value=a.shown,
                label=f"adaptation step (replay): 0 = before, then every {every} step(s), {last} = step "
                      f"{a.history[-1].step}, the adapted decoder")


def sweep_view(session: Session, stage: str) -> tuple[np.ndarray | None, str]:
    """The N0 × α heatmap of the tab's image sweep for one stage, and its caption (or what to do first)."""
    sweep = session.current_sweep
    if sweep is None:
        return None, sweep_prompt(session.models.num_blocks)
    best = sweep.best(stage)
    title = f"{STAGE_TITLES.get(stage, stage)}: mIoU % on this image"
    image = viz.sweep_heatmap(sweep.miou[stage], sweep.n0s, sweep.alphas, title, best)
    if best is None:
        return image, f"No {stage} scores (this stage needs a decoder)."
    n0, alpha = sweep.n0s[best[0]], sweep.alphas[best[1]]
    return image, (f"Best {stage}: {100 * sweep.miou[stage][best]:.1f} % mIoU at N0 = {n0}, α = {alpha} (outlined). "
                   f"Click a cell to set the sliders to it.")


def sweep_prompt(num_blocks: int) -> str:
    n0s, alphas = sweep_axes(num_blocks)
    return (f"Scores N0 {n0s[0]}..{n0s[-1]} × α {alphas[0]}..{alphas[-1]} ({len(n0s) * len(alphas)} settings) on "
            f"this image against its ground-truth mask, the other knobs as set above.")
