"""Every parameter of the refinement and of decoder training, as plain data (no torch import).

Defaults are the official VOC settings (REFERENCE §2, §3, §4); ``official_params`` gives COCO's.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import checks
from .constants import DISTANCES, MAX_ALPHA

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RefineParams:
    """Every knob of stages 4–6. Integer fields accept integer-valued floats (slider values) and store ints."""

    alpha: int = 2  # matrix power of the transition matrix
    n0: int = 7  # first RFM candidate block, 1-indexed (last 6 of 12)
    static_layers: int = 8  # CLIP-ES averages the last 8 blocks
    box_threshold: float = 0.4  # λ of the box mask indicator (0.7 for COCO)
    distance: str = "abs"  # "abs": paper Eq. 5; "signed": official code
    boxes: Mapping[str, Sequence[Box]] = field(default_factory=dict)  # user boxes per class, image pixels
    bg_power: float = 1.0  # background score (1 − max CAM)^p before PAR
    par_iterations: int = 20  # 0 turns PAR off

    def __post_init__(self):
        object.__setattr__(self, "alpha", checks.integer(
            "alpha", self.alpha, 1, MAX_ALPHA, why="α is a matrix power: 1 is one propagation step; by 64 the walk "
            "has long mixed to its stationary blur, and near α ≈ 54 000 float32 underflows to NaN"))
        ints = {
                "n0": (1, "N0 is the first block RFM may select, counted from 1"),
                "static_layers": (1, "the static refinement averages at least one block"),
                "par_iterations": (0, "0 turns PAR off")}
        for name, (minimum, why) in ints.items():
            object.__setattr__(self, name, checks.integer(name, getattr(self, name), minimum, why=why))
        object.__setattr__(self, "box_threshold", checks.fraction("box_threshold", self.box_threshold))
        checks.choice("distance", self.distance, DISTANCES, "'abs': the paper, 'signed': the official code")
        object.__setattr__(self, "bg_power", checks.positive("bg_power", self.bg_power))
        if not isinstance(self.boxes, Mapping):
            raise ValueError("boxes must map a class name to a list of (x0, y0, x1, y1) boxes")
        for name, boxes in self.boxes.items():
            if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
                raise ValueError(f"boxes for {name!r} must be a list of (x0, y0, x1, y1) boxes, got {boxes!r}")
            for box in boxes:
                if isinstance(box, (str, bytes)) or not isinstance(box, Sequence):
                    raise ValueError(f"box {box!r} for {name!r} must be four numbers (x0, y0, x1, y1)")
                if len(box) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
                    raise ValueError(f"box {box!r} for {name!r} must be four numbers (x0, y0, x1, y1)")
                if not (box[0] < box[2] and box[1] < box[3]):
                    raise ValueError(f"box {tuple(box)} for {name!r} has zero area: need x0 < x1 and y0 < y1")

    def check_blocks(self, num_blocks: int) -> None:
        """N0 and static_layers must name blocks of a CLIP with ``num_blocks`` blocks."""
        for name in ("n0", "static_layers"):
            if getattr(self, name) > num_blocks:
                raise ValueError(f"{name}={getattr(self, name)} but this CLIP has {num_blocks} blocks "
                                 f"(allowed 1..{num_blocks})")


def official_params(vocabulary: str = "voc", **overrides) -> RefineParams:
    """RefineParams with the official settings of a dataset: COCO uses λ = 0.7 (CLIP-ES) and the last
    10 blocks (N0 = 3, WeCLIP); VOC and user vocabularies use the VOC settings (λ = 0.4, N0 = 7)."""
    base = {"box_threshold": 0.7, "n0": 3} if vocabulary == "coco" else {}
    return RefineParams(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class TrainConfig:
    """Decoder training (REFERENCE §4.3). Defaults: the official recipe, but 4 images per batch."""

    steps: int
    batch_size: int = 4
    crop: int = 320
    lr: float = 2e-3  # decoder: base 2e-4 × 10
    weight_decay: float = 0.01
    warmup_steps: int = 50
    switch_step: int | None = None  # RFM replaces the static refinement after this step; None = steps // 2
    scale_range: tuple[float, float] = (0.5, 2.0)
    save_every: int = 2000
    eval_every: int = 0
    seed: int = 0
    cache_features: bool = False
    cache_side: int = 512  # long side of the cached scale (the inference scale)
    embed_dim: int = 256
    decoder_layers: int = 3
    aff_radius: int = 8

    def __post_init__(self):
        for name in ("steps", "batch_size", "crop", "save_every", "cache_side", "embed_dim", "decoder_layers",
                     "aff_radius"):
            setattr(self, name, checks.integer(name, getattr(self, name), 1))
        for name in ("warmup_steps", "eval_every", "seed"):
            setattr(self, name, checks.integer(name, getattr(self, name), 0))
        self.lr = checks.positive("lr", self.lr)
        if self.switch_step is None:
            self.switch_step = self.steps // 2
        self.switch_step = checks.integer("switch_step", self.switch_step, 0)
        self.scale_range = tuple(self.scale_range)
