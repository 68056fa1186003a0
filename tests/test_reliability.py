"""The failures of the reliability battery (issue 11), one row each: every command answers a user's mistake, a
hostile file or the machine's refusal with one `rfm: error:` line that names the file, row or flag, exits 2
(1 for an export where no image succeeded) and writes nothing it should not."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfm.cli import main
from rfm.text import VOC

ROOT = Path(__file__).resolve().parents[1]
JPEG = "2008_004430"  # voc-mini's photo: a cat and a dog


class _Payload:
    """Pickles to a call of os.system: if any loader ran it, the marker file would appear."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model(w: Path) -> list[str]:
    return ["--clip", str(w / "clip.pt"), "--n0", "2", "--static-layers", "3", "--max-side", "128"]


def _run(t: Path, w: Path, v: Path, *extra: str, image: Path | None = None) -> list[str]:
    return ["run", str(image or v / "JPEGImages" / f"{JPEG}.jpg"), "--labels", "cat,dog", "--out", str(t / "out"),
            *_model(w), *extra]


def _export(t: Path, w: Path, *extra: str) -> list[str]:
    return ["export", "--out", str(t / "out"), *_model(w), "--workers", "0", *extra]


def _train(t: Path, w: Path, v: Path, *extra: str) -> list[str]:
    return ["train", "--voc", str(v), "--labels-from", "mask", "--steps", "2", "--out", str(t / "run"),
            *_model(w), *extra]


def _folder(t: Path, v: Path, name: str, text: str) -> list[str]:
    (t / name).write_text(text)
    return ["--images", str(v / "JPEGImages"), "--labels", str(t / name)]


def _voc_with(t: Path, v: Path, **files: str) -> Path:
    """A copy of voc-mini with extra files (relative path → text)."""
    root = t / "voc"
    shutil.copytree(v, root)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _state_pt_payload(t, w, v):
    (t / "run").mkdir()
    torch.save({"step": 1, "weights": _Payload(t / "marker")}, t / "run" / "state.pt")
    return _train(t, w, v, "--resume")


def _state_pt_truncated(t, w, v):
    (t / "run").mkdir()
    torch.save({"step": 1, "weights": {"x": torch.zeros(1000)}}, t / "run" / "state.pt")
    data = (t / "run" / "state.pt").read_bytes()
    (t / "run" / "state.pt").write_bytes(data[: len(data) // 2])
    return _train(t, w, v, "--resume")


def _npy_missing_stem(t, w, v):
    onehot = {"vainf_000": np.eye(20, dtype=np.float32)[0]}  # the other ten stems are missing
    np.save(t / "cls.npy", onehot)
    return _export(t, w, "--voc", str(v), "--labels-from", f"npy:{t / 'cls.npy'}")  # 2008_004430 comes first


def _xml_unknown_class(t, w, v):
    xml = "".join(f"<annotation><object><name>{n}</name></object></annotation>" for n in ["unicorn"])
    root = _voc_with(t, v, **{f"Annotations/{p.stem}.xml": xml for p in (v / "JPEGImages").iterdir()})
    return _export(t, w, "--voc", str(root))


def _coco_malformed(t, w, v):
    (t / "coco.json").write_text(json.dumps({"images": [{"file_name": f"{JPEG}.jpg"}], "annotations": []}))
    return _export(t, w, "--coco", str(t / "coco.json"), "--images", str(v / "JPEGImages"))


def _coco_unknown_image(t, w, v):
    (t / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": f"{JPEG}.jpg"}],
                                             "annotations": [{"image_id": 7, "category_id": 17}]}))
    return _export(t, w, "--coco", str(t / "coco.json"), "--images", str(v / "JPEGImages"))


def _eval_folders(t: Path, v: Path, pred: dict[str, object]) -> list[str]:
    (t / "pred").mkdir()
    for name, content in pred.items():
        if isinstance(content, bytes):
            (t / "pred" / name).write_bytes(content)
        else:
            np.save(t / "pred" / name, content)
    return ["eval", "--pred", str(t / "pred"), "--gt", str(v / "SegmentationClass"), "--no-progress"]


def _eval_corrupt_png(t, w, v):
    good = (v / "SegmentationClass" / f"{JPEG}.png").read_bytes()
    return _eval_folders(t, v, {f"{JPEG}.png": good[: len(good) // 3]})


def _eval_nan_cams(t, w, v):
    h, wd = np.asarray(Image.open(v / "SegmentationClass" / f"{JPEG}.png")).shape
    cams = np.full((2, h, wd), np.nan, np.float32)
    return _eval_folders(t, v, {f"{JPEG}.npy": {"keys": np.array([7, 11]), "attn_highres": cams}})


def _run_full_disk(t, w, v, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(t / "out")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk: write errors name no file
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return _run(t, w, v)


def _run_leftover_overlay(t, w, v):
    (t / "out").mkdir()
    Image.new("L", (4, 4)).save(t / "out" / "static_dog.png")
    return _run(t, w, v)


def _run_tiny_image(t, w, v):
    Image.new("RGB", (8, 8)).save(t / "tiny.png")
    return _run(t, w, v, image=t / "tiny.png")


def _export_all_fail(t, w, v):
    (t / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (t / "images" / name).write_bytes(b"\xff\xd8 not a jpeg")
    (t / "labels.csv").write_text("image,labels\na.jpg,cat\nb.jpg,dog\n")
    return _export(t, w, "--images", str(t / "images"), "--labels", str(t / "labels.csv"))


def _run_out_under_a_file(t, w, v):
    (t / "f").write_text("")
    argv = _run(t, w, v)
    argv[argv.index("--out") + 1] = str(t / "f" / "out")
    return argv


# (case, argv builder (tmp, weight files, voc-mini) → argv, exit code, what the one line must say)
ROWS = [
    ("state.pt with a pickle payload", _state_pt_payload, 2, ["state.pt: not a valid training checkpoint",
                                                            "weights_only"]),
    ("truncated state.pt", _state_pt_truncated, 2, ["state.pt: not a valid training checkpoint"]),
    (".npy label dict missing a stem", _npy_missing_stem, 2, ["cls.npy: no entry for '2008_004430'"]),
    ("labels JSON of the wrong shape", lambda t, w, v: _export(t, w, *_folder(t, v, "l.json", '{"a.jpg": 5}')),
     2, ["l.json entry 'a.jpg'"]),
    ("labels JSON items without keys", lambda t, w, v: _export(t, w, *_folder(t, v, "l.json", '[{"img": 1}]')),
     2, ["l.json item 0"]),
    ("invalid labels JSON", lambda t, w, v: _export(t, w, *_folder(t, v, "l.json", '{"a.jpg": [')),
     2, ["l.json: not valid JSON"]),
    ("COCO image without an id", _coco_malformed, 2, ["coco.json: images[0]"]),
    ("COCO annotation of no image", _coco_unknown_image, 2, ["coco.json: annotations[0]", "image_id 7"]),
    ("unknown class in an XML", _xml_unknown_class, 2, [".xml", "unicorn"]),
    ("unknown class in a CSV row", lambda t, w, v: _export(t, w, *_folder(
        t, v, "l.csv", f"image,labels\nvainf_000.png,cat\n{JPEG}.jpg,cat;unicorn\n")), 2, ["l.csv row 3", "unicorn"]),
    ("corrupt PNG in eval", _eval_corrupt_png, 2, [f"{JPEG}.png: cannot read the label PNG"]),
    ("NaN CAMs in eval", _eval_nan_cams, 2, [f"{JPEG}.npy", "NaN or infinite"]),
    ("--crop not a patch multiple", lambda t, w, v: _train(t, w, v, "--crop", "8"), 2, ["--crop 8"]),
    ("--n0 beyond the CLIP's blocks", lambda t, w, v: _run(t, w, v, "--n0", "9"), 2, ["--n0 9", "4 blocks"]),
    ("--static-layers beyond the blocks", lambda t, w, v: _export(t, w, "--voc", str(v), "--labels-from", "mask",
                                                                   "--static-layers", "7"), 2, ["--static-layers 7"]),
    ("image smaller than a patch", _run_tiny_image, 2, ["8×8 pixels", "16-pixel patch"]),
    ("alpha that overflows", lambda t, w, v: _run(t, w, v, "--alpha", "54000"), 2, ["alpha must be 1..64"]),
    ("box holding no pixel centre", lambda t, w, v: _run(t, w, v, "--box", "dog:10.6,10.6,11.4,11.4"), 2,
     ["holds no pixel centre"]),
    ("one class twice in --vocab", lambda t, w, v: _run(t, w, v, "--vocab", "cat,Cat,dog"), 2,
     ["names one class twice", "'cat' and 'Cat'"]),
    ("leftover overlay in --out", _run_leftover_overlay, 2, ["static_dog.png exists", "--overwrite"]),
    ("full disk", _run_full_disk, 2, ["out/label.png: No space left on device"]),
    ("export where every image fails", _export_all_fail, 1, ["no image could be exported", "a: "]),
    ("output folder under a file", _run_out_under_a_file, 2, ["f/out", "Not a directory"]),
]


@pytest.mark.parametrize("case,build,code,says", ROWS, ids=[r[0] for r in ROWS])
def test_every_failure_is_one_line_naming_where(case, build, code, says, weight_files, voc_mini, tmp_path,
                                                monkeypatch, capsys):
    argv = build(tmp_path, weight_files, voc_mini, monkeypatch) if case == "full disk" else \
        build(tmp_path, weight_files, voc_mini)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rfm: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rfm: error: "), err
    for text in says:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "marker").exists()  # a payload never ran
    assert not (tmp_path / "out" / "label.png").exists()  # `rfm run` refused before writing


def test_flags_are_checked_before_the_decoder_loads(weight_files, voc_mini, tmp_path, monkeypatch, capsys):
    import rfm

    def no_decoder(*args, **kwargs):
        raise AssertionError("the decoder was loaded before the flags were checked")

    monkeypatch.setattr(rfm, "load_decoder", no_decoder)
    argv = _run(tmp_path, weight_files, voc_mini, "--n0", "9", "--decoder", str(weight_files / "decoder.safetensors"))
    assert main(argv) == 2 and "--n0 9" in capsys.readouterr().err


def test_a_gif_listed_in_a_labels_csv_is_exported(weight_files, voc_mini, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.open(voc_mini / "JPEGImages" / f"{JPEG}.jpg").convert("P").save(tmp_path / "images" / "cat.gif")
    (tmp_path / "labels.csv").write_text("image,labels\ncat.gif,cat dog\n")
    assert main(_export(tmp_path, weight_files, "--images", str(tmp_path / "images"), "--labels",
                        str(tmp_path / "labels.csv"))) == 0, capsys.readouterr().err
    label = Image.open(tmp_path / "out" / "SegmentationClass" / "cat.png")
    assert label.size == (500, 333) and set(np.unique(np.asarray(label))) <= {0, VOC.index("cat") + 1,
                                                                             VOC.index("dog") + 1}


@pytest.mark.skipif(not shutil.which("setpriv") and os.geteuid() == 0, reason="root writes anywhere without setpriv")
def test_a_read_only_output_folder_is_one_line(weight_files, voc_mini, tmp_path):
    """A folder the user may not write to. Root may write anywhere, so as root the command runs without the
    capabilities that override file permissions (setpriv), as any user's would."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    cmd = [sys.executable, "-m", "rfm", *_run(tmp_path, weight_files, voc_mini)]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *cmd]
    try:
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=300)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rfm: error: {out}") and "Permission denied" in lines[0], \
        proc.stderr
    assert not list(out.iterdir())
