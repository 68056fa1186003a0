"""Reading images into the (H, W, 3) uint8 RGB arrays the pipeline takes, with clear errors."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pickle

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own bomb limit (2 × 89 MP) stays; this names it in our error message.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


class ImageError(ValueError):
    """An image that cannot be used, with the reason in words."""


@dataclass(frozen=True)
class ImageFile:
    """An image file read into the pipeline's pixels, with what the conversion did in words."""

    rgb: np.ndarray  # (h, w, 3) uint8 RGB, EXIF orientation applied; smaller than ``size`` when decoded reduced
    format: str | None  # Pillow's name of the file format ("JPEG", "PNG", …)
    notes: tuple[str, ...]  # conversions a user should know of (16-bit, CMYK, palette, rotation, alpha)
    size: tuple[int, int] = (0, 0)  # (H, W) of the full image, EXIF orientation applied

    def __post_init__(self):
        if self.size == (0, 0):
            object.__setattr__(self, "size", tuple(self.rgb.shape[:2]))


# EXIF orientation tag values → what exif_transpose does to show the photo upright
_ORIENTATIONS = {2: "mirrored", 3: "turned 180°", 4: "flipped vertically", 5: "mirrored and turned 90°",
                 6: "turned 90° clockwise", 7: "mirrored and turned 90°", 8: "turned 90° anticlockwise"}
_TRANSPOSING = (5, 6, 7, 8)  # orientations whose upright image swaps width and height

# Pixels kept beyond max_side when decoding reduced: the network input rounds each side up to a
# whole patch (≤ 15 px for ViT-B/16), so the reduced pixels must still cover it.
REDUCE_MARGIN = 32


def read_image(path: str | os.PathLike, max_side: int | None = None) -> ImageFile:
    """Read any image file Pillow knows into (H, W, 3) uint8 RGB, with a clear :class:`ImageError`
    for empty, unreadable, truncated or oversized files and a note for every lossy conversion.

    ``max_side``: the pipeline will scale the image to this long side, so a JPEG larger than twice
    that is decoded reduced in the DCT domain (``Image.draft``: 1/2, 1/4 or 1/8, never below
    max_side + REDUCE_MARGIN), and memory follows max_side instead of the file's resolution.
    ``size`` keeps the full (H, W) for outputs at image size.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                orientation = img.getexif().get(0x0112, 1)
                width, height = img.size
                size = (width, height) if orientation in _TRANSPOSING else (height, width)
                if max_side is not None and img.format == "JPEG":
                    img.draft(img.mode, _draft_request(img.size, max_side))
                img.load()  # decode now: truncated files fail here rather than later
                notes = _conversion_notes(img, path)
                return ImageFile(pil_to_rgb(img), img.format, notes, size)
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: the image has more than {MAX_PIXELS} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        if "truncated" in str(err):
            raise ImageError(f"{path}: the file is truncated (cut off before the end of the image)") from None
        raise ImageError(f"{path}: cannot decode the image ({err})") from None


def _draft_request(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) the reduced decode must at least have: each side scaled to max_side, plus the margin."""
    s = min(1.0, max_side / max(size))
    return tuple(min(side, math.ceil(side * s) + REDUCE_MARGIN) for side in size)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image file Pillow knows into (H, W, 3) uint8 RGB, EXIF orientation applied."""
    return read_image(path).rgb


def _conversion_notes(img: Image.Image, path: Path) -> tuple[str, ...]:
    notes = []
    if img.mode.startswith("I;16") or _png_bit_depth(path) == 16:
        notes.append("16-bit image: reduced to 8 bits per channel (scaled, not clipped)")
    elif img.mode in ("I", "F"):
        notes.append(f"{'32-bit integer' if img.mode == 'I' else 'floating-point'} image: scaled by its range to "
                     f"8 bits")
    if img.mode == "CMYK":
        notes.append("CMYK image: converted to RGB")
    if img.mode in ("P", "PA"):
        notes.append("palette image: converted to RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        notes.append("transparency dropped (the pipeline sees the colours under it)")
    orientation = img.getexif().get(0x0112, 1)
    if orientation in _ORIENTATIONS:
        notes.append(f"EXIF orientation applied: the photo is {_ORIENTATIONS[orientation]}, as viewers show it")
    return tuple(notes)


def _png_bit_depth(path: Path) -> int | None:
    """Bits per sample from a PNG's IHDR (Pillow opens 48-bit RGB as 8-bit 'RGB' without saying so)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else None


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, I, F, …) → (H, W, 3) uint8 RGB.

    EXIF rotation is applied; alpha is dropped (as CLIP-ES's convert('RGB') does); 16-bit and
    32-bit grey images are scaled by their range rather than clipped.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def to_rgb_array(image) -> np.ndarray:
    """Accept a PIL image, a path, or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or uint16."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image array, PIL image or path, got {type(image).__name__}")
    arr = image
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif arr.dtype == bool or arr.dtype.kind == "f":
        raise ImageError(f"expected uint8 pixel values, got {arr.dtype}; convert with (x * 255).astype(np.uint8)")
    elif arr.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixel values, got {arr.dtype}")
    arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(arr[..., :3])


# ---------------------------------------------------------------- datasets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its image-level labels."""

    stem: str
    image: Path
    labels: tuple[int, ...]  # 0-based vocabulary indices, in the dataset's order
    gt: Path | None = None  # ground-truth mask, when the dataset has one
    image_id: int | None = None  # the COCO image id, for COCO datasets


def image_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{stem: path} of the images in a folder, whatever their extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if p.stem in files:
                raise ValueError(f"two images share the name {p.stem!r} in {folder}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    return files


def read_split(path: str | os.PathLike) -> list[str]:
    """Stems listed in a split file: one per line, either a bare stem or a path (first column)."""
    stems = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            stems.append(Path(line.split()[0]).stem)
    return stems


def mask_labels(path: str | os.PathLike) -> tuple[int, ...]:
    """Image-level labels of a VOC mask: the class values present, background 0 and ignore 255 excluded, −1."""
    values = np.unique(np.asarray(Image.open(path)))
    return tuple(int(v) - 1 for v in values if 0 < v < 255)


def xml_labels(path: str | os.PathLike, vocab) -> tuple[int, ...]:
    """Image-level labels from a VOC annotation XML, in first-seen order.

    Only each <object>'s own <name> counts: person-layout <part> elements (head, hand, foot) have
    names too.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path}: cannot read annotation XML ({err})") from None
    labels: list[int] = []
    for obj in root.findall("object"):
        try:
            index = vocab.index((obj.findtext("name") or "").strip())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if index not in labels:
            labels.append(index)
    return tuple(labels)


def voc_samples(root: str | os.PathLike, split: str | os.PathLike | None = None, labels_from: str = "xml",
                vocab=None) -> list[Sample]:
    """Samples of a VOC devkit folder (JPEGImages/, Annotations/, SegmentationClass[Aug]/).

    labels_from: "xml" (Annotations/<stem>.xml, as CLIP-ES does), "mask" (classes present in the
    segmentation mask, as WeCLIP's model does), or "npy:FILE" (a cls_labels dict {stem: one-hot},
    as AFA and WeCLIP ship). Without a split every image of JPEGImages/ is used.
    """
    from .text import VOC

    vocab = vocab or VOC
    root = Path(root)
    images = image_files(root / "JPEGImages")
    stems = read_split(split) if split else list(images)
    gt_dirs = [d for d in (root / "SegmentationClassAug", root / "SegmentationClass") if d.is_dir()]
    onehots = None
    if labels_from.startswith("npy:"):
        onehots = load_npy_dict(labels_from[4:])
    elif labels_from not in ("xml", "mask"):
        raise ValueError(f"labels_from must be 'xml', 'mask' or 'npy:FILE', got {labels_from!r}")
    if labels_from == "xml" and not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root} has no Annotations/ folder; choose --labels-from mask or npy:FILE")
    samples = []
    for stem in stems:
        if stem not in images:
            raise FileNotFoundError(f"{stem} is listed in the split but not in {root / 'JPEGImages'}")
        gt = next((d / f"{stem}.png" for d in gt_dirs if (d / f"{stem}.png").is_file()), None)
        if labels_from == "mask":
            if gt is None:
                raise FileNotFoundError(f"no segmentation mask for {stem} in {root} (needed by --labels-from mask)")
            labels = mask_labels(gt)
        elif labels_from == "xml":
            labels = xml_labels(root / "Annotations" / f"{stem}.xml", vocab)
        else:
            if stem not in onehots:
                raise ValueError(f"{labels_from[4:]}: no entry for {stem!r} (listed in "
                                 f"{split or root / 'JPEGImages'})")
            labels = tuple(int(i) for i in np.flatnonzero(np.asarray(onehots[stem]) > 0))
            if labels and labels[-1] >= len(vocab):
                raise ValueError(f"{labels_from[4:]}: the entry of {stem!r} has class {labels[-1]}, outside the "
                                 f"{len(vocab)} classes of {vocab.name}")
        samples.append(Sample(stem, images[stem], labels, gt))
    return samples


def folder_samples(images_dir: str | os.PathLike, labels_file: str | os.PathLike, vocab) -> list[Sample]:
    """Samples of a plain image folder with labels from a CSV (`image,labels`, labels separated by
    ';', '|' or spaces) or JSON file ({"img.jpg": ["cat", "dog"]} or [{"image": …, "labels": […]}])."""
    images = image_files(images_dir)
    labels_file = Path(labels_file)
    rows = _json_label_rows(labels_file) if labels_file.suffix.lower() == ".json" else _csv_label_rows(labels_file)
    samples = []
    for where, name, labels in rows:
        stem = Path(str(name).strip()).stem
        if stem not in images:
            listed = Path(images_dir) / str(name).strip()
            why = (f"its extension is not one of {', '.join(IMAGE_EXTENSIONS)}" if listed.is_file()
                   else f"it is not in {images_dir}")
            raise FileNotFoundError(f"{where}: {name} cannot be used: {why}")
        if isinstance(labels, str):
            labels = [t for t in labels.replace(";", " ").replace("|", " ").split() if t]
        indices = []
        for label in labels:
            try:
                i = vocab.index(int(label) if str(label).isdigit() else str(label).replace("_", " "))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if i not in indices:
                indices.append(i)
        samples.append(Sample(stem, images[stem], tuple(indices)))
    return samples


def _csv_label_rows(path: Path) -> list[tuple[str, str, str]]:
    """(where, image, labels) of every row of an `image,labels` CSV; where = 'FILE row N'."""
    import csv

    with path.open(newline="") as f:
        rows = [(f"{path} row {n}", r[0], r[1] if len(r) > 1 else "")
                for n, r in enumerate(csv.reader(f), start=1) if r and r[0].strip()]
    if rows and rows[0][1].strip().lower() in ("image", "file", "filename"):
        rows = rows[1:]
    return rows


def _json_label_rows(path: Path) -> list[tuple[str, str, list]]:
    """(where, image, labels) of a labels JSON: {"a.jpg": [...]} or [{"image": ..., "labels": [...]}]."""
    data = read_json(path)
    if isinstance(data, dict):
        entries = [(f"{path} entry {name!r}", name, labels) for name, labels in data.items()]
    elif isinstance(data, list):
        entries = []
        for n, item in enumerate(data):
            if not isinstance(item, dict) or "image" not in item or "labels" not in item:
                raise ValueError(f"{path} item {n}: expected {{\"image\": …, \"labels\": […]}}, got {item!r:.80}")
            entries.append((f"{path} item {n}", item["image"], item["labels"]))
    else:
        raise ValueError(f"{path}: expected an object {{image: labels}} or a list of {{image, labels}} items")
    for where, name, labels in entries:
        if not isinstance(name, str) or not isinstance(labels, (str, list)) or \
                (isinstance(labels, list) and not all(isinstance(v, (str, int)) for v in labels)):
            raise ValueError(f"{where}: expected an image name and a list of class names, got {labels!r:.80}")
    return entries


def read_json(path: str | os.PathLike):
    """A JSON file's content; invalid JSON or text is a ValueError naming the file and the position."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def coco_samples(annotations: str | os.PathLike, images_dir: str | os.PathLike) -> list[Sample]:
    """Samples of a COCO instances JSON: labels are the categories annotated on each image."""
    from .text import COCO_CATEGORY_IDS

    doc = read_json(annotations)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or \
            not isinstance(doc.get("annotations", []), list):
        raise ValueError(f"{annotations}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    index_of = {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)}
    images = []
    for n, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or \
                not isinstance(img.get("id"), int) or isinstance(img.get("id"), bool):
            raise ValueError(f"{annotations}: images[{n}] needs an integer 'id' and a 'file_name', got {img!r:.80}")
        images.append(img)
    per_image: dict[int, list[int]] = {img["id"]: [] for img in images}
    for n, ann in enumerate(doc.get("annotations", [])):
        if not isinstance(ann, dict) or "category_id" not in ann or "image_id" not in ann:
            raise ValueError(f"{annotations}: annotations[{n}] needs 'image_id' and 'category_id', got {ann!r:.80}")
        i = index_of.get(ann["category_id"])
        if i is None:
            raise ValueError(f"{annotations}: annotations[{n}]: category_id {ann['category_id']!r} is not one of "
                             f"COCO's 80 categories")
        if ann["image_id"] not in per_image:
            raise ValueError(f"{annotations}: annotations[{n}] refers to image_id {ann['image_id']!r}, "
                             f"which 'images' does not list")
        labels = per_image[ann["image_id"]]
        if i not in labels:
            labels.append(i)
    images_dir = Path(images_dir)
    return [Sample(Path(img["file_name"]).stem, images_dir / img["file_name"], tuple(sorted(per_image[img["id"]])),
                   image_id=int(img["id"])) for img in images]


# ---------------------------------------------------------------- .npy dicts without pickle code

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# Everything np.save's pickle of a dict of numeric arrays refers to (found with
# pickletools.genops on np.save(f, {"keys": int64, "attn_highres": float16, ...})): the 0-d
# object array around the dict and every value are rebuilt by _reconstruct(ndarray, shape, dtype)
# plus BUILD, dtypes by dtype(str, align, copy). NumPy 1.x writes the module as numpy.core.*,
# NumPy 2 as numpy._core.*. Nothing from builtins is needed (dict and str have their own opcodes).
# The objects are returned from this table; find_class never imports anything.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Forbidden(pickle.UnpicklingError):
    """A pickle asked for something a dict of arrays never needs."""


class _ArrayDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in :data:`_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Forbidden(f"global '{module}.{name}' is not allowed") from None

    def persistent_load(self, pid):
        raise _Forbidden("persistent ids are not allowed")


def load_npy_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.npy`` holding a dict of arrays (CLIP-ES CAMs, AFA/WeCLIP cls_labels) without ``allow_pickle=True``.

    The header is parsed with :mod:`numpy.lib.format`; it must describe a 0-d object array
    (what ``np.save(path, {...})`` writes). The payload is unpickled with a restricted
    :class:`pickle.Unpickler` that can only build ndarrays and dtypes, so a hostile file cannot
    run code. The result must be a dict of str → non-object ndarray.
    Raises :class:`ValueError` for anything else (plain arrays, other objects, forbidden globals).
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as err:
            raise ValueError(f"{path}: not a valid .npy file ({err})") from None
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(
                f"{path}: holds a plain {dtype} array of shape {shape}, not a dict of arrays saved with np.save"
            )
        try:
            obj = _ArrayDictUnpickler(f).load()
        except _Forbidden as err:
            raise ValueError(f"{path}: refused to load: {err}") from None
        except Exception as err:  # truncated or malformed payloads raise all sorts of errors
            raise ValueError(f"{path}: corrupt pickle payload ({type(err).__name__}: {err})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of arrays")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"{path}: entry {key!r} is {kind}, expected a numeric array")
    return obj
