"""Image-size outputs made strip by strip: every strip equals the same rows of the whole map, the maps equal
OpenCV's resizes of the patch-grid results (the official code's cv2.resize), and the writers read back."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import rfm
from rfm.data import read_image
from rfm.data import load_npy_dict
from rfm.decoder import Decoder
from rfm.export import save_cams_npy, save_label_png
from rfm.params import RefineParams
from rfm.predictor import _nearest_indices, bilinear_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grid,size", [((14, 20), (333, 500)), ((7, 7), (97, 1201)), ((3, 5), (3, 5)),
                                       ((10, 12), (41, 30))])
def test_bilinear_rows_is_cv2_inter_linear_in_any_strip(grid, size):
    maps = np.random.default_rng(0).random((3, *grid), dtype=np.float32)
    expected = np.stack([cv2.resize(m, size[::-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    whole = bilinear_rows(maps, size, 0, size[0])
    np.testing.assert_allclose(whole, expected, atol=2e-6)
    for start, stop in ((0, 1), (size[0] // 3, size[0] // 2 + 1), (size[0] - 1, size[0])):
        np.testing.assert_array_equal(bilinear_rows(maps, size, start, stop), whole[:, start:stop])


@pytest.mark.parametrize("src,dst", [(160, 500), (128, 333), (7, 7), (100, 97), (3, 1000)])
def test_nearest_indices_are_cv2_inter_nearest(src, dst):
    ramp = np.arange(src, dtype=np.float32)[:, None].repeat(2, 1)
    expected = cv2.resize(ramp, (2, dst), interpolation=cv2.INTER_NEAREST)[:, 0].astype(np.intp)
    np.testing.assert_array_equal(_nearest_indices(src, dst), expected)


@pytest.fixture(scope="module")
def result(small_clip, voc_mini):
    """A result whose maps are upsampled: a 500×333 photo analysed at max_side 128."""
    decoder = Decoder(width=128, num_blocks=3, embed_dim=32, heads=4, layers=1)
    p = rfm.Predictor(small_clip, decoder=decoder, device="cpu", max_side=128)
    p.set_image(voc_mini / "JPEGImages" / "2008_004430.jpg", labels=["cat", "dog"])
    return p, p.refine(RefineParams(n0=2, static_layers=3, par_iterations=3, boxes={"dog": [(20, 30, 300, 250)]}))


def test_cam_and_label_rows_are_the_official_resizes(result):
    predictor, r = result
    h, w = r.image_size
    assert (h, w) == (333, 500) and predictor.features.work_image.shape[:2] != (h, w)
    inside = np.zeros((h, w), np.float32)
    inside[30:250, 20:300] = 1
    for stage in ("initial", "static", "rfm"):
        grid = getattr(r.patch, f"cam_{stage}")
        expected = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in grid])
        if stage != "initial":
            expected[1] *= inside  # the dog is confined to its box
        rows = r.cam_rows(stage)
        strips = np.concatenate(list(rows.strips(64)), axis=1)
        np.testing.assert_allclose(strips, np.clip(expected, 0, 1), atol=2e-6)
        np.testing.assert_array_equal(strips, r.cam(stage))
    small = r._work_label(0.0, 255)
    expected = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    expected[(expected == r.class_indices[1] + 1) & (inside == 0)] = 0
    np.testing.assert_array_equal(np.concatenate(list(r.label_rows().strips(50))), expected)
    np.testing.assert_array_equal(r.label_rows(0.9).whole(), r.label_with_ignore(0.9))


def test_streamed_files_read_back_as_the_arrays(result, tmp_path):
    _, r = result
    save_label_png(r.label_rows(), tmp_path / "label.png")
    label = Image.open(tmp_path / "label.png")
    assert label.mode == "P" and label.size == (500, 333)
    np.testing.assert_array_equal(np.asarray(label), r.label)
    save_cams_npy(tmp_path / "cams.npy", r.class_indices, r.cam_rows("rfm"), highres=r.cam_rows("initial"))
    for record in (np.load(tmp_path / "cams.npy", allow_pickle=True).item(), load_npy_dict(tmp_path / "cams.npy")):
        assert record["keys"].tolist() == [7, 11]
        np.testing.assert_array_equal(record["attn_highres"], r.cam_rfm.astype(record["attn_highres"].dtype))
        np.testing.assert_array_equal(record["highres"], r.cam_initial.astype(record["highres"].dtype))


def test_resized_results_scale_their_boxes(result):
    _, r = result
    small = r.resized((111, 166))
    assert small.label.shape == (111, 166) and small.cam_static.shape == (2, 111, 166)
    assert small.cam_static[1][100:, :].max() == 0  # the dog's box scaled to rows 10..83
    assert small.cam_static[1][20:80, 10:95].max() > 0


def test_a_large_jpeg_is_decoded_reduced_with_its_full_size(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (1500, 2400, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=90)
    full = read_image(tmp_path / "big.jpg")
    assert full.rgb.shape == (1500, 2400, 3) and full.size == (1500, 2400)
    reduced = read_image(tmp_path / "big.jpg", max_side=512)
    assert reduced.size == (1500, 2400)
    assert reduced.rgb.shape == (375, 600, 3)  # 1/4: the smallest DCT scale keeping the long side ≥ 512 + 32
    Image.fromarray(rgb).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", max_side=512).rgb.shape == (1500, 2400, 3)  # only JPEG decodes reduced


PEAK = """
import resource, sys
from rfm.cli import main
assert main(["run", sys.argv[1], "--labels", "cat", "--out", sys.argv[2], "--clip", sys.argv[3], "--n0", "2",
             "--static-layers", "3", "--max-side", "128", "--par-iterations", "2"]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_rfm_run_memory_does_not_follow_the_upload(weight_files, tmp_path):
    """Scaled down from benchmarks/bench_memory.py: peak RSS of `rfm run` on a 6000² JPEG stays near that on
    a 1000² one (36 million pixels: each full-size float32 map would be 144 MB)."""
    peak = {}
    for side in (1000, 6000):
        image = tmp_path / f"{side}.jpg"
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(image, quality=80)
        proc = subprocess.run([sys.executable, "-c", PEAK, str(image), str(tmp_path / f"out{side}"),
                               str(weight_files / "clip.pt")],
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak[side] = int(proc.stdout.split()[-1]) / 1024  # MiB
    assert peak[6000] < 1.3 * peak[1000], peak
