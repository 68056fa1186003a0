"""rfm export: input modes, resume by manifest, kill-and-resume identity, bad images, torchrun sharding."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfm.cli import main
from rfm.data import coco_samples, folder_samples, mask_labels, voc_samples, xml_labels
from rfm.text import COCO, COCO_CATEGORY_IDS, VOC

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n0", "2", "--static-layers", "3", "--max-side", "160", "--par-iterations", "5", "--workers", "0"]


@pytest.fixture()
def voc_copy(voc_mini, tmp_path):
    """voc-mini plus the files other label sources need: Annotations/*.xml and a cls_labels .npy."""
    root = tmp_path / "voc"
    shutil.copytree(voc_mini, root)
    (root / "Annotations").mkdir()
    onehots = {}
    for mask in sorted((root / "SegmentationClass").glob("*.png")):
        labels = mask_labels(mask)
        objects = "".join(f"<object><name>{VOC.class_names[i]}</name><part><name>head</name></part></object>"
                          for i in labels)
        (root / "Annotations" / f"{mask.stem}.xml").write_text(f"<annotation>{objects}</annotation>")
        onehot = np.zeros(20, np.float32)
        onehot[list(labels)] = 1
        onehots[mask.stem] = onehot
    np.save(root / "cls_labels_onehot.npy", onehots)
    return root


def _export(args, weight_files, out, capsys=None, decoder=True):
    argv = ["export", *map(str, args), "--out", str(out), "--clip", str(weight_files / "clip.pt"), *FAST]
    if decoder:
        argv += ["--decoder", str(weight_files / "decoder.safetensors")]
    code = main(argv)
    err = capsys.readouterr().err if capsys else ""
    return code, err


def _outputs(out: Path) -> dict[str, bytes]:
    files = [*sorted((out / "SegmentationClass").glob("*.png")), *sorted((out / "cams").glob("*.npy"))]
    if (out / "coco.json").exists():
        files.append(out / "coco.json")
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_label_sources_agree_on_voc_mini(voc_copy):
    by_mask = voc_samples(voc_copy, labels_from="mask")
    by_xml = voc_samples(voc_copy, labels_from="xml")
    by_npy = voc_samples(voc_copy, labels_from=f"npy:{voc_copy / 'cls_labels_onehot.npy'}")
    assert len(by_mask) == 11 and {s.image.suffix for s in by_mask} == {".png", ".jpg"}
    for a, b, c in zip(by_mask, by_xml, by_npy):
        assert a.stem == b.stem == c.stem and sorted(a.labels) == sorted(b.labels) == sorted(c.labels)
        assert a.labels and a.gt is not None
    # the ground truth says which classes are there: check one by hand
    gt = np.asarray(Image.open(voc_copy / "SegmentationClass" / "2008_004430.png"))
    assert set(by_mask[0].labels) == {int(v) - 1 for v in np.unique(gt) if 0 < v < 255}
    (voc_copy / "split.txt").write_text("vainf_000\nJPEGImages/vainf_001.png\n")
    assert [s.stem for s in voc_samples(voc_copy, voc_copy / "split.txt", "mask")] == ["vainf_000", "vainf_001"]
    shutil.rmtree(voc_copy / "Annotations")
    with pytest.raises(FileNotFoundError, match="--labels-from mask"):
        voc_samples(voc_copy, labels_from="xml")


def test_xml_part_names_are_not_classes(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>person</name><part><name>hand</name></part></object>"
                   "<object><name>dog</name></object><object><name>person</name></object></annotation>")
    assert xml_labels(xml, VOC) == (14, 11)


def test_folder_and_coco_sources(voc_copy, tmp_path):
    images = voc_copy / "JPEGImages"
    (tmp_path / "labels.csv").write_text("image,labels\nvainf_000.png,person\n2008_004430.jpg,cat;dog\n")
    samples = folder_samples(images, tmp_path / "labels.csv", VOC)
    assert [(s.stem, s.labels) for s in samples] == [("vainf_000", (14,)), ("2008_004430", (7, 11))]
    (tmp_path / "labels.json").write_text(json.dumps({"2008_004430.jpg": ["dog", "cat"]}))
    assert folder_samples(images, tmp_path / "labels.json", VOC)[0].labels == (11, 7)
    doc = {"images": [{"id": 5, "file_name": "2008_004430.jpg", "height": 333, "width": 500},
                      {"id": 9, "file_name": "vainf_000.png", "height": 513, "width": 513}],
           "annotations": [{"image_id": 5, "category_id": 18}, {"image_id": 5, "category_id": 17},
                           {"image_id": 5, "category_id": 18}]}
    (tmp_path / "coco.json").write_text(json.dumps(doc))
    samples = coco_samples(tmp_path / "coco.json", images)
    assert samples[0].labels == (COCO.index("cat"), COCO.index("dog")) and samples[0].image_id == 5
    assert samples[1].labels == ()


@pytest.mark.parametrize("mode", ["mask", "xml", "npy", "folder", "coco"])
def test_export_in_every_input_mode(mode, voc_copy, weight_files, tmp_path, capsys):
    if mode == "folder":
        lines = ["image,labels"] + [f"{p.name},{'|'.join(VOC.class_names[i] for i in mask_labels(voc_copy / 'SegmentationClass' / (p.stem + '.png')))}"
                                    for p in sorted((voc_copy / "JPEGImages").iterdir())]
        (tmp_path / "labels.csv").write_text("\n".join(lines))
        source = ["--images", voc_copy / "JPEGImages", "--labels", tmp_path / "labels.csv"]
    elif mode == "coco":
        voc_to_coco = {i: COCO_CATEGORY_IDS[COCO.index(n)] for i, n in enumerate(VOC.class_names)}
        images, anns = [], []
        for k, p in enumerate(sorted((voc_copy / "JPEGImages").iterdir())):
            images.append({"id": 100 + k, "file_name": p.name})
            anns += [{"image_id": 100 + k, "category_id": voc_to_coco[i]}
                     for i in mask_labels(voc_copy / "SegmentationClass" / f"{p.stem}.png")]
        (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
        source = ["--coco", tmp_path / "instances.json", "--images", voc_copy / "JPEGImages"]
    else:
        spec = f"npy:{voc_copy / 'cls_labels_onehot.npy'}" if mode == "npy" else mode
        source = ["--voc", voc_copy, "--labels-from", spec]
    out = tmp_path / "out"
    code, err = _export([*source, "--format", "png,npy,coco"], weight_files, out, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 11 and summary["failed"] == [] and summary["images"] == 11
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 11
    for mask in sorted((voc_copy / "SegmentationClass").glob("*.png")):
        label = Image.open(out / "SegmentationClass" / mask.name)
        assert label.mode == "P" and label.size == Image.open(mask).size
        cams = np.load(out / "cams" / f"{mask.stem}.npy", allow_pickle=True).item()
        present = set(mask_labels(mask))
        if mode == "coco":  # COCO vocabulary indices
            present = {COCO.index(VOC.class_names[i]) for i in present}
            assert set(a["category_id"] for a in coco["annotations"]) <= set(COCO_CATEGORY_IDS)
        assert set(cams["keys"].tolist()) == present
        assert set(np.unique(np.asarray(label))) <= {0} | {i + 1 for i in present}


def test_rerun_skips_finished_images_verified_by_hash(voc_copy, weight_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--voc", voc_copy, "--labels-from", "mask", "--format", "png,npy"]
    assert _export(args, weight_files, out, capsys)[0] == 0
    first = _outputs(out)
    assert _export(args, weight_files, out, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 0 and summary["skipped"] == 11
    # existence is not enough: a changed or missing output is redone
    (out / "SegmentationClass" / "vainf_000.png").write_bytes(b"damaged")
    (out / "cams" / "vainf_001.npy").unlink()
    assert _export(args, weight_files, out, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 2 and summary["skipped"] == 9
    assert _outputs(out) == first


def test_other_parameters_are_refused_unless_overwrite(voc_copy, weight_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--voc", voc_copy, "--labels-from", "mask"]
    assert _export(args, weight_files, out, capsys)[0] == 0
    before = _outputs(out)
    code, err = _export([*args, "--alpha", "3"], weight_files, out, capsys)
    assert code == 2 and "refine.alpha" in err and "--overwrite" in err
    assert _outputs(out) == before
    code, err = _export([*args, "--alpha", "3", "--overwrite"], weight_files, out, capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["done"] == 11
    assert json.loads((out / "manifest.json").read_text())["parameters"]["refine"]["alpha"] == 3


def test_corrupt_images_are_reported_and_skipped(voc_copy, weight_files, tmp_path, capsys):
    (voc_copy / "JPEGImages" / "vainf_000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (voc_copy / "JPEGImages" / "empty.jpg").write_bytes(b"")
    Image.open(voc_copy / "SegmentationClass" / "vainf_001.png").save(voc_copy / "SegmentationClass" / "empty.png")
    out = tmp_path / "out"
    code, err = _export(["--voc", voc_copy, "--labels-from", "mask", "--workers", "2"], weight_files, out, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 10 and {f["stem"] for f in summary["failed"]} == {"vainf_000", "empty"}
    assert all(f["reason"] for f in summary["failed"])
    assert not (out / "SegmentationClass" / "vainf_000.png").exists()


def _cli(args, weight_files, out):
    return [sys.executable, "-m", "rfm", "export", *map(str, args), "--out", str(out), "--clip",
            str(weight_files / "clip.pt"), "--decoder", str(weight_files / "decoder.safetensors"),
            "--n0", "2", "--static-layers", "3", "--workers", "0", "--max-side", "256", "--par-iterations", "10"]


def test_sigkill_and_resume_gives_byte_identical_outputs(voc_copy, weight_files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--voc", voc_copy, "--labels-from", "mask", "--format", "png,npy,coco"]
    reference = tmp_path / "reference"
    subprocess.run(_cli(args, weight_files, reference), check=True, env=env, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(args, weight_files, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "manifest.d" / "rank-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = journal.read_text().count("\n")
    assert 3 <= finished < 11, "the run must be killed in the middle"
    assert not (out / "coco.json").exists()

    subprocess.run(_cli(args, weight_files, out), check=True, env=env, capture_output=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] >= finished and summary["done"] + summary["skipped"] == 11
    assert _outputs(out) == _outputs(reference)
    assert not list(out.glob("**/.*.tmp"))


def test_torchrun_two_gloo_ranks_share_the_images(voc_copy, weight_files, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "out"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", *_cli(
        ["--voc", voc_copy, "--labels-from", "mask", "--format", "png,coco"], weight_files, out)[1:]]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stems = {}
    for rank in (0, 1):
        lines = (out / "manifest.d" / f"rank-{rank}.jsonl").read_text().splitlines()
        stems[rank] = [json.loads(line)["stem"] for line in lines]
    everything = sorted(p.stem for p in (voc_copy / "JPEGImages").iterdir())
    assert stems[0] and stems[1] and not set(stems[0]) & set(stems[1])
    assert sorted(stems[0] + stems[1]) == everything  # none missing, none twice
    assert sorted(p.stem for p in (out / "SegmentationClass").glob("*.png")) == everything
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(Path(i["file_name"]).stem for i in coco["images"]) == everything
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["done"] == 11
