"""Tests for rfm.export: palette, PNG/npy/COCO savers, RLE, atomic writes."""

import json

import numpy as np
import pytest
from PIL import Image

from rfm.export import (
    atomic_write,
    coco_document,
    coco_rle_encode,
    label_to_coco,
    save_cams_npy,
    save_coco_json,
    save_label_png,
    voc_palette,
)

# pycocotools' decode trips a NumPy 2 deprecation inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def mask_api():
    """pycocotools is only a reference here; the library does not need it."""
    return pytest.importorskip("pycocotools.mask")


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_palette_known_entries():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0),
                15: (192, 128, 128), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour
    assert len({tuple(c) for c in palette}) == 256


def test_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.choice([0, 1, 15, 20, 255], size=(37, 53)).astype(np.uint8)
    path = save_label_png(label, tmp_path / "sub" / "a.png")
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), label)
        assert bytes(image.getpalette()[:768]) == voc_palette().tobytes()


def test_label_png_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        save_label_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "a.png")
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(np.full((2, 2), 300), tmp_path / "a.png")
    with pytest.raises(TypeError, match="integers"):
        save_label_png(np.zeros((2, 2), np.float32), tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


def test_atomic_write_refuses_existing_target(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(target, lambda f: f.write(b"new"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_label_png(np.zeros((2, 2), np.uint8), target)
    assert target.read_bytes() == b"old"
    assert _siblings(target) == ["x.bin"]


def test_atomic_write_overwrite(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    assert atomic_write(target, lambda f: f.write(b"new"), overwrite=True) == target
    assert target.read_bytes() == b"new"
    assert _siblings(target) == ["x.bin"]


def _failing_writer(f):
    f.write(b"partial")
    raise RuntimeError("boom")


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "deep" / "x.bin"
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, _failing_writer)
    assert _siblings(target) == []


def test_atomic_write_failure_keeps_old_file_on_overwrite(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, _failing_writer, overwrite=True)
    assert target.read_bytes() == b"old"
    assert _siblings(target) == ["x.bin"]


def test_cams_npy_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    cams = rng.random((2, 9, 11), dtype=np.float32)
    initial = rng.random((2, 9, 11), dtype=np.float32)
    path = save_cams_npy(tmp_path / "img.npy", [14, 7], cams, highres=initial)
    record = np.load(path, allow_pickle=True).item()
    assert set(record) == {"keys", "attn_highres", "highres"}
    np.testing.assert_array_equal(record["keys"], [14, 7])
    assert record["attn_highres"].dtype == np.float16 and record["highres"].dtype == np.float16
    np.testing.assert_allclose(record["attn_highres"], cams, atol=1e-3)
    np.testing.assert_allclose(record["highres"], initial, atol=1e-3)
    with pytest.raises(FileExistsError):
        save_cams_npy(path, [14, 7], cams)


def test_cams_npy_rejects_mismatch(tmp_path):
    with pytest.raises(ValueError, match="K = len"):
        save_cams_npy(tmp_path / "a.npy", [1, 2, 3], np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="attn_highres"):
        save_cams_npy(tmp_path / "a.npy", [1], np.zeros((1, 4, 4)), attn_highres=np.zeros(1))
    assert not list(tmp_path.iterdir())


def _reference_counts(mask_api, mask):
    return mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize("seed", range(40))
def test_rle_matches_pycocotools_random(mask_api, seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 60, size=2)
    mask = rng.random((height, width)) < rng.random()
    if seed % 2:  # blobs give long runs, exercising multi-group and negative deltas
        mask = np.kron(rng.random((4, 4)) < 0.5, np.ones((height, width), bool))
    ours = coco_rle_encode(mask)
    assert ours["size"] == list(mask.shape)
    assert ours["counts"] == _reference_counts(mask_api, mask)
    decoded = mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()})
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (375, 500), (0, 5)])
@pytest.mark.parametrize("fill", [False, True])
def test_rle_matches_pycocotools_constant(mask_api, shape, fill):
    mask = np.full(shape, fill)
    assert coco_rle_encode(mask)["counts"] == _reference_counts(mask_api, mask)


def test_label_to_coco_matches_numpy(mask_api):
    label = np.zeros((20, 30), np.uint8)
    label[2:5, 3:10] = 8       # class index 7
    label[10:19, 25:27] = 15   # class index 14
    label[0, 29] = 15
    label[15:, :4] = 255       # ignore: never an annotation
    annotations = label_to_coco(label, [7, 14, 2], image_id=5)
    assert [a["category_id"] for a in annotations] == [8, 15]  # class 2 is absent
    for annotation in annotations:
        mask = label == annotation["category_id"]
        ys, xs = np.nonzero(mask)
        assert annotation["image_id"] == 5 and annotation["iscrowd"] == 1
        assert annotation["area"] == mask.sum()
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        rle = {"size": annotation["segmentation"]["size"],
               "counts": annotation["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_api.decode(rle), mask)
        np.testing.assert_allclose(mask_api.toBbox(rle), annotation["bbox"])


def test_label_to_coco_custom_category_ids():
    label = np.array([[0, 1], [2, 2]], np.uint8)
    annotations = label_to_coco(label, [0, 1], category_ids=[90, 91])
    assert [a["category_id"] for a in annotations] == [90, 91]
    with pytest.raises(ValueError, match="category_ids"):
        label_to_coco(label, [0, 1], category_ids=[90])


def test_coco_document_numbers_annotations_and_saves(tmp_path):
    label = np.array([[0, 1], [2, 2]], np.uint8)
    annotations = label_to_coco(label, [0, 1], image_id=1) + label_to_coco(label, [0], image_id=2)
    images = [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2},
              {"id": 2, "file_name": "b.jpg", "height": 2, "width": 2}]
    categories = [{"id": 1, "name": "aeroplane"}, {"id": 2, "name": "bicycle"}]
    document = coco_document(images, annotations, categories)
    assert [a["id"] for a in document["annotations"]] == [1, 2, 3]
    assert "id" not in annotations[0]  # inputs are not mutated
    path = save_coco_json(document, tmp_path / "coco.json")
    assert json.loads(path.read_text()) == document
    with pytest.raises(ValueError, match="unknown category_id"):
        coco_document(images, annotations, categories[:1])
    with pytest.raises(ValueError, match="unknown image_id"):
        coco_document(images[:1], annotations, categories)


def test_save_to_voc_dataset(tmp_path):
    from rfm.export import save_to_voc_dataset

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :32]
    image = np.stack([yy * 8, xx * 6, 255 - yy * 4], axis=-1).astype(np.uint8)  # smooth: JPEG-friendly
    label = rng.integers(0, 3, image.shape[:2], dtype=np.uint8)
    assert save_to_voc_dataset(tmp_path, "a", image, label) == 1
    assert save_to_voc_dataset(tmp_path, "b", image, label) == 2
    written = Image.open(tmp_path / "JPEGImages" / "a.jpg")
    assert written.format == "JPEG" and not (tmp_path / "JPEGImages" / "a.png").exists()
    assert np.abs(np.asarray(written).astype(int) - image).mean() < 3  # quality 95
    saved = Image.open(tmp_path / "SegmentationClass" / "a.png")
    assert saved.mode == "P"
    np.testing.assert_array_equal(np.asarray(saved), label)
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text() == "a\nb\n"

    before = (tmp_path / "JPEGImages" / "a.jpg").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_to_voc_dataset(tmp_path, "a", image[::-1].copy(), label)
    assert (tmp_path / "JPEGImages" / "a.jpg").read_bytes() == before
    # an overwrite counts the image once, in the folder and in the split
    assert save_to_voc_dataset(tmp_path, "a", image[::-1].copy(), label, overwrite=True) == 2
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text() == "a\nb\n"
    assert (tmp_path / "JPEGImages" / "a.jpg").read_bytes() != before
    # a JPEG upload is kept byte for byte: no second lossy generation
    original = (tmp_path / "JPEGImages" / "b.jpg").read_bytes()
    assert save_to_voc_dataset(tmp_path, "c", image, label, jpeg_bytes=original) == 3
    assert (tmp_path / "JPEGImages" / "c.jpg").read_bytes() == original

    with pytest.raises(ValueError, match="plain file name"):
        save_to_voc_dataset(tmp_path, "../escape", image, label)
    with pytest.raises(ValueError, match="does not match"):
        save_to_voc_dataset(tmp_path, "d", image, label[:5])
    assert not list(tmp_path.glob("**/.*.tmp"))
