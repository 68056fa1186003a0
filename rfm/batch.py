"""Dataset export: the Predictor over many images, resumable, atomic, sharded across torchrun ranks.

Layout of ``out/``:
  SegmentationClass/<stem>.png   VOC palette pseudo labels
  cams/<stem>.npy                CLIP-ES-style CAMs of one stage
  figures/<stem>.png             side-by-side figures of the first N images
  coco.json                      COCO RLE annotations of every finished image (merged by rank 0)
  manifest.json                  the parameters the outputs were made with
  manifest.d/rank-<r>.jsonl      one line per finished image: its outputs and their SHA-256
  summary.json                   done / skipped / failed with reasons

An image counts as finished only when its journal line is complete and every output it lists still
has the recorded hash, so a run killed at any point resumes where it stopped and rewrites whatever
it had not committed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checks
from .constants import CAM_STAGES
from .data import Sample, load_image
from .export import coco_document, label_to_coco, save_cams_npy, save_coco_json, save_label_png
from .fileio import file_sha256, save_json
from .params import RefineParams
from .predictor import Predictor

FORMATS = ("png", "npy", "coco")
MANIFEST = "manifest.json"
JOURNALS = "manifest.d"


class ParameterMismatch(ValueError):
    """The output folder holds results made with other parameters."""


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("png",)
    cam_stage: str = "rfm"  # which CAM goes into cams/<stem>.npy
    confidence: float = 0.0  # pixels whose PAR share is below this become 255 (0: none)
    figures: int = 0  # side-by-side figures for the first N images of the dataset
    workers: int = 2  # image-decoding DataLoader workers
    overwrite: bool = False  # replace the results of a run with other parameters

    def __post_init__(self):
        unknown = set(self.formats) - set(FORMATS)
        if not self.formats or unknown:
            raise ValueError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got {self.formats}")
        checks.choice("cam stage", self.cam_stage, CAM_STAGES)
        self.confidence = checks.unit_interval("confidence", self.confidence)


@dataclass
class Distributed:
    """This process's place among torchrun's ranks (one rank without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def from_rank0(self, value):
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


def init_distributed(device=None) -> Distributed:
    """Join torchrun's process group when launched by it: NCCL with one GPU per local rank, else Gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        from .backbone import pick_device

        return Distributed(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, world=world,
                       device=torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


# ---------------------------------------------------------------- manifest and journals


def prepare_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Record the parameters in manifest.json; refuse a folder made with others unless overwriting."""
    manifest = out / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text()).get("parameters")
        if previous == identity:
            if not overwrite:
                return
        elif not overwrite:
            before, now = _flatten(previous or {}), _flatten(identity)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ParameterMismatch(f"{out} holds results made with other parameters ({', '.join(changed)} "
                                    f"differ); pass --overwrite to replace them, or choose another --out")
    journals = out / JOURNALS
    if journals.is_dir():
        for journal in journals.glob("*.jsonl"):
            journal.unlink()
    save_json({"version": 1, "parameters": identity}, manifest, overwrite=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def read_journals(out: Path) -> dict[str, dict]:
    """{stem: record} of every complete journal line (a line cut by a kill is ignored)."""
    records: dict[str, dict] = {}
    for journal in sorted((out / JOURNALS).glob("*.jsonl")):
        for line in journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["stem"]] = record
    return records


def is_finished(out: Path, record: dict | None) -> bool:
    return record is not None and all(
        (out / rel).is_file() and file_sha256(out / rel) == digest for rel, digest in record["outputs"].items())


class _Journal:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def commit(self, record: dict) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- image loading in workers


class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers while the model runs; failures travel as messages."""

    def __init__(self, samples: list[tuple[int, Sample]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        index, sample = self.samples[i]
        try:
            return index, sample, load_image(sample.image), None
        except Exception as err:  # any decoding failure is reported per image, never fatal
            return index, sample, None, str(err)


def _as_is(item):
    return item


# ---------------------------------------------------------------- the export


def export_dataset(samples: list[Sample], predictor: Predictor, params: RefineParams, out: str | os.PathLike,
                   options: ExportOptions, identity: dict, dist: Distributed | None = None) -> dict:
    """Run the pipeline over ``samples`` (this rank's share) and write the chosen outputs; returns the summary."""
    dist = dist or Distributed(device=predictor.device)
    out = Path(out)
    if options.cam_stage == "rfm" and predictor.decoder is None and "npy" in options.formats:
        raise ValueError("--cam-stage rfm needs a decoder (--decoder PATH); or choose static / initial")
    error = None
    if dist.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            prepare_output(out, identity, options.overwrite)
        except (ParameterMismatch, OSError) as err:
            error = str(err)
    error = dist.from_rank0(error)
    if error:
        raise ParameterMismatch(error)

    started = time.perf_counter()
    shard = [(i, s) for i, s in enumerate(samples) if i % dist.world == dist.rank]
    finished = read_journals(out)
    todo = [(i, s) for i, s in shard if not is_finished(out, finished.get(s.stem))]
    summary = {"done": 0, "skipped": len(shard) - len(todo), "failed": []}
    journal = _Journal(out / JOURNALS / f"rank-{dist.rank}.jsonl")
    loader = torch.utils.data.DataLoader(_Images(todo), batch_size=None, shuffle=False,
                                         num_workers=options.workers if len(todo) > 1 else 0, collate_fn=_as_is)
    bar = tqdm(total=len(todo), unit="img", disable=dist.rank != 0 or not todo, dynamic_ncols=True,
               desc="export" if dist.world == 1 else f"export (rank 0 of {dist.world})")
    try:
        for index, sample, image, error in loader:
            reason = error or (None if sample.labels else "no image-level labels")
            if reason is None:
                try:
                    journal.commit(_export_one(index, sample, image, predictor, params, out, options))
                    summary["done"] += 1
                except (ValueError, RuntimeError) as err:
                    reason = str(err)
            if reason:
                summary["failed"].append({"stem": sample.stem, "reason": reason})
                bar.write(f"failed {sample.stem}: {reason}")
            bar.update()
    finally:
        bar.close()
        journal.close()

    summaries = dist.gather(summary)
    dist.barrier()
    if dist.rank == 0:
        return _merge(out, samples, options, summaries, time.perf_counter() - started, dist.world, predictor)
    return summary


def _export_one(index: int, sample: Sample, image: np.ndarray, predictor: Predictor, params: RefineParams,
                out: Path, options: ExportOptions) -> dict:
    predictor.set_image(image, labels=list(sample.labels))
    result = predictor.refine(params)
    written: list[Path] = []
    record: dict = {"stem": sample.stem, "outputs": {}}
    if "png" in options.formats or "coco" in options.formats:
        label = result.label_with_ignore(options.confidence)
    if "png" in options.formats:
        written.append(save_label_png(label, out / "SegmentationClass" / f"{sample.stem}.png", overwrite=True))
    if "npy" in options.formats:
        cams = result.cam(options.cam_stage)
        written.append(save_cams_npy(out / "cams" / f"{sample.stem}.npy", result.class_indices, cams,
                                     overwrite=True))
    if "coco" in options.formats:
        category_ids = [predictor.vocabulary.category_ids[i] for i in result.class_indices]
        image_id = sample.image_id if sample.image_id is not None else index + 1
        h, w = result.image_size
        record["coco"] = {
            "image": {"id": image_id, "file_name": sample.image.name, "height": h, "width": w},
            "annotations": label_to_coco(label, result.class_indices, category_ids, image_id=image_id)}
    if index < options.figures:
        from .viz import save_figure, side_by_side_figure

        written.append(save_figure(side_by_side_figure(image, result), out / "figures" / f"{sample.stem}.png",
                                   overwrite=True))
    record["outputs"] = {str(p.relative_to(out)): file_sha256(p) for p in written}
    return record


def _merge(out: Path, samples: list[Sample], options: ExportOptions, summaries: list[dict], seconds: float,
           world: int, predictor: Predictor) -> dict:
    """Rank 0: the COCO file of every finished image in dataset order, and the run's summary."""
    if "coco" in options.formats:
        records = read_journals(out)
        images, annotations = [], []
        for sample in samples:
            record = records.get(sample.stem)
            if record and "coco" in record:
                images.append(record["coco"]["image"])
                annotations += record["coco"]["annotations"]
        vocab = predictor.vocabulary
        categories = [{"id": cid, "name": name} for cid, name in zip(vocab.category_ids, vocab.class_names)]
        save_coco_json(coco_document(images, annotations, categories), out / "coco.json", overwrite=True)
    done = sum(s["done"] for s in summaries)
    summary = {
        "images": len(samples), "done": done, "skipped": sum(s["skipped"] for s in summaries),
        "failed": [f for s in summaries for f in s["failed"]], "ranks": world,
        "seconds": round(seconds, 3), "images_per_second": round(done / seconds, 3) if seconds > 0 else None,
    }
    save_json(summary, out / "summary.json", overwrite=True)
    return summary


def run_identity(params: RefineParams, options: ExportOptions, clip_file: Path, decoder_file: Path | None,
                 predictor: Predictor) -> dict:
    """Everything that determines the outputs' bytes; manifest.json stores it to refuse mixing runs."""
    vocab = predictor.vocabulary
    return {
        "refine": {k: v for k, v in asdict(params).items() if k != "boxes"},
        "clip_sha256": file_sha256(clip_file),
        "decoder_sha256": file_sha256(decoder_file) if decoder_file else None,
        "vocabulary": {"classes": list(vocab.class_names), "prompts": list(vocab.prompt_names),
                       "background": list(vocab.background), "template": vocab.template},
        "max_side": predictor.max_side, "formats": sorted(options.formats), "cam_stage": options.cam_stage,
        "confidence": options.confidence, "figures": options.figures,
    }
