"""Reading images into the (H, W, 3) uint8 RGB arrays the pipeline takes, with clear errors."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own bomb limit (2 × 89 MP) stays; this names it in our error message.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


class ImageError(ValueError):
    """An image that cannot be used, with the reason in words."""


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image file Pillow knows into (H, W, 3) uint8 RGB, EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here rather than later
                return pil_to_rgb(img)
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: image is larger than {MAX_PIXELS} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: cannot decode image ({err})") from None


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
