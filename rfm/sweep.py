"""Dataset-wide parameter sweeps: every setting scored per stage from one CLIP pass per image.

For each image, ``Predictor.set_image`` runs once; every setting is then ``refine`` (matrix work)
and, per stage, a confusion matrix against the ground truth is added to the setting's total. The
stages are scored exactly as ``rfm export`` + ``rfm eval`` would score them: a CAM stage as the
float16 CAMs of ``cams/<stem>.npy`` with background (1 − max CAM)^p at the setting's p, the
``label`` stage as the pseudo label PNG.

Layout of ``out/``:
  sweep.d/rank-<r>.npz   this rank's finished stems and their summed confusion matrices, replaced
                         atomically after every image (a killed sweep resumes from it)
  sweep.csv, sweep.json  one row per setting × stage: the parameters, mIoU, per-class IoU
  heatmap_<stage>.png    mIoU over N0 × α (best over the other swept parameters)
"""
from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .constants import STAGES
from .data import Sample, read_image
from .fileio import atomic_write, save_csv, save_json
from .metrics import confusion_matrix, iou_per_class, labels_from_cams, mean_iou, read_label_png
from .params import RefineParams

SWEPT = ("alpha", "n0", "box_threshold", "static_layers", "distance", "bg_power", "par_iterations")
_KINDS = {"alpha": int, "n0": int, "static_layers": int, "par_iterations": int, "box_threshold": float,
          "bg_power": float, "distance": str}
STATE = "sweep.d"


def parse_values(name: str, text: str) -> tuple:
    """'1,2,3' → (1, 2, 3); for integer parameters 'a:b' is a..b inclusive; 'abs,signed' for distance."""
    kind = _KINDS[name]
    values: list = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if ":" in part and kind is int:
                lo, hi = (int(v) for v in part.split(":"))
                if hi < lo:
                    raise ValueError
                values += range(lo, hi + 1)
            else:
                values.append(kind(part))
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')} {text!r}: expected values like "
                             f"{'1,2,3 or 5:9' if kind is int else '0.3,0.4' if kind is float else 'abs,signed'}") \
                from None
    if not values:
        raise ValueError(f"--{name.replace('_', '-')} {text!r}: no values")
    return tuple(dict.fromkeys(values))


def settings_grid(values: dict[str, Sequence], defaults: RefineParams) -> list[dict]:
    """The Cartesian product of the swept values, every other parameter at ``defaults``; each setting is
    checked (a RefineParams) before any image is read."""
    axes = [values.get(name, (getattr(defaults, name),)) for name in SWEPT]
    settings = [dict(zip(SWEPT, combo)) for combo in itertools.product(*axes)]
    for s in settings:
        RefineParams(**s)
    return settings


def read_grid(path: str | os.PathLike, defaults: RefineParams) -> list[dict]:
    """Settings listed in a JSON file: [{"alpha": 2, "n0": 7}, …]; missing parameters take ``defaults``."""
    from .data import read_json

    data = read_json(path)
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path}: expected a non-empty list of settings like [{{\"alpha\": 2, \"n0\": 7}}]")
    settings = []
    for n, entry in enumerate(data):
        unknown = sorted(set(entry) - set(SWEPT))
        if unknown:
            raise ValueError(f"{path} item {n}: unknown parameter(s) {unknown}; known: {', '.join(SWEPT)}")
        setting = {name: entry.get(name, getattr(defaults, name)) for name in SWEPT}
        try:
            RefineParams(**setting)
        except ValueError as err:
            raise ValueError(f"{path} item {n}: {err}") from None
        settings.append(setting)
    return settings


def stage_label(result, stage: str, bg_power: float) -> np.ndarray:
    """(H, W) label of one stage as export + eval make it: a CAM stage through its float16 .npy CAMs and
    background (1 − max CAM)^p; 'label' is the pseudo label itself."""
    if stage == "label":
        return result.label
    return labels_from_cams(result.cam(stage).astype(np.float16), np.asarray(result.class_indices), bg_power)


def image_confusions(predictor, settings: list[dict], gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(P, S, C, C + 1) confusion matrices of one image (already set on ``predictor``) for every setting
    and stage; a stage the predictor cannot make (RFM without a decoder) stays zero."""
    conf = np.zeros((len(settings), len(STAGES), num_classes, num_classes + 1), np.int64)
    initial_done: dict[float, np.ndarray] = {}  # the initial CAM depends on no setting but p
    shared: dict = {}  # transition matrices of this image, shared by the settings that agree on them
    for i, setting in enumerate(settings):
        result = predictor.refine(RefineParams(**setting), shared)
        for j, stage in enumerate(STAGES):
            if stage == "rfm" and result.patch.cam_rfm is None:
                continue
            if stage == "initial" and setting["bg_power"] in initial_done:
                conf[i, j] = initial_done[setting["bg_power"]]
                continue
            conf[i, j] = confusion_matrix(stage_label(result, stage, setting["bg_power"]), gt, num_classes)
            if stage == "initial":
                initial_done[setting["bg_power"]] = conf[i, j]
    return conf


class SweepState:
    """One rank's progress: the stems done and the sum of their confusion matrices, saved as one file."""

    def __init__(self, path: Path, identity: str, shape: tuple[int, ...]):
        self.path, self.identity = path, identity
        self.stems: list[str] = []
        self.total = np.zeros(shape, np.int64)
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["identity"]) != identity:
                    raise ValueError(f"{path.parent.parent} holds a sweep of other settings, data or models; "
                                     f"choose another --out or pass --overwrite")
                self.stems, self.total = [str(s) for s in saved["stems"]], saved["total"].astype(np.int64)

    def add(self, stem: str, conf: np.ndarray) -> None:
        self.stems.append(stem)
        self.total += conf
        buf = io.BytesIO()
        # compressed: (P, 4, C, C + 1) matrices are mostly zeros (81 COCO classes × 60 settings: 12 MB raw)
        np.savez_compressed(buf, identity=np.array(self.identity), stems=np.array(self.stems, dtype=str), total=self.total)
        atomic_write(self.path, lambda f: f.write(buf.getvalue()), overwrite=True)


def run_sweep(samples: list[Sample], predictor, settings: list[dict], out: str | os.PathLike, num_classes: int,
              identity: str, dist=None, overwrite: bool = False, progress: bool = True) -> np.ndarray:
    """Score every setting over ``samples`` (this rank's share under torchrun); returns the (P, S, C, C + 1)
    totals of the whole run on every rank. Resumes from ``out/sweep.d``."""
    from .batch import Distributed

    dist = dist or Distributed(device=predictor.device)
    out = Path(out)
    shape = (len(settings), len(STAGES), num_classes, num_classes + 1)
    state_dir = out / STATE
    if dist.rank == 0:
        state_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in state_dir.glob("rank-*.npz"):
                old.unlink()
    dist.barrier()
    state = SweepState(state_dir / f"rank-{dist.rank}.npz", identity, shape)
    done = set(state.stems)
    shard = [s for i, s in enumerate(samples) if i % dist.world == dist.rank and s.stem not in done]
    missing_gt = [s.stem for s in shard if s.gt is None]
    if missing_gt:
        raise ValueError(f"{len(missing_gt)} image(s) have no ground-truth mask to score against: "
                         f"{', '.join(missing_gt[:5])}")
    bar = tqdm(total=len(shard), unit="img", disable=not progress or dist.rank != 0 or not shard, dynamic_ncols=True,
               desc="sweep" if dist.world == 1 else f"sweep (rank 0 of {dist.world})")
    started = time.perf_counter()
    for n, sample in enumerate(shard, 1):
        file = read_image(sample.image, predictor.max_side)
        predictor.set_image(file.rgb, labels=list(sample.labels), image_size=file.size)
        gt = read_label_png(sample.gt)
        if gt.shape != tuple(file.size):
            raise ValueError(f"{sample.gt}: ground truth {gt.shape} does not match the image's {tuple(file.size)}")
        state.add(sample.stem, image_confusions(predictor, settings, gt, num_classes))
        seconds = time.perf_counter() - started
        bar.set_postfix(settings_per_s=f"{n * len(settings) / seconds:.1f}")
        bar.update()
    bar.close()
    totals = np.sum(dist.gather(state.total), axis=0)
    dist.barrier()
    return totals


def sweep_rows(settings: list[dict], totals: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per setting × stage: the parameters, the stage, mIoU (0–1) and the IoU of every class."""
    rows = []
    for setting, per_stage in zip(settings, totals):
        for stage, conf in zip(STAGES, per_stage):
            if not conf.any():
                continue  # a stage that was not made (RFM without a decoder)
            iou = iou_per_class(conf)
            rows.append({**setting, "stage": stage, "miou": mean_iou(conf),
                         **{f"iou_{name}": float(v) for name, v in zip(class_names, iou)}})
    return rows


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """The row of the highest mIoU per stage (the first of equals, in grid order)."""
    best: dict[str, dict] = {}
    for row in rows:
        if not np.isnan(row["miou"]) and (row["stage"] not in best or row["miou"] > best[row["stage"]]["miou"]):
            best[row["stage"]] = row
    return best


def table(rows: list[dict], stage: str, down: str = "n0", across: str = "alpha") -> tuple[list, list, np.ndarray]:
    """(down values, across values, mIoU grid) of one stage: the best over every other swept parameter."""
    mine = [r for r in rows if r["stage"] == stage]
    ys = sorted({r[down] for r in mine})
    xs = sorted({r[across] for r in mine})
    grid = np.full((len(ys), len(xs)), np.nan)
    for r in mine:
        y, x = ys.index(r[down]), xs.index(r[across])
        grid[y, x] = np.nanmax([grid[y, x], r["miou"]])
    return ys, xs, grid


def format_table(rows: list[dict], stage: str) -> str:
    ys, xs, grid = table(rows, stage)
    lines = [f"{stage}: mIoU % over N0 (rows) × α (columns)", "N0\\α " + " ".join(f"{x:>6}" for x in xs)]
    for y, values in zip(ys, grid):
        lines.append(f"{y:>4} " + " ".join(f"{100 * v:6.2f}" for v in values))
    return "\n".join(lines)


def export_command(setting: dict, stage: str, dataset_args: Sequence[str], model_args: Sequence[str]) -> str:
    """The `rfm export` command that writes what a setting scored at a stage: the pseudo labels, and the
    stage's CAMs in cams/*.npy."""
    flags = [f"--{name.replace('_', '-')} {setting[name]}" for name in SWEPT]
    cams = [f"--cam-stage {stage}"] if stage != "label" else []
    return " ".join(["rfm export", *dataset_args, *model_args, "--format png,npy", *cams, *flags, "--out OUT"])


def save_results(out: Path, rows: list[dict], best: dict[str, dict], commands: dict[str, str]) -> list[Path]:
    """sweep.csv, sweep.json and one N0 × α heatmap per stage."""
    from .viz import save_sweep_heatmap

    fields = [*SWEPT, "stage", "miou", *[k for k in rows[0] if k.startswith("iou_")]] if rows else []
    written = [save_csv(rows, fields, out / "sweep.csv", overwrite=True),
               save_json({"rows": rows, "best": best, "export_commands": commands}, out / "sweep.json",
                         overwrite=True)]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        ys, xs, grid = table(rows, stage)
        written.append(save_sweep_heatmap(grid, ys, xs, f"{stage}: mIoU (best over the other parameters)",
                                          out / f"heatmap_{stage}.png"))
    return written


def sweep_identity(settings: list[dict], samples: list[Sample], models: dict, num_classes: int) -> str:
    """What a resumed sweep must share with the run it continues."""
    return json.dumps({"settings": settings, "stems": [s.stem for s in samples], "models": models,
                       "num_classes": num_classes}, sort_keys=True)
