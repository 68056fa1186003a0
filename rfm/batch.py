"""Dataset export: the Predictor over many images, resumable, atomic, sharded across torchrun ranks.

Layout of ``out/``:
  SegmentationClass/<stem>.png   VOC palette pseudo labels
  cams/<stem>.npy                CLIP-ES-style CAMs of one stage
  figures/<stem>.png             side-by-side figures of the first N images
  coco.json                      COCO RLE annotations of every finished image (merged by rank 0)
  manifest.json                  the parameters the outputs were made with
  manifest.d/rank-<r>.jsonl      one line per finished image: its outputs and their SHA-256
  summary.json                   done / skipped / failed with reasons
  .rfm-export.lock               held by the running export (PID and host inside)

An image counts as finished only when its journal line is intact (the line carries the SHA-256 of its
own record) and every output it lists still has the recorded hash, so a run killed at any point, or
stopped by a full disk, resumes where it stopped and rewrites whatever it had not committed.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checks
from .constants import CAM_STAGES
from .data import ImageFile, Sample, read_image
from .export import Rows, coco_document, label_to_coco, save_cams_npy, save_coco_json, save_label_png
from .fileio import file_sha256, remove_temporaries, save_json
from .params import RefineParams
from .predictor import Predictor

FORMATS = ("png", "npy", "coco")
MANIFEST = "manifest.json"
JOURNALS = "manifest.d"
LOCK = ".rfm-export.lock"
_DIGEST_HEAD = b'{"sha256":"'


class ParameterMismatch(ValueError):
    """The output folder holds results made with other parameters."""


class OutputInUse(ValueError):
    """Another live export writes to the same output folder."""


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


def journal_line(record: dict) -> bytes:
    """One journal line: the record as compact JSON led by a "sha256" member, the SHA-256 of the record's own
    JSON, so a reader tells a whole line from a torn or altered one and the line is still plain JSON."""
    payload = json.dumps(record, separators=(",", ":")).encode()
    return _DIGEST_HEAD + hashlib.sha256(payload).hexdigest().encode() + b'",' + payload[1:] + b"\n"


def parse_journal_line(line: bytes) -> dict | None:
    """The record of a journal line (without its newline), or None if the line is torn or altered."""
    head, _, rest = line.partition(b'",')
    payload = b"{" + rest
    if head != _DIGEST_HEAD + hashlib.sha256(payload).hexdigest().encode():
        return None
    return json.loads(payload)


def read_journals(out: Path) -> dict[str, dict]:
    """{stem: record} of every intact journal line (a line cut by a kill or a full disk is ignored)."""
    records: dict[str, dict] = {}
    for journal in sorted((out / JOURNALS).glob("*.jsonl")):
        for record in filter(None, map(parse_journal_line, journal.read_bytes().split(b"\n"))):
            records[record["stem"]] = record
    return records


def is_finished(out: Path, record: dict | None) -> bool:
    return record is not None and all(
        (out / rel).is_file() and file_sha256(out / rel) == digest for rel, digest in record["outputs"].items())


class _Journal:
    """One rank's append-only journal; each commit is one durable line, or nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o666)
        # A kill mid-append leaves a torn last line; the next append would extend it and be lost with it.
        os.ftruncate(self._fd, path.read_bytes().rfind(b"\n") + 1)

    def commit(self, record: dict) -> None:
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            _write_all(self._fd, journal_line(record))
            os.fsync(self._fd)
        except OSError:  # a full disk: take the partial line back rather than leave it for the next append
            with suppress(OSError):
                os.ftruncate(self._fd, end)
            raise

    def close(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked
        view = view[os.write(fd, view):]


@contextmanager
def _output_lock(out: Path):
    """Hold ``out/.rfm-export.lock`` while exporting; refuse if another live export holds it.

    An flock: the kernel releases it when its holder dies, even by kill -9, so the lock of a dead run is
    simply taken over. The file says who holds it (PID and host), for the refusal's message.
    """
    import fcntl  # POSIX only

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process still starting"
            raise OutputInUse(f"{out} is being written by another rfm export ({holder}); wait for it to end or "
                              f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _claim_output(out: Path, identity: dict, overwrite: bool, dist: Distributed, held: ExitStack) -> None:
    """Rank 0 locks ``out`` (for as long as ``held``), deletes what killed writers left and checks the
    parameters; every rank raises rank 0's refusal. The ranks of one run never refuse each other."""
    error = None
    if dist.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(_output_lock(out))
            remove_temporaries(out)
            prepare_output(out, identity, overwrite)
        except (ValueError, OSError) as err:
            error = err
    error = dist.from_rank0(error)
    if error:
        raise error


# ---------------------------------------------------------------- image loading in workers


class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers while the model runs; failures travel as messages. JPEGs are
    decoded reduced to about ``max_side`` (read_image), so a worker holds no full-size copy of a huge photo."""

    def __init__(self, samples: list[tuple[int, Sample]], max_side: int):
        self.samples = samples
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        index, sample = self.samples[i]
        try:
            return index, sample, read_image(sample.image, self.max_side), None
        except Exception as err:  # any decoding failure is reported per image, never fatal
            return index, sample, None, str(err)


def _as_is(item):
    return item


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: end this decoding worker as soon as the export process ``parent`` dies,
    even by kill -9, rather than leave it running orphaned."""
    if sys.platform.startswith("linux"):
        # SIGKILL from the kernel when the thread that started us exits; it iterates the loader until the
        # workers are shut down, so it outlives them in a normal run. 1 = PR_SET_PDEATHSIG.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """Exit once the parent is gone: the way elsewhere than Linux, and if it died before prctl took effect."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# ---------------------------------------------------------------- the export


def export_dataset(samples: list[Sample], predictor: Predictor, params: RefineParams, out: str | os.PathLike,
                   options: ExportOptions, identity: dict, dist: Distributed | None = None) -> dict:
    """Run the pipeline over ``samples`` (this rank's share) and write the chosen outputs; returns the run's
    summary, all ranks combined, on every rank (done + skipped == 0: no image has outputs)."""
    dist = dist or Distributed(device=predictor.device)
    out = Path(out)
    if options.cam_stage == "rfm" and predictor.decoder is None and "npy" in options.formats:
        raise ValueError("--cam-stage rfm needs a decoder (--decoder PATH); or choose static / initial")
    with ExitStack() as held:
        _claim_output(out, identity, options.overwrite, dist, held)
        return _export_shard(samples, predictor, params, out, options, dist)


def _export_shard(samples: list[Sample], predictor: Predictor, params: RefineParams, out: Path,
                  options: ExportOptions, dist: Distributed) -> dict:
    """This rank's unfinished images, then (rank 0) the merged outputs; the run's summary on every rank."""
    started = time.perf_counter()
    shard = [(i, s) for i, s in enumerate(samples) if i % dist.world == dist.rank]
    finished = read_journals(out)
    todo = [(i, s) for i, s in shard if not is_finished(out, finished.get(s.stem))]
    summary = {"done": 0, "skipped": len(shard) - len(todo), "failed": []}
    journal = _Journal(out / JOURNALS / f"rank-{dist.rank}.jsonl")
    loader = torch.utils.data.DataLoader(_Images(todo, predictor.max_side), batch_size=None, shuffle=False,
                                         num_workers=options.workers if len(todo) > 1 else 0, collate_fn=_as_is,
                                         worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
    bar = tqdm(total=len(todo), unit="img", disable=dist.rank != 0 or not todo, dynamic_ncols=True,
               desc="export" if dist.world == 1 else f"export (rank 0 of {dist.world})")
    try:
        for index, sample, file, error in loader:
            reason = error or (None if sample.labels else "no image-level labels")
            if reason is None:
                try:
                    journal.commit(_export_one(index, sample, file, predictor, params, out, options))
                    summary["done"] += 1
                except (ValueError, RuntimeError) as err:
                    reason = str(err)
                except OSError as err:  # e.g. a full disk: this image fails, its journal line is not written
                    reason = f"{err.filename or out}: {err.strerror or err}"
            if reason:
                summary["failed"].append({"stem": sample.stem, "reason": reason})
                bar.write(f"failed {sample.stem}: {reason}")
            bar.update()
    finally:
        bar.close()
        journal.close()

    summary = _combine(len(samples), dist.gather(summary), time.perf_counter() - started, dist.world)
    dist.barrier()
    if dist.rank == 0:
        if "coco" in options.formats:
            _save_coco(out, samples, predictor)
        save_json(summary, out / "summary.json", overwrite=True)
    return summary


def _export_one(index: int, sample: Sample, file: ImageFile, predictor: Predictor, params: RefineParams,
                out: Path, options: ExportOptions) -> dict:
    """Refine one image and write its outputs; its journal record (outputs and their SHA-256).

    Image-size outputs are made strip by strip (``Result.label_rows``/``cam_rows``); only COCO needs the
    whole label, as uint8 (its RLE runs down columns). The figure is drawn at the work resolution.
    """
    predictor.set_image(file.rgb, labels=list(sample.labels), image_size=file.size)
    result = predictor.refine(params)
    written: list[Path] = []
    record: dict = {"stem": sample.stem, "outputs": {}}
    label = result.label_rows(options.confidence)
    if "coco" in options.formats:
        label = Rows.of(label.whole())  # COCO needs the whole label anyway: make it once for both writers
    if "png" in options.formats:
        written.append(save_label_png(label, out / "SegmentationClass" / f"{sample.stem}.png", overwrite=True))
    if "npy" in options.formats:
        written.append(save_cams_npy(out / "cams" / f"{sample.stem}.npy", result.class_indices,
                                     result.cam_rows(options.cam_stage), overwrite=True))
    if "coco" in options.formats:
        category_ids = [predictor.vocabulary.category_ids[i] for i in result.class_indices]
        image_id = sample.image_id if sample.image_id is not None else index + 1
        h, w = result.image_size
        record["coco"] = {
            "image": {"id": image_id, "file_name": sample.image.name, "height": h, "width": w},
            "annotations": label_to_coco(label.whole(), result.class_indices, category_ids, image_id=image_id)}
    if index < options.figures:
        from .viz import save_figure, side_by_side_figure

        work = predictor.features.work_image
        written.append(save_figure(side_by_side_figure(work, result.resized(work.shape[:2])),
                                   out / "figures" / f"{sample.stem}.png", overwrite=True))
    record["outputs"] = {str(p.relative_to(out)): file_sha256(p) for p in written}
    return record


def _save_coco(out: Path, samples: list[Sample], predictor: Predictor) -> None:
    """Rank 0: the COCO file of every finished image, in dataset order."""
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


def _combine(images: int, summaries: list[dict], seconds: float, world: int) -> dict:
    """The run's summary from every rank's counts; done + skipped == 0 means no image has outputs."""
    done = sum(s["done"] for s in summaries)
    return {
        "images": images, "done": done, "skipped": sum(s["skipped"] for s in summaries),
        "failed": [f for s in summaries for f in s["failed"]], "ranks": world,
        "seconds": round(seconds, 3), "images_per_second": round(done / seconds, 3) if seconds > 0 else None,
    }


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
