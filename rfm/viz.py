"""Overlays and figures for CAM refinement results.

The overlay functions are the interactive path: numpy/OpenCV only, called on every
slider move. Matplotlib is imported lazily by the figure functions alone, and they
build a bare :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot global
state), so figures can be made from several threads.

Results are duck-typed: any object with ``class_names``, ``class_indices``,
``cam(stage)`` (None for a missing stage), ``label``, ``layer_scores``, ``layer_margins``,
``layer_keep``, ``layer_threshold``, ``num_tokens`` (hw: S^l sums over its square) and
``params`` (``alpha``, ``n0``, ``distance``).
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
from PIL import Image

from .constants import CAM_STAGES, STAGES
from .export import voc_palette
from .fileio import atomic_write
from .metrics import percent

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "class_colors",
    "colorize_cam",
    "colorize_label",
    "overlay_cam",
    "overlay_label",
    "save_figure",
    "save_overlays",
    "side_by_side_figure",
]

_PALETTE = voc_palette()
_KEPT_COLOUR = "tab:green"
_REJECTED_COLOUR = "tab:red"
_INACTIVE_COLOUR = "0.9"


def colorize_cam(cam: np.ndarray) -> np.ndarray:
    """JET-coloured (H, W, 3) uint8 RGB of an (H, W) CAM; values clipped to [0, 1], NaN shown as 0."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (H, W), got shape {cam.shape}")
    levels = np.rint(np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV colour maps are BGR


def overlay_cam(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend the JET-coloured (H, W) CAM over an (H, W, 3) uint8 RGB image."""
    image = _check_image(image)
    _check_same_size(image, cam, "cam")
    return _blend(image, colorize_cam(cam), opacity)


def colorize_label(label: np.ndarray) -> np.ndarray:
    """VOC-palette (H, W, 3) uint8 RGB of an (H, W) class-index map (255 ignore = (224, 224, 192))."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    return _PALETTE[label.astype(np.intp)]


def overlay_label(image: np.ndarray, label: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend the palette colours of an (H, W) label over an RGB image; background (0) stays plain."""
    image = _check_image(image)
    _check_same_size(image, label, "label")
    blended = _blend(image, colorize_label(label), opacity)
    return np.where((np.asarray(label) == 0)[..., None], image, blended)


def class_colors(class_indices: Sequence[int]) -> list[tuple[int, int, int]]:
    """Palette RGB colour of each 0-based vocabulary index (its label value is index + 1), for legends."""
    colours = []
    for index in class_indices:
        if not 0 <= index + 1 <= 255:
            raise ValueError(f"class index {index} has no palette colour (valid: 0..254)")
        colours.append(tuple(int(v) for v in _PALETTE[index + 1]))
    return colours


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    return image


def _check_same_size(image: np.ndarray, array: np.ndarray, name: str) -> None:
    if np.shape(array) != image.shape[:2]:
        raise ValueError(f"{name} shape {np.shape(array)} does not match image size {image.shape[:2]}")


def _blend(image: np.ndarray, colour: np.ndarray, opacity: float) -> np.ndarray:
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    return cv2.addWeighted(image, 1.0 - opacity, colour, opacity, 0.0)


def side_by_side_figure(image: np.ndarray, result: Any) -> Figure:
    """Figure comparing the stages, one row per class, plus the per-layer selection panel.

    Columns: initial CAM / static refinement / RFM refinement / that class in the pseudo
    label. The bottom panel plots S^l for layers 1..N: kept layers (G^l = 1) and rejected
    ones in two colours, layers outside N0..N (NaN score) shaded, the threshold dashed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = _check_image(image)
    rows = len(result.class_names)
    height, width = image.shape[:2]
    cell = 3.0  # inches per image column
    row_height = cell * height / width + 0.4  # room for the titles
    fig = Figure(figsize=(4 * cell, rows * row_height + 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows + 1, 4, height_ratios=[row_height] * rows + [3.0])
    for row in range(rows):
        for column, (title, panel) in enumerate(_class_panels(image, result, row)):
            ax = fig.add_subplot(grid[row, column])
            ax.set_axis_off()
            ax.set_title(title, fontsize=9)
            if panel is None:
                ax.text(0.5, 0.5, "no decoder loaded", ha="center", va="center",
                        transform=ax.transAxes, fontsize=10, color="0.4")
            else:
                ax.imshow(panel)
    _plot_layer_scores(fig.add_subplot(grid[rows, :]), result)
    return fig


def _class_panels(image: np.ndarray, result: Any, row: int) -> list[tuple[str, np.ndarray | None]]:
    """(title, RGB panel or None) for the four columns of one class row."""
    name = result.class_names[row]
    value = result.class_indices[row] + 1
    titles = {"initial": "initial", "static": "static", "rfm": "RFM"}
    panels = [(f"{name}: {titles[stage]}", None if result.cam(stage) is None else overlay_cam(image, result.cam(stage)[row]))
              for stage in CAM_STAGES]
    return panels + [(f"{name}: pseudo label", overlay_label(image, np.where(result.label == value, value, 0)))]


def _plot_layer_scores(ax: Any, result: Any) -> None:
    """ΔS^l per token pair (S^l − threshold) / (hw)² for layers 1..N around the threshold at 0:
    kept layers (G^l = 1) and rejected ones in two colours, layers outside N0..N shaded, N0 marked."""
    from matplotlib.patches import Patch

    margins = np.asarray(result.layer_margins, dtype=float)
    keep = np.asarray(result.layer_keep, dtype=bool)
    layers = np.arange(1, margins.size + 1)
    active = np.isfinite(margins)
    params = result.params
    ax.set_title(f"RFM layer selection (distance={params.distance}, α={params.alpha}, N0={params.n0}): "
                 f"$\\Delta S^l$ = ($S^l$ − threshold) / (hw)²", fontsize=10)
    ax.set_xlabel("layer l")
    ax.set_ylabel("$\\Delta S^l$ per token pair")
    ax.set_xticks(layers)
    ax.set_xlim(0.5, margins.size + 0.5)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles = []
    for layer in layers[~active]:
        ax.axvspan(layer - 0.5, layer + 0.5, color=_INACTIVE_COLOUR, zorder=0)
    if (~active).any():
        handles.append(Patch(color=_INACTIVE_COLOUR, label="not a candidate (outside $N_0$..$N$)"))
    for mask, colour, text in ((active & keep, _KEPT_COLOUR, "kept ($G^l = 1$)"),
                               (active & ~keep, _REJECTED_COLOUR, "rejected ($G^l = 0$)")):
        if mask.any():
            handles.append(ax.bar(layers[mask], margins[mask], color=colour, label=text))
    if active.any():
        span = float(np.abs(margins[active]).max()) or 1.0
        ax.set_ylim(-1.25 * span, 1.25 * span)  # zero-centred: the threshold is the axis
        threshold = result.layer_threshold / result.num_tokens ** 2
        handles.append(ax.axhline(0.0, color="k", linestyle="--", label=f"threshold: {threshold:.6g} per pair"))
        handles.append(ax.axvline(params.n0 - 0.5, color="0.3", linestyle=":", label=f"$N_0$ = {params.n0}"))
    else:
        ax.text(0.5, 0.5, "no layer scores", ha="center", va="center", transform=ax.transAxes)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")


def save_figure(fig: Figure, path: str | os.PathLike, overwrite: bool = False, dpi: int = 100) -> Path:
    """Save a figure as PNG through :func:`rfm.fileio.atomic_write`."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), overwrite)


def overlay_paths(result: Any, out_dir: str | os.PathLike) -> list[Path]:
    """The files ``save_overlays`` writes for a result, in its order."""
    out_dir = Path(out_dir)
    names = _file_names(result.class_names)
    return [out_dir / f"{stage}_{name}.png" for stage in _overlay_stages(result) for name in names] + [
        out_dir / "label_overlay.png"]


def _overlay_stages(result: Any) -> list[str]:
    return [s for s in CAM_STAGES if s != "rfm" or result.cam_rfm is not None]


def save_overlays(
    image: np.ndarray, result: Any, out_dir: str | os.PathLike, overwrite: bool = False
) -> list[Path]:
    """Write ``<stage>_<class>.png`` CAM overlays (initial/static/rfm) and ``label_overlay.png``.

    RFM overlays are skipped when ``result.cam_rfm`` is None. Every target is checked
    before anything is written, so an existing file (without ``overwrite``) changes nothing.
    """
    paths = overlay_paths(result, out_dir)
    if not overwrite:
        existing = [str(path) for path in paths if path.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s); pass overwrite=True to replace")
    renders = [lambda s=stage, k=k: overlay_cam(image, result.cam(s)[k])
               for stage in _overlay_stages(result) for k in range(len(result.class_names))]
    renders.append(lambda: overlay_label(image, result.label))
    return [_save_rgb_png(path, render(), overwrite) for path, render in zip(paths, renders)]


def _file_names(class_names: Sequence[str]) -> list[str]:
    """File-name-safe, unique versions of the class names ("traffic light" → "traffic_light")."""
    names = []
    for position, class_name in enumerate(class_names):
        name = re.sub(r"[^A-Za-z0-9-]+", "_", str(class_name)).strip("_") or f"class{position}"
        names.append(f"{name}_{position}" if name in names else name)
    return names


def _save_rgb_png(path: Path, rgb: np.ndarray, overwrite: bool) -> Path:
    return atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format="PNG"), overwrite)


# ---------------------------------------------------------------- interactive app rendering (OpenCV only)

__all__ += [
    "attention_tile",
    "cam_colorbar",
    "draw_boxes",
    "draw_marker",
    "fit",
    "display_color",
    "draw_labelled_boxes",
    "layer_margin_chart",
    "thumbnail",
]

KEPT_RGB = (44, 160, 44)  # matplotlib's tab:green / tab:red / light grey, as in the static figure
REJECTED_RGB = (214, 39, 40)
INACTIVE_RGB = (230, 230, 230)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def thumbnail(image: np.ndarray, max_side: int) -> np.ndarray:
    """The RGB image scaled down (area interpolation) so its long side is at most ``max_side``."""
    image = _check_image(image)
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fit(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map resized to ``size`` = (h, w) for display: integer labels by nearest neighbour (no
    invented classes), float maps by area averaging when shrinking and bilinearly when enlarging."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {array.shape}")
    if array.shape == tuple(size):
        return array
    height, width = size
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return cv2.resize(array.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    shrink = height * width < array.shape[0] * array.shape[1]
    return cv2.resize(array.astype(np.float32), (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], color: Sequence[int] = (255, 255, 255),
               thickness: int = 2, scale: float = 1.0) -> np.ndarray:
    """A copy of the RGB image with (x0, y0, x1, y1) boxes outlined; ``scale`` maps box coordinates to
    this image's pixels (for boxes given on a larger original)."""
    out = _check_image(image).copy()
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (round(x0 * scale), round(y0 * scale)), (round(x1 * scale) - 1, round(y1 * scale) - 1),
                      tuple(int(c) for c in color), thickness)
    return out


def display_color(rgb: Sequence[int]) -> tuple[int, int, int]:
    """A class colour made bright enough to read on any heatmap: the VOC palette's dark reds and
    purples ((64, 0, 0) is cat) are scaled until their largest channel is 255 (black → white)."""
    top = max(int(c) for c in rgb)
    return (255, 255, 255) if top == 0 else tuple(min(255, round(int(c) * 255 / top)) for c in rgb)


def draw_labelled_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], color: Sequence[int],
                        text: str | None = None, scale: float = 1.0, thickness: int = 2) -> np.ndarray:
    """Boxes legible on any background: a black outline under the (bright) colour, and ``text`` on a
    tag of that colour at the top-left corner. ``scale`` maps box coordinates to this image's pixels."""
    out = draw_boxes(image, boxes, (0, 0, 0), thickness + 2, scale)
    out = draw_boxes(out, boxes, color, thickness, scale)
    if text:
        ink = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        (tw, th), base = cv2.getTextSize(text, _FONT, 0.45, 1)
        for x0, y0, _, _ in boxes:
            x, y = round(x0 * scale), round(y0 * scale)
            y = y if y - th - base - 4 >= 0 else y + th + base + 4  # inside the box at the top edge
            cv2.rectangle(out, (x, y - th - base - 4), (x + tw + 6, y), (0, 0, 0), -1)
            cv2.rectangle(out, (x + 1, y - th - base - 3), (x + tw + 5, y - 1), tuple(int(c) for c in color), -1)
            cv2.putText(out, text, (x + 3, y - base - 2), _FONT, 0.45, ink, 1, cv2.LINE_AA)
    return out


def draw_marker(image: np.ndarray, point: tuple[float, float], color: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """A copy of the RGB image with a cross at pixel (x, y), outlined in black so it shows on any colour."""
    out = _check_image(image).copy()
    size = max(6, round(max(out.shape[:2]) / 40))
    centre = (round(point[0]), round(point[1]))
    cv2.drawMarker(out, centre, (0, 0, 0), cv2.MARKER_CROSS, size + 2, 4)
    cv2.drawMarker(out, centre, tuple(int(c) for c in color), cv2.MARKER_CROSS, size, 2)
    return out


def attention_tile(image: np.ndarray, row: np.ndarray, point: tuple[float, float] | None = None,
                   border: Sequence[int] | None = None, opacity: float = 0.6) -> np.ndarray:
    """One attention row (h, w) as a JET heatmap over the RGB image, min-max scaled per row so every
    layer's pattern is visible; ``point`` (x, y) is marked and ``border`` frames the tile."""
    image = _check_image(image)
    row = np.nan_to_num(np.asarray(row, dtype=np.float32))
    if row.ndim != 2:
        raise ValueError(f"row must be 2-D (h, w), got shape {row.shape}")
    span = float(row.max() - row.min())
    scaled = (row - row.min()) / span if span > 0 else np.zeros_like(row)
    height, width = image.shape[:2]
    tile = overlay_cam(image, cv2.resize(scaled, (width, height), interpolation=cv2.INTER_NEAREST), opacity)
    if point is not None:
        tile = draw_marker(tile, point)
    if border is not None:
        pad = max(3, round(max(height, width) / 50))
        tile = cv2.copyMakeBorder(tile, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=tuple(int(c) for c in border))
    return tile


def cam_colorbar(width: int = 320, height: int = 40) -> np.ndarray:
    """The shared JET colour scale of every CAM view, 0 at the left to 1 at the right, with ticks."""
    bar_height = height // 2
    out = np.full((height, width, 3), 255, np.uint8)
    out[:bar_height] = colorize_cam(np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (bar_height, 1)))
    for value in (0.0, 0.5, 1.0):
        text = f"{value:g}"
        (tw, _), _ = cv2.getTextSize(text, _FONT, 0.4, 1)
        x = min(max(0, round(value * (width - 1)) - tw // 2), width - tw)
        cv2.putText(out, text, (x, height - 4), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def layer_margin_chart(margins: np.ndarray, keep: np.ndarray, n0: int, threshold: float | None = None,
                       width: int = 520, height: int = 220) -> np.ndarray:
    """ΔS^l per token pair for l = 1..N as an RGB bar chart centred on the selection threshold (the
    zero line): kept layers green, rejected red, layers outside N0..N as grey bands, N0 marked by a
    dotted line. ``threshold`` (mean S^l per pair) is printed in the title. OpenCV only: the cheap
    twin of the figure's matplotlib panel, for the interactive view."""
    margins = np.asarray(margins, dtype=float)
    keep = np.asarray(keep, dtype=bool)
    if margins.ndim != 1 or keep.shape != margins.shape:
        raise ValueError(f"margins and keep must be matching 1-D arrays, got {margins.shape} and {keep.shape}")
    out = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 58, width - 8, 26, height - 22
    zero = (top + bottom) // 2
    active = np.isfinite(margins)
    span = float(np.abs(margins[active]).max()) * 1.15 if active.any() else 0.0
    span = span or 1.0

    def y_of(value: float) -> int:
        return round(zero - value / span * (bottom - top) / 2)

    slot = (right - left) / max(1, margins.size)
    for i, margin in enumerate(margins):
        if not active[i]:
            cv2.rectangle(out, (round(left + i * slot), top), (round(left + (i + 1) * slot) - 1, bottom),
                          INACTIVE_RGB, -1)
        else:
            x0, x1 = round(left + i * slot + slot * 0.15), round(left + (i + 1) * slot - slot * 0.15)
            y = y_of(margin)
            cv2.rectangle(out, (x0, min(y, zero)), (x1, max(y, zero)), KEPT_RGB if keep[i] else REJECTED_RGB, -1)
        label = str(i + 1)
        (tw, _), _ = cv2.getTextSize(label, _FONT, 0.4, 1)
        cv2.putText(out, label, (round(left + (i + 0.5) * slot - tw / 2), height - 6), _FONT, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for x in range(left, right, 10):  # the threshold: ΔS = 0
        cv2.line(out, (x, zero), (min(x + 5, right), zero), (0, 0, 0), 1)
    if active.any():
        for value in (span, 0.0, -span):  # a symmetric axis, in the units the captions use
            text = "0" if value == 0 else f"{value:+.2e}"
            cv2.putText(out, text, (2, y_of(value) + 4), _FONT, 0.33, (90, 90, 90), 1, cv2.LINE_AA)
        if 1 <= n0 <= margins.size:
            x = round(left + (n0 - 1) * slot)
            for y in range(top, bottom, 6):
                cv2.line(out, (x, y), (x, min(y + 3, bottom)), (60, 60, 60), 1)
            cv2.putText(out, f"N0={n0}", (min(x + 3, right - 40), top + 10), _FONT, 0.38, (60, 60, 60), 1, cv2.LINE_AA)
        title = "dS^l per pair vs threshold: green kept, red rejected, grey not a candidate"
        if threshold is not None and np.isfinite(threshold):
            title = f"dS^l = (S^l - threshold)/(hw)^2; threshold {threshold:.6g}/pair"
    else:
        title = "no layer scores (RFM needs a decoder)"
    cv2.putText(out, title, (4, 15), _FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return out


LOSS_RGB = {"total": (0, 0, 0), "seg": (31, 119, 180), "aff": (255, 127, 14)}  # matplotlib's default cycle


def loss_curve(losses: Sequence[tuple[int, float, float, float]], current: int | None = None, width: int = 520,
               height: int = 160) -> np.ndarray:
    """Losses of a decoder adaptation as an RGB image: one (step, seg, aff, total) per step drawn as
    total (black), segmentation (blue) and affinity (orange) lines from 0 to the largest value; the
    replayed step ``current`` as a grey vertical line (0 = before the first step). OpenCV only."""
    out = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 8, width - 8, 24, height - 18
    rows = np.asarray(losses, dtype=float).reshape(-1, 4)
    last = max(1.0, float(rows[:, 0].max())) if rows.size else 1.0
    finite = rows[:, 1:][np.isfinite(rows[:, 1:])]
    high = float(finite.max()) * 1.1 if finite.size and finite.max() > 0 else 1.0

    def point(step: float, value: float) -> tuple[int, int]:
        return (round(left + step / last * (right - left)),
                round(bottom - min(max(value, 0.0), high) / high * (bottom - top)))

    cv2.line(out, (left, bottom), (right, bottom), (0, 0, 0), 1)
    if current is not None:
        x = point(float(current), 0.0)[0]
        cv2.line(out, (x, top), (x, bottom), (150, 150, 150), 2)
    for column, name in ((2, "aff"), (1, "seg"), (3, "total")):  # total last: on top where they overlap
        pts = [point(r[0], r[column]) for r in rows if np.isfinite(r[column])]
        if len(pts) > 1:
            cv2.polylines(out, [np.array(pts, np.int32)], False, LOSS_RGB[name], 2, cv2.LINE_AA)
        elif pts:
            cv2.circle(out, pts[0], 3, LOSS_RGB[name], -1)
    cv2.putText(out, f"{high:.3g}", (left + 2, top + 10), _FONT, 0.33, (90, 90, 90), 1, cv2.LINE_AA)
    cv2.putText(out, f"step 0..{last:.0f}", (left, height - 4), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    x = left
    for name in ("total", "seg", "aff"):
        cv2.putText(out, name, (x, 15), _FONT, 0.4, LOSS_RGB[name], 1, cv2.LINE_AA)
        x += cv2.getTextSize(name, _FONT, 0.4, 1)[0][0] + 12
    title = "loss per step" + ("" if current is None else f"; grey line: step {current} shown")
    cv2.putText(out, title, (x + 8, 15), _FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return out


# "sweep this image": cell size and margins of the heatmap, shared by the drawing and the click mapping
SWEEP_CELL = (58, 26)  # (width, height) in pixels
SWEEP_MARGIN = (40, 42)  # (left, top): N0 labels on the left, title and α labels above


def sweep_heatmap(grid: np.ndarray, rows: Sequence[int], cols: Sequence[int], title: str,
                  marked: tuple[int, int] | None = None) -> np.ndarray:
    """An mIoU grid (rows N0 × columns α, values 0–1, NaN missing) as an RGB image: each cell coloured on
    viridis between the grid's lowest and highest value and labelled in %, the ``marked`` cell outlined. OpenCV
    only; :func:`sweep_cell_at` maps a click on it back to a cell."""
    (cw, ch), (left, top) = SWEEP_CELL, SWEEP_MARGIN
    out = np.full((top + ch * len(rows) + 8, left + cw * len(cols) + 8, 3), 255, np.uint8)
    finite = grid[np.isfinite(grid)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.where(np.isfinite(grid), (grid - low) / max(high - low, 1e-12), 0)
    colours = cv2.applyColorMap(np.round(255 * scaled).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    cv2.putText(out, title, (4, 14), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(out, "N0 \\ a", (2, top - 6), _FONT, 0.33, (90, 90, 90), 1, cv2.LINE_AA)
    for j, alpha in enumerate(cols):
        cv2.putText(out, f"a={alpha}", (left + j * cw + 14, top - 6), _FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    for i, n0 in enumerate(rows):
        y = top + i * ch
        cv2.putText(out, str(n0), (12, y + ch - 8), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(len(cols)):
            x = left + j * cw
            value = grid[i, j]
            colour = tuple(int(c) for c in colours[i, j]) if np.isfinite(value) else (220, 220, 220)
            cv2.rectangle(out, (x, y), (x + cw - 2, y + ch - 2), colour, -1)
            text = "-" if not np.isfinite(value) else f"{100 * value:.1f}"
            ink = (0, 0, 0) if np.isfinite(value) and scaled[i, j] > 0.6 else (255, 255, 255)
            cv2.putText(out, text, (x + 12, y + ch - 9), _FONT, 0.4, ink, 1, cv2.LINE_AA)
    if marked is not None:
        x, y = left + marked[1] * cw, top + marked[0] * ch
        cv2.rectangle(out, (x - 1, y - 1), (x + cw - 1, y + ch - 1), (230, 30, 30), 2)
    return out


def best_cell(grid: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of a grid's highest value (the first of equals, NaN ignored); None if it has none."""
    return np.unravel_index(np.nanargmax(grid), grid.shape) if np.isfinite(grid).any() else None


def sweep_cell_at(x: float, y: float, shape: tuple[int, int]) -> tuple[int, int] | None:
    """(row, column) of the :func:`sweep_heatmap` cell under pixel (x, y) of a grid of ``shape``, or None."""
    (cw, ch), (left, top) = SWEEP_CELL, SWEEP_MARGIN
    row, col = math.floor((y - top) / ch), math.floor((x - left) / cw)
    return (row, col) if 0 <= row < shape[0] and 0 <= col < shape[1] else None


def save_training_plot(rows: list[dict], path: Path) -> None:
    """Losses, the fraction of candidate layers RFM kept, and validation mIoU over training (matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    steps = [r["step"] for r in rows]
    ax = fig.add_subplot(1, 3, 1)
    for key in ("loss", "seg", "aff"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_title("losses")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    ax.plot(steps, [r["kept_fraction"] for r in rows], color="tab:green")
    switch = next((r["step"] for r in rows if r["rfm"]), None)
    if switch is not None:
        ax.axvline(switch, color="0.5", linestyle="--", label="RFM on")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_title("fraction of layers RFM keeps")
    ax = fig.add_subplot(1, 3, 3)
    evals = [r for r in rows if any(k.startswith("miou_") for k in r)]
    for key in STAGES:
        if evals and f"miou_{key}" in evals[0]:
            ax.plot([r["step"] for r in evals], [r[f"miou_{key}"] for r in evals], marker="o", label=key)
    ax.set_title("validation mIoU of pseudo labels" if evals else "validation: off (--eval-every)")
    if evals:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), overwrite=True)


def save_confusion_png(report: EvalReport, path: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix (each gt row sums to 1) as a PNG, atomically, replacing ``path``.

    Only classes present in the ground truth or the prediction are drawn; an 'ignore' column is
    added when labelled pixels were predicted as ignore.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conf = np.asarray(report.confusion, dtype=np.float64)
    c = report.num_classes
    shown = np.flatnonzero((conf.sum(axis=1) > 0) | (conf[:, :c].sum(axis=0) > 0))
    has_ignore = conf.shape[1] > c and conf[:, c].sum() > 0
    cols = list(shown) + ([c] if has_ignore else [])
    sub = conf[np.ix_(shown, cols)]
    rows = conf[shown].sum(axis=1, keepdims=True)
    norm = np.divide(sub, rows, out=np.full(sub.shape, np.nan), where=rows > 0)
    row_names = [report.class_names[i] for i in shown]
    col_names = row_names + (["ignore"] if has_ignore else [])

    n = max(len(row_names), 1)
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(shown):
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of gt row")
        ax.set_xticks(range(len(col_names)), col_names, rotation=90)
        ax.set_yticks(range(len(row_names)), row_names)
        if len(shown) <= 25:
            for (i, j), v in np.ndenumerate(norm):
                if np.isfinite(v) and v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 else "black")
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
    else:
        ax.text(0.5, 0.5, "no labelled pixels", ha="center", va="center")
        ax.set_axis_off()
    p = f", bg p={report.bg_power}" if report.bg_power is not None else ""
    ax.set_title(f"mIoU {percent(report.miou)}%  ({report.num_images} images{p}; rows in % of gt pixels)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data), overwrite=True)


def save_sweep_heatmap(grid: np.ndarray, rows: Sequence[int], cols: Sequence[int], title: str,
                       path: str | os.PathLike) -> Path:
    """:func:`sweep_heatmap` with its best cell outlined, as a PNG replacing ``path``."""
    return _save_rgb_png(Path(path), sweep_heatmap(grid, rows, cols, title, best_cell(grid)), overwrite=True)
