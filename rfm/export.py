"""Exports that drop into weakly-supervised segmentation training.

Formats (REFERENCE §2.4, §2.5, §7.5):

- VOC palette PNG: indexed 'P' image, pixel value = class index (0 background,
  vocabulary index + 1 for classes, 255 ignore).
- CLIP-ES ``.npy``: a pickled dict ``{"keys": (K,) int, "attn_highres": (K, H, W) float16}``.
- COCO JSON: one iscrowd=1 annotation per present class with compressed RLE.

Every file goes through :func:`rfm.fileio.atomic_write`: written to a temporary name in the
target folder, fsynced, then moved into place, and never overwriting unless asked.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image

from .constants import IGNORE_INDEX, STRIP_ROWS
from .fileio import atomic_write, exists_message, save_json

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "coco_document",
    "coco_rle_encode",
    "label_to_coco",
    "save_cams_npy",
    "save_coco_json",
    "save_label_png",
    "save_to_voc_dataset",
    "Rows",
    "voc_palette",
]



def voc_palette() -> np.ndarray:
    """The 256-entry PASCAL VOC colormap, (256, 3) uint8.

    Bit-interleaved: bit b of the index goes to bit 7 - b//3 of channel b % 3,
    so 1 = (128, 0, 0), 2 = (0, 128, 0), 15 (person) = (192, 128, 128) and
    255 (ignore) = (224, 224, 192).
    """
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            palette[:, channel] |= (bit << (7 - shift)).astype(np.uint8)
    return palette


@dataclass(frozen=True)
class Rows:
    """A map made strip by strip, so a writer never holds all of it: ``read(start, stop)`` returns rows
    start..stop, (stop − start, W) for an (H, W) map or (K, stop − start, W) for a (K, H, W) one."""

    shape: tuple[int, ...]
    read: Callable[[int, int], np.ndarray]

    @classmethod
    def of(cls, array: np.ndarray) -> "Rows":
        """Rows of an array that is already in memory."""
        return cls(array.shape, lambda a, b: array[a:b] if array.ndim == 2 else array[:, a:b])

    def strips(self, rows: int = STRIP_ROWS):
        height = self.shape[-2]
        for start in range(0, height, rows):
            yield self.read(start, min(height, start + rows))

    def whole(self) -> np.ndarray:
        """All rows as one array (for consumers that need the whole map, such as column-major RLE)."""
        return self.read(0, self.shape[-2])


def save_label_png(label: np.ndarray | Rows, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save an (H, W) class-index map (or its ``Rows``) as an indexed VOC-palette PNG; values are kept as is.

    Written strip by strip (filter type 0, one zlib stream), so a label of any size costs one strip
    of memory.
    """
    rows = Rows.of(_as_label(label)) if isinstance(label, np.ndarray) else label
    if len(rows.shape) != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {rows.shape}")
    return atomic_write(path, lambda f: _write_palette_png(f, rows, voc_palette()), overwrite)


def _write_palette_png(f, rows: Rows, palette: np.ndarray) -> None:
    height, width = rows.shape
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)))  # 8-bit palette
    f.write(_png_chunk(b"PLTE", palette.astype(np.uint8).tobytes()))
    stream = zlib.compressobj(6)
    for strip in rows.strips():
        strip = _as_label(strip)
        data = stream.compress(np.concatenate([np.zeros((len(strip), 1), np.uint8), strip], axis=1).tobytes())
        if data:
            f.write(_png_chunk(b"IDAT", data))
    f.write(_png_chunk(b"IDAT", stream.flush()))
    f.write(_png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """length, type, data, CRC-32 of type + data (PNG spec §5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _as_label(label: np.ndarray) -> np.ndarray:
    """Validate an (H, W) integer label map with values in 0..255 and return it as uint8."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    if label.dtype == np.uint8:
        return label
    if not np.issubdtype(label.dtype, np.integer) and label.dtype != bool:
        raise TypeError(f"label must hold integers, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    return label.astype(np.uint8)


def save_cams_npy(
    path: str | os.PathLike,
    keys: Sequence[int] | np.ndarray,
    cams: np.ndarray | Rows,
    overwrite: bool = False,
    **extra: np.ndarray | Rows,
) -> Path:
    """Save CAMs as CLIP-ES does: ``{"keys": (K,) int64, "attn_highres": (K, H, W) float16, **extra}``.

    ``keys`` are 0-based class ids. Floating ``extra`` arrays (e.g. ``highres`` = the initial
    CAM) are stored as float16 like CLIP-ES's own commented-out ``highres`` entry. Read back
    with ``np.load(path, allow_pickle=True).item()``. The file is written at ``path`` exactly
    (no ``.npy`` suffix is added). Maps are converted and written strip by strip (the same opcodes
    as ``np.save``'s pickle, without its memo entries), so ``Rows`` never need a whole map in memory.
    """
    keys = np.asarray(keys)
    if keys.ndim != 1 or not (keys.size == 0 or np.issubdtype(keys.dtype, np.integer)):
        raise ValueError(f"keys must be a 1-D array of integer class ids, got {keys.dtype} {keys.shape}")
    if len(cams.shape) != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {keys.size}, got {cams.shape}")
    if "attn_highres" in extra:
        raise ValueError("'attn_highres' is written from cams; pass it as cams, not as an extra")
    record: dict = {"keys": keys.astype(np.int64), "attn_highres": _StripArray(cams, np.float16)}
    for name, value in extra.items():
        if isinstance(value, Rows) or np.issubdtype(np.asarray(value).dtype, np.floating):
            record[name] = _StripArray(value, np.float16)
        else:
            record[name] = np.asarray(value)
    return atomic_write(path, lambda f: _write_npy_dict(f, record), overwrite)


class _StripArray:
    """An array pickled the way ndarray pickles itself, its data converted and written strip by strip."""

    def __init__(self, source: np.ndarray | Rows, dtype):
        self.rows = source if isinstance(source, Rows) else Rows.of(np.asarray(source))
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.rows.shape)) * self.dtype.itemsize

    def chunks(self):
        """The C-order bytes: a (K, H, W) map is written class by class, each class strip by strip."""
        shape = self.rows.shape
        if len(shape) == 2:
            for strip in self.rows.strips():
                yield np.ascontiguousarray(strip, dtype=self.dtype).tobytes()
            return
        for k in range(shape[0]):
            for strip in Rows(shape[1:], lambda a, b, k=k: self.rows.read(a, b)[k]).strips():
                yield np.ascontiguousarray(strip, dtype=self.dtype).tobytes()


class _StreamingPickler(pickle._Pickler):
    """Protocol-3 pickler (what np.save uses) that writes a _StripArray's bytes as they are made.

    The opcodes are those of ndarray's own reduction, _reconstruct(ndarray, (0,), b'b') then
    BUILD with (1, shape, dtype, False, data), so np.load and rfm.data.load_npy_dict read it.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_strip_array(self, obj: _StripArray) -> None:
        self.save_reduce(_np_reconstruct, (np.ndarray, (0,), b"b"),
                         state=(1, tuple(obj.rows.shape), obj.dtype, False, _StripBytes(obj)))

    def save_strip_bytes(self, obj: "_StripBytes") -> None:
        size = obj.array.nbytes
        if size >= 1 << 32:
            raise ValueError(f"a CAM entry of {size / 2**30:.1f} GiB does not fit a protocol-3 .npy (limit 4 GiB); "
                             f"lower --max-side or export fewer classes per file")
        self.write(pickle.BINBYTES + struct.pack("<I", size))
        for chunk in obj.array.chunks():
            self.write(chunk)

    dispatch[_StripArray] = save_strip_array


class _StripBytes:
    def __init__(self, array: _StripArray):
        self.array = array


_StreamingPickler.dispatch[_StripBytes] = _StreamingPickler.save_strip_bytes


def _write_npy_dict(f, record: dict) -> None:
    """What np.save(f, record, allow_pickle=True) writes: a 0-d object array's header, then its pickle."""
    npy_format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
    scalar = np.empty((), dtype=object)
    scalar[()] = record
    _StreamingPickler(f, protocol=3).dump(scalar)


def coco_rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) binary mask: ``{"size": [H, W], "counts": str}``.

    Same result as ``pycocotools.mask.encode(np.asfortranarray(mask))`` with ``counts``
    decoded to str: alternating run lengths in column-major order, starting with a
    (possibly empty) run of zeros.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    height, width = mask.shape
    return {"size": [height, width], "counts": _rle_string(_run_lengths(mask.astype(bool)))}


def _run_lengths(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a bool (H, W) mask, the first run counting zeros."""
    flat = mask.ravel(order="F")
    if flat.size == 0:
        return [0]  # pycocotools writes one empty zero-run for a 0-pixel mask
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _rle_string(counts: list[int]) -> str:
    """pycocotools' ``rleToString``: each count (minus the count two before it, from the
    fourth on) as little-endian signed 5-bit groups, 0x20 = more groups follow, plus 48."""
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative deltas end at -1, not 0
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(chars)


def label_to_coco(
    label: np.ndarray,
    class_indices: Sequence[int],
    category_ids: Sequence[int] | None = None,
    image_id: int = 0,
) -> list[dict]:
    """COCO annotations for one label map: one iscrowd=1 RLE annotation per present class.

    ``class_indices`` are 0-based vocabulary indices; class c is the pixels equal to c + 1
    (background 0 and ignore 255 never become annotations). ``category_ids`` gives the
    COCO category id for each entry of ``class_indices`` (default: index + 1, the label
    value). Annotations carry no ``id``; :func:`coco_document` numbers them.
    """
    label = _as_label(label)
    class_indices = [int(c) for c in class_indices]
    if category_ids is None:
        category_ids = [c + 1 for c in class_indices]
    if len(category_ids) != len(class_indices):
        raise ValueError(
            f"category_ids has {len(category_ids)} entries for {len(class_indices)} class_indices"
        )
    annotations = []
    for index, category_id in zip(class_indices, category_ids):
        if not 0 <= index + 1 < IGNORE_INDEX:
            raise ValueError(f"class index {index} does not fit a uint8 label (0..253)")
        mask = label == index + 1
        if mask.any():
            annotations.append(_annotation(mask, int(category_id), image_id))
    return annotations


def _annotation(mask: np.ndarray, category_id: int, image_id: int) -> dict:
    """One iscrowd=1 annotation for a non-empty (H, W) bool mask; bbox as pycocotools' toBbox."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": coco_rle_encode(mask),
        "area": int(mask.sum()),
        "bbox": [float(x), float(y), float(cols[-1] - x + 1), float(rows[-1] - y + 1)],
        "iscrowd": 1,
    }


def coco_document(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """Assemble a COCO file: ``{"images", "annotations", "categories"}``.

    Annotations are copied and given ids 1..n in order, so annotations from
    :func:`label_to_coco` calls on different images get unique ids. Every annotation's
    ``image_id`` and ``category_id`` must refer to an entry of ``images`` / ``categories``.
    """
    image_ids = {image["id"] for image in images}
    category_ids = {category["id"] for category in categories}
    numbered = []
    for number, annotation in enumerate(annotations, start=1):
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"annotation {number} refers to unknown image_id {annotation['image_id']}")
        if annotation["category_id"] not in category_ids:
            raise ValueError(
                f"annotation {number} refers to unknown category_id {annotation['category_id']}"
            )
        numbered.append({**annotation, "id": number})
    return {"images": list(images), "annotations": numbered, "categories": list(categories)}


def save_coco_json(document: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a COCO document (see :func:`coco_document`) as compact UTF-8 JSON."""
    return save_json(document, path, overwrite, indent=None)


_SPLIT_LOCK = threading.Lock()


def save_to_voc_dataset(root: str | os.PathLike, stem: str, image: np.ndarray, label: np.ndarray,
                        overwrite: bool = False, jpeg_bytes: bytes | None = None, split: str = "train") -> int:
    """Add an image and its pseudo label to a VOC-layout folder; returns how many labelled images it holds.

    Writes ``root/JPEGImages/<stem>.jpg`` (``jpeg_bytes`` as they are when the image came as a JPEG
    file, so no generation is lost; else the pixels encoded at quality 95), ``root/SegmentationClass/
    <stem>.png`` (VOC palette) and appends ``stem`` to ``root/ImageSets/Segmentation/<split>.txt``
    once. Both targets are checked before either is written, so an existing pair is left whole
    unless ``overwrite``.
    """
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise ValueError(f"{stem!r} is not a plain file name")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if np.asarray(label).shape != image.shape[:2]:
        raise ValueError(f"label {np.asarray(label).shape} does not match the image's size {image.shape[:2]}")
    root = Path(root)
    image_path = root / "JPEGImages" / f"{stem}.jpg"
    label_path = root / "SegmentationClass" / f"{stem}.png"
    if not overwrite:
        for path in (image_path, label_path):
            if path.exists():
                raise FileExistsError(exists_message(path))
    save_label_png(label, label_path, overwrite=overwrite)
    if jpeg_bytes is not None:
        atomic_write(image_path, lambda f: f.write(jpeg_bytes), overwrite)
    else:
        atomic_write(image_path, lambda f: Image.fromarray(image).save(f, format="JPEG", quality=95), overwrite)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    with _SPLIT_LOCK:  # read-modify-write: two sessions adding at once must not drop a line
        listed = split_file.read_text().split() if split_file.is_file() else []
        if stem not in listed:
            atomic_write(split_file, lambda f: f.write("".join(f"{s}\n" for s in [*listed, stem]).encode()), True)
    images = {p.stem for p in (root / "JPEGImages").iterdir() if p.is_file() and not p.name.startswith(".")}
    return sum(1 for p in (root / "SegmentationClass").glob("*.png") if p.stem in images)
