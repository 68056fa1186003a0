"""Overlays and figures for CAM refinement results.

The overlay functions are the interactive path: numpy/OpenCV only, called on every
slider move. Matplotlib is imported lazily by the figure functions alone, and they
build a bare :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot global
state), so figures can be made from several threads.

Results are duck-typed: any object with ``class_names``, ``class_indices``,
``cam_initial``, ``cam_static``, ``cam_rfm`` (or None), ``label``, ``layer_scores``,
``layer_keep``, ``layer_threshold`` and ``params`` (``alpha``, ``n0``, ``distance``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
from PIL import Image

from .export import atomic_write, voc_palette

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
_STAGES = ("initial", "static", "rfm")
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
    rfm = None if result.cam_rfm is None else overlay_cam(image, result.cam_rfm[row])
    class_label = np.where(result.label == value, value, 0)
    return [
        (f"{name}: initial", overlay_cam(image, result.cam_initial[row])),
        (f"{name}: static", overlay_cam(image, result.cam_static[row])),
        (f"{name}: RFM", rfm),
        (f"{name}: pseudo label", overlay_label(image, class_label)),
    ]


def _plot_layer_scores(ax: Any, result: Any) -> None:
    """Bar chart of S^l per layer (1-indexed) with the selection threshold and G^l colours."""
    from matplotlib.patches import Patch

    scores = np.asarray(result.layer_scores, dtype=float)
    keep = np.asarray(result.layer_keep, dtype=bool)
    layers = np.arange(1, scores.size + 1)
    active = np.isfinite(scores)
    params = result.params
    ax.set_title(f"RFM layer selection (distance={params.distance}, α={params.alpha}, N0={params.n0})",
                 fontsize=10)
    ax.set_xlabel("layer l")
    ax.set_ylabel("$S^l$")
    ax.set_xticks(layers)
    ax.set_xlim(0.5, scores.size + 0.5)
    handles = []
    for layer in layers[~active]:
        ax.axvspan(layer - 0.5, layer + 0.5, color=_INACTIVE_COLOUR, zorder=0)
    if (~active).any():
        handles.append(Patch(color=_INACTIVE_COLOUR, label="outside $N_0$..$N$"))
    for mask, colour, text in ((active & keep, _KEPT_COLOUR, "kept ($G^l = 1$)"),
                               (active & ~keep, _REJECTED_COLOUR, "rejected ($G^l = 0$)")):
        if mask.any():
            handles.append(ax.bar(layers[mask], scores[mask], color=colour, label=text))
    if np.isfinite(result.layer_threshold):
        handles.append(ax.axhline(result.layer_threshold, color="k", linestyle="--",
                                  label=f"threshold = {result.layer_threshold:.4g}"))
    if not active.any():
        ax.text(0.5, 0.5, "no layer scores", ha="center", va="center", transform=ax.transAxes)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")


def save_figure(fig: Figure, path: str | os.PathLike, overwrite: bool = False, dpi: int = 100) -> Path:
    """Save a figure as PNG through :func:`rfm.export.atomic_write`."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), overwrite)


def save_overlays(
    image: np.ndarray, result: Any, out_dir: str | os.PathLike, overwrite: bool = False
) -> list[Path]:
    """Write ``<stage>_<class>.png`` CAM overlays (initial/static/rfm) and ``label_overlay.png``.

    RFM overlays are skipped when ``result.cam_rfm`` is None. Every target is checked
    before anything is written, so an existing file (without ``overwrite``) changes nothing.
    """
    out_dir = Path(out_dir)
    names = _file_names(result.class_names)
    jobs = []
    for stage in _STAGES:
        cams = getattr(result, f"cam_{stage}")
        if cams is not None:
            jobs += [(out_dir / f"{stage}_{name}.png", lambda c=cam: overlay_cam(image, c))
                     for name, cam in zip(names, cams)]
    jobs.append((out_dir / "label_overlay.png", lambda: overlay_label(image, result.label)))
    if not overwrite:
        existing = [str(path) for path, _ in jobs if path.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s); pass overwrite=True to replace")
    return [_save_rgb_png(path, render(), overwrite) for path, render in jobs]


def _file_names(class_names: Sequence[str]) -> list[str]:
    """File-name-safe, unique versions of the class names ("traffic light" → "traffic_light")."""
    names = []
    for position, class_name in enumerate(class_names):
        name = re.sub(r"[^A-Za-z0-9-]+", "_", str(class_name)).strip("_") or f"class{position}"
        names.append(f"{name}_{position}" if name in names else name)
    return names


def _save_rgb_png(path: Path, rgb: np.ndarray, overwrite: bool) -> Path:
    return atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format="PNG"), overwrite)
