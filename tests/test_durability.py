"""Durability under kill: an export or a training run stopped at every write boundary resumes to what an
uninterrupted run writes; a full disk loses no journal record; workers die with their parent; one export
per output folder.

A kill is injected, not timed: at the k-th commit step (every ``os.replace``/``os.link`` that puts a file in
place, every journal append) the output folder is copied as it is on disk at that instant — temporary files,
a half-written journal line — and the run is stopped. The copy is what a kill -9 at that point leaves behind
(the page cache survives a killed process), and the resume runs on it.
"""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rfm import batch
from rfm.cli import main
from rfm.data import voc_samples
from rfm.params import RefineParams, TrainConfig
from rfm.text import VOC
from rfm.train import CHECKPOINT, train

ROOT = Path(__file__).resolve().parents[1]
STEMS = ["2008_004430", "vainf_000", "vainf_001"]  # a JPEG and two PNGs: three images keep it short


class Killed(BaseException):
    """The injected kill: a BaseException, so no `except Exception` of the code under test swallows it."""


class KillAt:
    """Counts commit steps and, at step ``k``, copies ``out`` to ``crash`` and stops the run there."""

    def __init__(self, monkeypatch, out: Path, crash: Path, k: int):
        self.out, self.crash, self.k, self.count = out, crash, k, 0
        for name in ("replace", "link"):
            original = getattr(os, name)
            monkeypatch.setattr(os, name, lambda src, dst, *a, _o=original, **kw: self._commit(_o, src, dst, *a, **kw))
        original_write = batch._write_all
        monkeypatch.setattr(batch, "_write_all", lambda fd, data: self._append(original_write, fd, data))

    def _step(self) -> bool:
        self.count += 1
        return self.count == self.k

    def _snapshot(self) -> None:
        if self.out.exists():
            shutil.copytree(self.out, self.crash, symlinks=True)
        else:
            self.crash.mkdir()
        raise Killed

    def _commit(self, original, src, dst, *args, **kwargs):
        if self._step():
            self._snapshot()  # before the rename: the temporary file is there, the target is not yet
        return original(src, dst, *args, **kwargs)

    def _append(self, original, fd, data: bytes):
        if self._step():
            original(fd, data[: len(data) // 2])  # a torn line: half a record, no newline
            self._snapshot()
        return original(fd, data)


def _voc_subset(voc_mini, root: Path) -> Path:
    for folder in ("JPEGImages", "SegmentationClass"):
        (root / folder).mkdir(parents=True)
    for stem in STEMS:
        for image in (voc_mini / "JPEGImages").glob(f"{stem}.*"):
            shutil.copy(image, root / "JPEGImages")
        shutil.copy(voc_mini / "SegmentationClass" / f"{stem}.png", root / "SegmentationClass")
    return root


def _export_argv(voc: Path, weight_files: Path, out: Path) -> list[str]:
    return ["export", "--voc", str(voc), "--labels-from", "mask", "--format", "png,npy,coco", "--figures", "1",
            "--out", str(out), "--clip", str(weight_files / "clip.pt"), "--decoder",
            str(weight_files / "decoder.safetensors"), "--n0", "2", "--static-layers", "3", "--max-side", "128",
            "--par-iterations", "3", "--workers", "0"]


def _tree(out: Path) -> dict[str, bytes]:
    """Every output a user reads (not the run's bookkeeping, whose times differ between runs)."""
    skip = {"summary.json", batch.LOCK}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in skip and batch.JOURNALS not in p.parts}


def test_export_killed_at_every_write_boundary_resumes_to_the_uninterrupted_outputs(
        voc_mini, weight_files, tmp_path, monkeypatch, capsys):
    voc = _voc_subset(voc_mini, tmp_path / "voc")
    assert main(_export_argv(voc, weight_files, tmp_path / "reference")) == 0
    reference = _tree(tmp_path / "reference")
    assert len(json.loads(reference["coco.json"])["images"]) == 3

    k = 0
    while True:
        k += 1
        out, crash = tmp_path / f"run{k}", tmp_path / f"crash{k}"
        with monkeypatch.context() as patch:
            killer = KillAt(patch, out, crash, k)
            try:
                main(_export_argv(voc, weight_files, out))
            except Killed:
                pass
        if not crash.exists():  # the run had fewer than k commit steps: every boundary has been tried
            break
        capsys.readouterr()
        assert main(_export_argv(voc, weight_files, crash)) == 0, (k, capsys.readouterr().err)
        summary = json.loads((crash / "summary.json").read_text())
        assert summary["done"] + summary["skipped"] == 3 and not summary["failed"], (k, summary)
        assert _tree(crash) == reference, f"kill at commit step {k}"
        assert not list(crash.rglob(".*.tmp")), f"kill at commit step {k} left a temporary file"
        shutil.rmtree(out)
        shutil.rmtree(crash)
    assert killer.count >= 3 * 3 + 3  # png, npy and journal line per image; manifest, figure, coco, summary


def test_a_full_disk_during_a_journal_append_loses_no_record(voc_mini, weight_files, tmp_path, monkeypatch, capsys):
    voc = _voc_subset(voc_mini, tmp_path / "voc")
    assert main(_export_argv(voc, weight_files, tmp_path / "reference")) == 0
    out = tmp_path / "out"
    appends = {"n": 0}
    original = batch._write_all

    def full_disk_once(fd, data):
        appends["n"] += 1
        if appends["n"] == 2:  # the second image's line: half of it reaches the disk, then ENOSPC
            original(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / batch.JOURNALS / "rank-0.jsonl"))
        return original(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(batch, "_write_all", full_disk_once)
        assert main(_export_argv(voc, weight_files, out)) == 0
    printed = "".join(capsys.readouterr())
    assert f"failed {STEMS[1]}: " in printed and "No space left on device" in printed and "rank-0.jsonl" in printed
    first = json.loads((out / "summary.json").read_text())
    assert first["done"] == 2 and [f["stem"] for f in first["failed"]] == [STEMS[1]]
    lines = (out / batch.JOURNALS / "rank-0.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(batch.parse_journal_line(line) for line in lines[:-1])  # no torn line kept

    assert main(_export_argv(voc, weight_files, out)) == 0
    second = json.loads((out / "summary.json").read_text())
    assert (second["done"], second["skipped"], second["failed"]) == (1, 2, [])
    assert _tree(out) == _tree(tmp_path / "reference")
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 3


def test_an_altered_or_torn_journal_line_is_not_trusted():
    line = batch.journal_line({"stem": "a", "outputs": {"x.png": "00"}})
    assert line.endswith(b"\n") and json.loads(line)["stem"] == "a"  # still plain JSON
    assert batch.parse_journal_line(line[:-1]) == {"stem": "a", "outputs": {"x.png": "00"}}
    assert batch.parse_journal_line(line[: len(line) // 2]) is None
    assert batch.parse_journal_line(line[:-1].replace(b'"a"', b'"b"')) is None
    assert batch.parse_journal_line(b'{"stem":"a","outputs":{}}') is None  # a line without its digest


def test_a_second_export_into_the_same_folder_is_refused_naming_the_holder(voc_mini, weight_files, tmp_path, capsys):
    voc = _voc_subset(voc_mini, tmp_path / "voc")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / batch.LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'PID {os.getpid()} on here'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_export_argv(voc, weight_files, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("rfm: error:") and f"PID {holder.pid}" in err and err.count("\n") == 1
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (as by kill -9): its lock is gone with it and the next export simply runs
    assert main(_export_argv(voc, weight_files, out)) == 0
    assert f"PID {os.getpid()}" in (out / batch.LOCK).read_text()


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_image_workers_die_with_a_killed_export(voc_mini, weight_files, tmp_path):
    cmd = [sys.executable, "-m", "rfm", *_export_argv(voc_mini, weight_files, tmp_path / "out")[:-1], "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    journal = tmp_path / "out" / batch.JOURNALS / "rank-0.jsonl"
    try:
        deadline = time.time() + 120
        workers: set[int] = set()
        while time.time() < deadline and proc.poll() is None and not (len(workers) == 2 and journal.exists()):
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) == 2 and proc.poll() is None, "the export must be killed while its workers run"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "a worker outlived the killed export"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- training

PARAMS = RefineParams(n0=2, static_layers=3, par_iterations=3)
CONFIG = TrainConfig(steps=4, save_every=2, switch_step=2, cache_features=True, batch_size=2, crop=96,
                     embed_dim=32, decoder_layers=1, cache_side=128, warmup_steps=1)


def test_training_killed_at_every_write_boundary_resumes_on_the_same_trajectory(
        small_clip, voc_mini, tmp_path, monkeypatch):
    samples = voc_samples(voc_mini, labels_from="mask")[:3]
    reference = train(samples, small_clip, VOC, PARAMS, CONFIG, tmp_path / "reference", progress=False)
    ref_log = (tmp_path / "reference" / "log.csv").read_text()
    ref_weights = (tmp_path / "reference" / "decoder.safetensors").read_bytes()

    k = 0
    while True:
        k += 1
        out, crash = tmp_path / f"run{k}", tmp_path / f"crash{k}"
        with monkeypatch.context() as patch:
            KillAt(patch, out, crash, k)
            try:
                train(samples, small_clip, VOC, PARAMS, CONFIG, out, progress=False)
            except Killed:
                pass
        if not crash.exists():
            break
        resume = (crash / CHECKPOINT).exists()
        resumed = train(samples, small_clip, VOC, PARAMS, CONFIG, crash, resume=resume, progress=False)
        for key, value in reference.state_dict().items():
            assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), (k, key)
        # the published files are those of the final checkpoint, not of an older step
        assert (crash / "decoder.safetensors").read_bytes() == ref_weights, k
        assert [r.split(",")[:3] for r in (crash / "log.csv").read_text().splitlines()] == \
               [r.split(",")[:3] for r in ref_log.splitlines()], k
        assert not list(crash.rglob(".*.tmp")), k
        shutil.rmtree(out)
        shutil.rmtree(crash)
    assert k > 10  # the feature cache, then per checkpoint: state.pt, decoder files, log, plot


def test_a_checkpoint_whose_weights_and_state_disagree_is_refused(small_clip, voc_mini, tmp_path):
    samples = voc_samples(voc_mini, labels_from="mask")[:3]
    train(samples, small_clip, VOC, PARAMS, CONFIG, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    first = next(iter(state["weights"]))
    state["weights"][first] = state["weights"][first] + 1  # weights of another step beside this step's hash
    torch.save(state, tmp_path / "run" / CHECKPOINT)
    with pytest.raises(ValueError, match=r"state\.pt: not a valid training checkpoint .*SHA-256"):
        train(samples, small_clip, VOC, PARAMS, CONFIG, tmp_path / "run", resume=True, progress=False)
