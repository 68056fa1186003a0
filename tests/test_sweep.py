"""rfm sweep: its confusion matrices are exactly those of rfm export + rfm eval for the same setting; a
killed sweep resumes to the same totals; two Gloo ranks sum to the one-rank totals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rfm.cli import main
from rfm.metrics import evaluate_folder
from rfm.constants import STAGES
from rfm.sweep import parse_values, settings_grid
from rfm.params import RefineParams

ROOT = Path(__file__).resolve().parents[1]


def _models(w: Path) -> list[str]:
    return ["--clip", str(w / "clip.pt"), "--decoder", str(w / "decoder.safetensors"), "--max-side", "128"]


def _sweep_argv(voc, w, out, *grid):
    return ["sweep", "--voc", str(voc), "--labels-from", "mask", "--out", str(out), *_models(w), "--no-progress",
            "--static-layers", "3", "--par-iterations", "3", *grid]


def _totals(out: Path) -> np.ndarray:
    with np.load(next((out / "sweep.d").glob("rank-0.npz"))) as saved:
        return saved["total"]


def _all_totals(out: Path) -> np.ndarray:
    totals = []
    for path in sorted((out / "sweep.d").glob("rank-*.npz")):
        with np.load(path) as saved:
            totals.append(saved["total"])
    return np.sum(totals, axis=0)


def test_values_and_grid():
    assert parse_values("n0", "5:7,9") == (5, 6, 7, 9)
    assert parse_values("box_threshold", "0.3, 0.5") == (0.3, 0.5)
    assert parse_values("distance", "abs,signed") == ("abs", "signed")
    with pytest.raises(ValueError, match="--alpha '1,x'"):
        parse_values("alpha", "1,x")
    grid = settings_grid({"alpha": (1, 2), "n0": (2, 3)}, RefineParams(static_layers=3))
    assert len(grid) == 4 and {(s["alpha"], s["n0"]) for s in grid} == {(1, 2), (1, 3), (2, 2), (2, 3)}
    assert all(s["static_layers"] == 3 and s["box_threshold"] == 0.4 for s in grid)
    with pytest.raises(ValueError, match="alpha must be 1..64"):
        settings_grid({"alpha": (0,)}, RefineParams())


def test_sweep_scores_exactly_what_export_and_eval_score(voc_mini, weight_files, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_sweep_argv(voc_mini, weight_files, out, "--alpha", "1,2", "--n0", "2,3", "--bg-power", "1,2")) == 0
    printed = capsys.readouterr().out
    assert "rfm: mIoU % over N0 (rows) × α (columns)" in printed and "reproduce the best pseudo labels" in printed
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 8 * 4 and {r["stage"] for r in rows} == set(STAGES)
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == ["alpha", "n0", "box_threshold", "static_layers", "distance", "bg_power", "par_iterations",
                           "stage", "miou", "iou_background"]
    assert all((out / f"heatmap_{stage}.png").read_bytes()[:4] == b"\x89PNG" for stage in STAGES)
    totals = _totals(out)
    settings = json.loads((out / "sweep.json").read_text())["rows"][::4]
    for index in (0, 5):  # two settings: (α 1, N0 2, p 1) and (α 2, N0 2, p 2)
        s = settings[index]
        flags = ["--alpha", str(s["alpha"]), "--n0", str(s["n0"]), "--bg-power", str(s["bg_power"]),
                 "--static-layers", "3", "--par-iterations", "3"]
        for stage in ("initial", "static", "rfm"):
            pl = tmp_path / f"pl{index}{stage}"
            assert main(["export", "--voc", str(voc_mini), "--labels-from", "mask", "--out", str(pl), *_models(weight_files),
                         "--workers", "0", "--format", "png,npy", "--cam-stage", stage, *flags]) == 0
            cams = evaluate_folder(pl / "cams", voc_mini / "SegmentationClass", bg_powers=[s["bg_power"]],
                                   progress=False)
            np.testing.assert_array_equal(totals[index, STAGES.index(stage)], cams.confusion)
        label = evaluate_folder(pl / "SegmentationClass", voc_mini / "SegmentationClass", progress=False)
        np.testing.assert_array_equal(totals[index, STAGES.index("label")], label.confusion)
        assert rows[4 * index + 3]["miou"] == pytest.approx(label.miou)


def _cli(voc, w, out):
    return [sys.executable, "-m", "rfm", *_sweep_argv(voc, w, out, "--alpha", "1:3", "--n0", "2:4")]


def test_a_killed_sweep_resumes_to_the_same_totals(voc_mini, weight_files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run(_cli(voc_mini, weight_files, reference), check=True, env=env, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(voc_mini, weight_files, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / "sweep.d" / "rank-0.npz"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None and done < 3:
        if state.exists():
            with np.load(state) as saved:
                done = len(saved["stems"])
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with np.load(state) as saved:
        assert 3 <= len(saved["stems"]) < 11, "the sweep must be killed in the middle"
    subprocess.run(_cli(voc_mini, weight_files, out), check=True, env=env, capture_output=True, timeout=300)
    np.testing.assert_array_equal(_totals(out), _totals(reference))
    assert (out / "sweep.csv").read_text() == (reference / "sweep.csv").read_text()


def test_two_gloo_ranks_sum_to_the_one_rank_totals(voc_mini, weight_files, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    # torchrun gives each rank one thread: the reference too, so float16 CAMs round the same way
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(_cli(voc_mini, weight_files, one), check=True, env=env, capture_output=True, timeout=300)
    two = tmp_path / "two"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           *_cli(voc_mini, weight_files, two)[1:]], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((two / "sweep.d").glob("rank-*.npz"))) == 2
    np.testing.assert_array_equal(_all_totals(two), _totals(one))
    assert (two / "sweep.csv").read_text() == (one / "sweep.csv").read_text()


def test_settings_sharing_transition_matrices_refine_as_alone(small_clip, voc_mini):
    import rfm
    from rfm.decoder import Decoder

    p = rfm.Predictor(small_clip, decoder=Decoder(width=128, num_blocks=3, embed_dim=32, heads=4, layers=1),
                      device="cpu", max_side=128)
    p.set_image(voc_mini / "JPEGImages" / "2008_004430.jpg", labels=["cat", "dog"])
    shared: dict = {}
    grid = settings_grid({"alpha": (1, 3), "n0": (2, 3), "static_layers": (2, 3), "distance": ("abs", "signed")},
                         RefineParams(par_iterations=2))
    for setting in grid:
        together, alone = p.refine(RefineParams(**setting), shared), p.refine(RefineParams(**setting))
        np.testing.assert_array_equal(together.patch.cam_static, alone.patch.cam_static)
        np.testing.assert_array_equal(together.patch.cam_rfm, alone.patch.cam_rfm)
        np.testing.assert_array_equal(together.layer_keep, alone.layer_keep)
        np.testing.assert_array_equal(together.label, alone.label)
    assert len(shared) == 2 + 2 * 2  # one T₁ per static_layers, one per (n0, distance)
