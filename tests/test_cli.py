"""The `rfm run` command end to end, on a real voc-mini photo with random CLIP weights."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfm.backbone import random_clip_state_dict
from rfm.cli import main
from conftest import voc_image

ROOT = Path(__file__).resolve().parents[1]


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_writes_label_overlays_and_figure(weight_files, voc_mini, tmp_path, capsys):
    image_path, _ = voc_image(voc_mini, "2008_004430")
    out = tmp_path / "out"
    code, stdout, stderr = _run(["run", image_path, "--labels", "cat,dog", "--clip", weight_files / "clip.pt",
                                 "--decoder", weight_files / "decoder.safetensors", "--n0", 2, "--static-layers", 3,
                                 "--alpha", 3, "--box", "dog:10,10,300,300", "--out", out], capsys)
    assert code == 0, stderr
    label = Image.open(out / "label.png")
    assert label.mode == "P" and label.size == Image.open(image_path).size
    assert set(np.unique(np.asarray(label))) <= {0, 8, 12}
    assert not (np.asarray(label)[300:, :] == 12).any()  # dog confined to its box
    cams = np.load(out / "cams.npy", allow_pickle=True).item()
    assert list(cams["keys"]) == [7, 11] and cams["attn_highres"].shape == (2, 333, 500)
    for stage in ("initial", "static", "rfm"):
        for name in ("cat", "dog"):
            assert Image.open(out / f"{stage}_{name}.png").size == (500, 333)
    assert Image.open(out / "figure.png").format == "PNG"
    assert "RFM kept blocks" in stdout

    # running again refuses to overwrite; --overwrite replaces
    code, _, stderr = _run(["run", image_path, "--labels", "cat", "--clip", weight_files / "clip.pt", "--n0", 2,
                            "--static-layers", 3, "--out", out], capsys)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = _run(["run", image_path, "--labels", "cat", "--clip", weight_files / "clip.pt", "--n0", 2,
                            "--static-layers", 3, "--out", out, "--overwrite"], capsys)
    assert code == 0, stderr


@pytest.mark.parametrize("case,message", [
    ("bad_image", "not an image file"),
    ("unknown_label", "unknown class 'unicorn'"),
    ("bad_alpha", "alpha must be 1..64"),
    ("missing_clip", "CLIP checkpoint not found"),
])
def test_errors_exit_non_zero_with_one_line(case, message, weight_files, voc_mini, tmp_path, capsys):
    image_path, _ = voc_image(voc_mini, "2008_004430")
    args = {"labels": "cat", "clip": weight_files / "clip.pt", "alpha": 2}
    if case == "bad_image":
        image_path = tmp_path / "broken.jpg"
        image_path.write_bytes(b"\xff\xd8 not really a jpeg")
    elif case == "unknown_label":
        args["labels"] = "cat,unicorn"
    elif case == "bad_alpha":
        args["alpha"] = 0
    else:
        args["clip"] = tmp_path / "nowhere.pt"
    code, _, stderr = _run(["run", image_path, "--labels", args["labels"], "--clip", args["clip"], "--alpha",
                            args["alpha"], "--n0", 2, "--static-layers", 3, "--out", tmp_path / "o"], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rfm: error:") and message in lines[0], stderr
    assert not (tmp_path / "o" / "label.png").exists()


def test_python_dash_m_rfm_with_a_random_vit_b16(voc_mini, tmp_path):
    """The issue's check: the real entry point on a sample photo with a random-weight ViT-B/16 file.

    A ViT-B/16-shaped OpenAI state dict with random weights is made by rfm.backbone.random_clip_state_dict()
    (defaults are ViT-B/16's shapes) and saved with torch.save; --clip takes its path.
    """
    torch.save(random_clip_state_dict(seed=1), tmp_path / "ViT-B-16-random.pt")
    image_path, _ = voc_image(voc_mini, "vainf_000")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rfm", "run", str(image_path), "--labels", "person",
                           "--clip", str(tmp_path / "ViT-B-16-random.pt"), "--device", "cpu",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no decoder loaded" in proc.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["cams.npy", "figure.png", "initial_person.png", "label.png", "label_overlay.png",
                       "static_person.png"]
    assert Image.open(tmp_path / "out" / "label.png").size == Image.open(image_path).size
