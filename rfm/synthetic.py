"""Generated scenes whose ground truth is known: the world the built-in CLIP is trained on.

A scene is a procedural background (one of ``BACKGROUNDS``) with clutter and 1–3 objects from
``CLASSES``, each a sprite of coloured, shaded parts, rotated, scaled to 3–50 % of the image and
pasted with a soft shadow; later objects occlude earlier ones. The hard parts of VOC are built in
on purpose: classes share colours (ball, kite, umbrella and flower draw from one palette, so shape
decides), classes prefer a background (boat and fish on water, car on road: the reason CLIP-ES
uses background words), thin parts (masts, kite strings, chair legs, stems), unlabelled clutter,
and sometimes two objects of one class. The mask is VOC's: 0 background, class index + 1, and a
255 band along every object's outline.

Everything is numpy and OpenCV, drawn from ``numpy.random.default_rng([seed, index])``, so a
scene is a pure function of (seed, index, size).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

CLASSES = ("ball", "boat", "car", "tree", "house", "fish", "bird", "flower", "kite", "umbrella", "chair",
           "snowman")
BACKGROUNDS = ("grass", "sky", "water", "sand", "brick wall", "wooden floor", "snow", "road")

# Where each class is usually found; a scene's first object picks its background from here 70 % of the time.
HABITAT = {
    "ball": ("grass", "sand", "wooden floor"), "boat": ("water",), "car": ("road",), "tree": ("grass", "snow"),
    "house": ("grass", "snow", "road"), "fish": ("water",), "bird": ("sky",), "flower": ("grass",),
    "kite": ("sky",), "umbrella": ("sand",), "chair": ("wooden floor", "brick wall"), "snowman": ("snow",),
}

# One palette shared by every class, so colour alone never names a class.
PALETTE = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (235, 205, 50), "green": (60, 150, 60),
    "blue": (40, 80, 200), "purple": (130, 60, 170), "pink": (235, 130, 170), "white": (235, 235, 235),
    "brown": (120, 75, 40), "black": (40, 40, 45),
}

IGNORE = 255


@dataclass(frozen=True)
class SceneObject:
    """One pasted object: its class index, colour word, and box (x0, y0, x1, y1) of its visible pixels."""

    cls: int
    colour: str
    box: tuple[int, int, int, int]
    visible: int  # visible pixels


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8: 0 background, class index + 1, 255 outline band
    background: str
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def labels(self) -> tuple[int, ...]:
        """Class indices present, in first-pasted order."""
        seen: list[int] = []
        for o in self.objects:
            if o.cls not in seen:
                seen.append(o.cls)
        return tuple(seen)


# ---------------------------------------------------------------- textures


def fractal_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, ...] = (4, 8, 16, 32),
                  falloff: float = 0.6) -> np.ndarray:
    """(h, w) float32 noise, roughly in [−1, 1]: random grids of ``cells`` across the long side, upsampled
    bicubically and summed with weights falloff^k."""
    out = np.zeros((h, w), np.float32)
    total = 0.0
    for k, c in enumerate(cells):
        gh, gw = max(2, round(c * h / max(h, w))), max(2, round(c * w / max(h, w)))
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        out += falloff ** k * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += falloff ** k
    return out / total


def _jitter(rng, rgb, amount: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def _shade(base: np.ndarray, field_: np.ndarray, strength: float) -> np.ndarray:
    """base (3,) · (1 + strength · field) → (h, w, 3)."""
    return base[None, None, :] * (1.0 + strength * field_[..., None])


def _grass(rng, h, w):
    img = _shade(_jitter(rng, (70, 140, 50), 15), fractal_noise(rng, h, w, (6, 24, 64)), 0.25)
    for _ in range(h * w // 120):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        length = int(rng.integers(3, 3 + max(4, h // 40)))
        dx = int(rng.integers(-2, 3))
        tone = float(rng.uniform(0.6, 1.35))
        cv2.line(img, (x, y), (x + dx, y - length), tuple(float(v) for v in img[y, x] * tone), 1)
    return img


def _sky(rng, h, w):
    top, bottom = _jitter(rng, (70, 130, 215), 15), _jitter(rng, (175, 210, 240), 10)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()
    clouds = np.clip((fractal_noise(rng, h, w, (3, 6, 12)) - rng.uniform(0.05, 0.35)) * 2.5, 0, 1)
    return img * (1 - clouds[..., None]) + 245 * clouds[..., None]


def _water(rng, h, w):
    img = _shade(_jitter(rng, (40, 100, 150), 15), fractal_noise(rng, h, w, (4, 12)), 0.2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.25, 0.6) * 64 / max(h, w) * 2 * math.pi
    waves = np.sin(yy * freq * 4 + 6 * fractal_noise(rng, h, w, (4, 8)) + xx * freq * 0.3)
    img *= 1 + 0.12 * waves[..., None]
    glints = (waves > 0.97) & (fractal_noise(rng, h, w, (16, 32)) > 0.3)
    img[glints] = 230
    return img


def _sand(rng, h, w):
    img = _shade(_jitter(rng, (215, 190, 140), 12), fractal_noise(rng, h, w, (8, 32, 128)), 0.12)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ripples = np.sin((yy + 0.3 * xx) * 2 * math.pi / max(6, h / 30) + 5 * fractal_noise(rng, h, w, (3, 6)))
    img *= 1 + 0.06 * ripples[..., None]
    img += rng.normal(0, 8, (h, w, 1)).astype(np.float32)
    return img


def _brick_wall(rng, h, w):
    mortar = _jitter(rng, (190, 185, 175), 10)
    img = np.broadcast_to(mortar, (h, w, 3)).copy()
    brick = _jitter(rng, (160, 70, 50), 20)
    bh = int(rng.integers(max(8, h // 20), max(10, h // 9)))
    bw = int(bh * rng.uniform(2.0, 3.0))
    gap = max(1, bh // 8)
    for row, y in enumerate(range(0, h, bh)):
        offset = (row % 2) * bw // 2
        for x in range(-offset, w, bw):
            cv2.rectangle(img, (x + gap, y + gap), (x + bw - gap, y + bh - gap),
                          tuple(float(v) for v in _jitter(rng, brick, 14)), -1)
    return _shade(np.ones(3, np.float32), fractal_noise(rng, h, w, (8, 48)), 0.15) * img


def _wooden_floor(rng, h, w):
    img = np.zeros((h, w, 3), np.float32)
    wood = _jitter(rng, (165, 115, 70), 18)
    pw = int(rng.integers(max(12, w // 12), max(14, w // 5)))
    xx = np.arange(w, dtype=np.float32)[None, :]
    grain_noise = fractal_noise(rng, h, w, (4, 16))
    for x0 in range(0, w, pw):
        plank = _jitter(rng, wood, 16)
        sl = slice(x0, min(w, x0 + pw))
        grain = np.sin(xx[:, sl] * rng.uniform(0.4, 0.9) + 8 * grain_noise[:, sl])
        img[:, sl] = plank * (1 + 0.12 * grain[..., None])
        img[:, x0:x0 + max(1, pw // 25)] *= 0.55
    return img


def _snow(rng, h, w):
    img = _shade(_jitter(rng, (235, 240, 250), 6), fractal_noise(rng, h, w, (3, 8, 32)), 0.06)
    img[..., 2] += 8 * np.clip(fractal_noise(rng, h, w, (4,)), 0, 1)
    sparkle = rng.random((h, w)) > 0.995
    img[sparkle] = 255
    return img


def _road(rng, h, w):
    img = _shade(_jitter(rng, (85, 85, 90), 10), fractal_noise(rng, h, w, (16, 64, 160)), 0.18)
    img += rng.normal(0, 10, (h, w, 1)).astype(np.float32)
    paint = (240, 240, 235) if rng.random() < 0.6 else (235, 200, 60)
    horizontal = rng.random() < 0.6
    c = int(rng.uniform(0.3, 0.7) * (h if horizontal else w))
    dash, thick = max(12, max(h, w) // 12), max(2, min(h, w) // 60)
    for s in range(int(rng.integers(0, dash)), max(h, w), 2 * dash):
        p0, p1 = ((s, c), (s + dash, c)) if horizontal else ((c, s), (c, s + dash))
        cv2.line(img, p0, p1, paint, thick)
    return img


BACKGROUND_PAINTERS: dict[str, Callable] = {
    "grass": _grass, "sky": _sky, "water": _water, "sand": _sand, "brick wall": _brick_wall,
    "wooden floor": _wooden_floor, "snow": _snow, "road": _road,
}


def _clutter(rng, img: np.ndarray) -> None:
    """Unlabelled small things on the background: pebbles, leaves, sticks, scraps of paint."""
    h, w = img.shape[:2]
    side = max(h, w)
    for _ in range(int(rng.integers(0, 14))):
        kind = rng.integers(4)
        x, y = int(rng.integers(w)), int(rng.integers(h))
        r = int(rng.uniform(0.008, 0.03) * side) + 1
        if kind == 0:  # pebble
            colour = _jitter(rng, (130, 125, 120), 30)
            cv2.ellipse(img, (x, y), (r, max(1, int(r * rng.uniform(0.5, 1)))), float(rng.uniform(0, 180)), 0, 360,
                        tuple(float(v) for v in colour), -1)
        elif kind == 1:  # leaf, in any palette colour: clutter shares colours with objects
            colour = _jitter(rng, PALETTE[str(rng.choice(list(PALETTE)))], 25)
            cv2.ellipse(img, (x, y), (r, max(1, r // 3)), float(rng.uniform(0, 180)), 0, 360,
                        tuple(float(v) for v in colour), -1)
        elif kind == 2:  # stick
            a = rng.uniform(0, math.pi)
            d = (int(3 * r * math.cos(a)), int(3 * r * math.sin(a)))
            cv2.line(img, (x - d[0], y - d[1]), (x + d[0], y + d[1]), tuple(float(v) for v in
                     _jitter(rng, (100, 70, 40), 20)), max(1, r // 4))
        else:  # scrap
            colour = _jitter(rng, PALETTE[str(rng.choice(list(PALETTE)))], 25)
            pts = (np.array([x, y]) + rng.normal(0, r, (4, 2))).astype(np.int32)
            cv2.fillPoly(img, [pts], tuple(float(v) for v in colour))


# ---------------------------------------------------------------- sprites


class Sprite:
    """An s × s canvas of coloured parts; each part is drawn into a uint8 mask by OpenCV, then filled
    with its colour under a shading gradient and texture noise."""

    def __init__(self, rng: np.random.Generator, s: int):
        self.s = s
        self.rgb = np.zeros((s, s, 3), np.float32)
        self.alpha = np.zeros((s, s), np.float32)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        a = rng.uniform(0, 2 * math.pi)
        self.light = 0.75 + 0.35 * (math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)) * 2
        self.texture = fractal_noise(rng, s, s, (4, 16))

    def part(self, draw: Callable[[np.ndarray], None], rgb, texture: float = 0.08) -> None:
        m = np.zeros((self.s, self.s), np.uint8)
        draw(m)
        on = m > 0
        colour = np.asarray(rgb, np.float32)[None, :] * (self.light[on] + texture * self.texture[on])[:, None]
        self.rgb[on] = colour
        self.alpha[on] = 1.0

    def p(self, u: float, v: float) -> tuple[int, int]:
        """Canvas point from unit coordinates."""
        return int(u * self.s), int(v * self.s)

    def r(self, u: float) -> int:
        return max(1, int(u * self.s))


def _poly(sp: Sprite, pts, rgb, texture: float = 0.08) -> None:
    arr = np.array([sp.p(u, v) for u, v in pts], np.int32)
    sp.part(lambda m: cv2.fillPoly(m, [arr], 255), rgb, texture)


def _ellipse(sp: Sprite, c, axes, rgb, angle: float = 0, texture: float = 0.08, start=0, end=360) -> None:
    sp.part(lambda m: cv2.ellipse(m, sp.p(*c), (sp.r(axes[0]), sp.r(axes[1])), angle, start, end, 255, -1),
            rgb, texture)


def _line(sp: Sprite, a, b, rgb, width: float) -> None:
    sp.part(lambda m: cv2.line(m, sp.p(*a), sp.p(*b), 255, sp.r(width)), rgb, 0.03)


def _ball(sp, rng, colour):
    _ellipse(sp, (0.5, 0.5), (0.45, 0.45), colour)
    if rng.random() < 0.6:  # a stripe or seam in a second palette colour
        other = _jitter(rng, PALETTE[str(rng.choice(list(PALETTE)))])
        _ellipse(sp, (0.5, 0.5), (0.45, 0.12), other, angle=float(rng.uniform(0, 180)))


def _boat(sp, rng, colour):
    _poly(sp, [(0.05, 0.62), (0.95, 0.62), (0.78, 0.88), (0.22, 0.88)], colour)
    _line(sp, (0.5, 0.62), (0.5, 0.08), (90, 60, 35), 0.018)
    if rng.random() < 0.85:
        _poly(sp, [(0.52, 0.1), (0.52, 0.56), (0.85, 0.56)], _jitter(rng, (240, 240, 235), 8), 0.04)
    if rng.random() < 0.5:
        _poly(sp, [(0.48, 0.16), (0.48, 0.56), (0.22, 0.56)], _jitter(rng, (240, 240, 235), 8), 0.04)


def _car(sp, rng, colour):
    _poly(sp, [(0.04, 0.45), (0.96, 0.45), (0.96, 0.72), (0.04, 0.72)], colour)
    _poly(sp, [(0.25, 0.45), (0.33, 0.25), (0.67, 0.25), (0.77, 0.45)], colour)
    glass = _jitter(rng, (170, 200, 220), 10)
    _poly(sp, [(0.31, 0.43), (0.36, 0.29), (0.49, 0.29), (0.49, 0.43)], glass, 0.02)
    _poly(sp, [(0.52, 0.43), (0.52, 0.29), (0.64, 0.29), (0.72, 0.43)], glass, 0.02)
    for x in (0.25, 0.75):
        _ellipse(sp, (x, 0.72), (0.1, 0.1), (30, 30, 30), texture=0.02)
        _ellipse(sp, (x, 0.72), (0.04, 0.04), (170, 170, 170), texture=0.02)


def _tree(sp, rng, colour):
    _poly(sp, [(0.45, 0.95), (0.55, 0.95), (0.54, 0.5), (0.46, 0.5)], _jitter(rng, PALETTE["brown"], 12), 0.15)
    green = _jitter(rng, (50, 120, 45), 15)
    if rng.random() < 0.5:  # round crown of several blobs
        for c, a in (((0.5, 0.32), 0.28), ((0.32, 0.42), 0.18), ((0.68, 0.42), 0.18)):
            _ellipse(sp, c, (a, a * 0.9), green, texture=0.25)
    else:  # conifer
        for y0, half in ((0.05, 0.18), (0.2, 0.28), (0.36, 0.38)):
            _poly(sp, [(0.5, y0), (0.5 + half, y0 + 0.3), (0.5 - half, y0 + 0.3)], green, 0.25)


def _house(sp, rng, colour):
    _poly(sp, [(0.15, 0.45), (0.85, 0.45), (0.85, 0.95), (0.15, 0.95)], colour, 0.1)
    _poly(sp, [(0.08, 0.47), (0.5, 0.1), (0.92, 0.47)], _jitter(rng, (150, 50, 40), 20), 0.12)
    _poly(sp, [(0.44, 0.95), (0.56, 0.95), (0.56, 0.72), (0.44, 0.72)], _jitter(rng, PALETTE["brown"]), 0.05)
    for x in (0.22, 0.64):
        _poly(sp, [(x, 0.55), (x + 0.14, 0.55), (x + 0.14, 0.67), (x, 0.67)], (190, 215, 235), 0.02)


def _fish(sp, rng, colour):
    _ellipse(sp, (0.42, 0.5), (0.34, 0.17), colour)
    _poly(sp, [(0.7, 0.5), (0.95, 0.3), (0.95, 0.7)], colour)
    _poly(sp, [(0.35, 0.35), (0.5, 0.2), (0.55, 0.36)], colour)
    _ellipse(sp, (0.2, 0.46), (0.035, 0.035), (20, 20, 20), texture=0.0)


def _bird(sp, rng, colour):
    _ellipse(sp, (0.5, 0.55), (0.26, 0.14), colour)
    _ellipse(sp, (0.24, 0.45), (0.09, 0.09), colour)
    _poly(sp, [(0.15, 0.44), (0.05, 0.47), (0.15, 0.49)], (235, 170, 40), 0.02)
    up = rng.random() < 0.5  # wings raised or swept
    _poly(sp, [(0.42, 0.52), (0.62, 0.52), (0.75, 0.1 if up else 0.42)], colour)
    _line(sp, (0.48, 0.68), (0.45, 0.88), (200, 140, 40), 0.012)
    _line(sp, (0.56, 0.68), (0.58, 0.88), (200, 140, 40), 0.012)


def _flower(sp, rng, colour):
    _line(sp, (0.5, 0.45), (0.5, 0.97), (50, 130, 50), 0.025)
    _ellipse(sp, (0.62, 0.75), (0.1, 0.04), (50, 130, 50), angle=-30)
    petals = int(rng.integers(5, 9))
    for k in range(petals):
        a = 2 * math.pi * k / petals
        _ellipse(sp, (0.5 + 0.15 * math.cos(a), 0.3 + 0.15 * math.sin(a)), (0.11, 0.06), colour,
                 angle=math.degrees(a))
    _ellipse(sp, (0.5, 0.3), (0.07, 0.07), _jitter(rng, (235, 200, 50)))


def _kite(sp, rng, colour):
    _poly(sp, [(0.5, 0.03), (0.78, 0.3), (0.5, 0.62), (0.22, 0.3)], colour)
    _line(sp, (0.5, 0.03), (0.5, 0.62), _jitter(rng, PALETTE["brown"]), 0.012)
    _line(sp, (0.22, 0.3), (0.78, 0.3), _jitter(rng, PALETTE["brown"]), 0.012)
    pts = [(0.5, 0.62), (0.42, 0.72), (0.55, 0.83), (0.45, 0.97)]
    for a, b in zip(pts, pts[1:]):
        _line(sp, a, b, (60, 60, 60), 0.01)
    for u, v in pts[1:]:
        _poly(sp, [(u - 0.05, v - 0.03), (u + 0.05, v + 0.03), (u + 0.05, v - 0.03), (u - 0.05, v + 0.03)],
              _jitter(rng, PALETTE[str(rng.choice(list(PALETTE)))]), 0.02)


def _umbrella(sp, rng, colour):
    _ellipse(sp, (0.5, 0.4), (0.45, 0.3), colour, start=180, end=360)
    other = _jitter(rng, PALETTE[str(rng.choice(list(PALETTE)))])
    for k in range(0, 6, 2):  # alternate panels
        _ellipse(sp, (0.5, 0.4), (0.45, 0.3), other, start=180 + 30 * k, end=210 + 30 * k)
    _line(sp, (0.5, 0.1), (0.5, 0.9), (70, 70, 70), 0.016)
    sp.part(lambda m: cv2.ellipse(m, sp.p(0.56, 0.9), (sp.r(0.06), sp.r(0.05)), 0, 0, 180, 255, sp.r(0.016)),
            (70, 70, 70), 0.0)


def _chair(sp, rng, colour):
    _poly(sp, [(0.25, 0.5), (0.75, 0.5), (0.75, 0.58), (0.25, 0.58)], colour)
    _poly(sp, [(0.25, 0.08), (0.34, 0.08), (0.34, 0.5), (0.25, 0.5)], colour)
    for y in (0.16, 0.3):
        _line(sp, (0.3, y), (0.3, y + 0.08), colour, 0.02)
    _poly(sp, [(0.25, 0.08), (0.34, 0.08), (0.34, 0.14), (0.25, 0.14)], colour)
    for x in (0.27, 0.73):
        _line(sp, (x, 0.58), (x, 0.95), colour, 0.03)


def _snowman(sp, rng, colour):
    white = _jitter(rng, (238, 238, 240), 6)
    _ellipse(sp, (0.5, 0.74), (0.24, 0.22), white, texture=0.04)
    _ellipse(sp, (0.5, 0.43), (0.17, 0.16), white, texture=0.04)
    _ellipse(sp, (0.5, 0.2), (0.12, 0.11), white, texture=0.04)
    _poly(sp, [(0.5, 0.2), (0.66, 0.22), (0.5, 0.24)], (235, 120, 30), 0.02)
    for y in (0.38, 0.46):
        _ellipse(sp, (0.5, y), (0.02, 0.02), (30, 30, 30), texture=0.0)
    _line(sp, (0.34, 0.42), (0.12, 0.3), (100, 70, 40), 0.015)
    _line(sp, (0.66, 0.42), (0.88, 0.3), (100, 70, 40), 0.015)
    if rng.random() < 0.6:  # a hat in the object's colour
        _poly(sp, [(0.38, 0.1), (0.62, 0.1), (0.62, 0.06), (0.38, 0.06)], colour)
        _poly(sp, [(0.43, 0.08), (0.57, 0.08), (0.57, -0.04), (0.43, -0.04)], colour)


SPRITES: dict[str, Callable] = {
    "ball": _ball, "boat": _boat, "car": _car, "tree": _tree, "house": _house, "fish": _fish, "bird": _bird,
    "flower": _flower, "kite": _kite, "umbrella": _umbrella, "chair": _chair, "snowman": _snowman,
}
# Classes that tilt freely; the rest stay roughly upright, as their photographs would.
_FREE_ROTATION = {"ball", "fish", "bird", "kite"}
# The colour word a caption uses when the class's look is fixed.
_FIXED_COLOUR = {"tree": "green", "snowman": "white"}


# ---------------------------------------------------------------- scenes


def scene_size(rng: np.random.Generator) -> tuple[int, int]:
    """(H, W): long side 320–512, short/long 0.6–1, landscape two times in three."""
    long = int(rng.integers(320, 513))
    short = int(round(long * rng.uniform(0.6, 1.0)))
    return (short, long) if rng.random() < 2 / 3 else (long, short)


def _choose_classes(rng) -> tuple[str, list[str]]:
    first = str(rng.choice(CLASSES))
    background = str(rng.choice(HABITAT[first])) if rng.random() < 0.7 else str(rng.choice(BACKGROUNDS))
    names = [first]
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    at_home = [c for c in CLASSES if background in HABITAT[c]]
    while len(names) < count:
        r = rng.random()
        if r < 0.15:
            names.append(str(rng.choice(names)))  # two of one class
        elif r < 0.5 and at_home:
            names.append(str(rng.choice(at_home)))
        else:
            names.append(str(rng.choice(CLASSES)))
    return background, names


def _render_sprite(rng, name: str, side: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(rgb (s, s, 3) float, alpha (s, s) float, colour word) of one object, rotated."""
    colour_word = _FIXED_COLOUR.get(name) or str(rng.choice(list(PALETTE)))
    sp = Sprite(rng, side)
    SPRITES[name](sp, rng, _jitter(rng, PALETTE[colour_word]))
    if rng.random() < 0.5:
        sp.rgb, sp.alpha = sp.rgb[:, ::-1].copy(), sp.alpha[:, ::-1].copy()
    angle = rng.uniform(-180, 180) if name in _FREE_ROTATION else rng.uniform(-20, 20)
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    rgb = cv2.warpAffine(sp.rgb, rot, (side, side), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(sp.alpha, rot, (side, side), flags=cv2.INTER_LINEAR)
    return rgb, alpha, colour_word


def _paste(canvas: np.ndarray, instance: np.ndarray, rgb, alpha, x: int, y: int, ident: int) -> None:
    """Alpha-blend a sprite at (x, y) (may hang over the edges) with a soft shadow; alpha > ½ owns the pixel."""
    h, w = canvas.shape[:2]
    s = alpha.shape[0]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + s), min(h, y + s)
    if x0 >= x1 or y0 >= y1:
        return
    sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    a = cv2.GaussianBlur(alpha, (3, 3), 0)[sub]
    # The shadow: the silhouette shifted down-right and blurred, darkening what lies under it.
    k = max(3, (s // 12) | 1)
    shadow = cv2.GaussianBlur(np.roll(alpha, (max(1, s // 25), max(1, s // 25)), (0, 1)), (k, k), 0)[sub]
    region = canvas[y0:y1, x0:x1]
    region *= (1 - 0.35 * shadow)[..., None]
    region[:] = region * (1 - a[..., None]) + rgb[sub] * a[..., None]
    instance[y0:y1, x0:x1][a > 0.5] = ident


def outline_band(instance: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width``/2 of a boundary between two different instances (VOC's border)."""
    kernel = np.ones((3, 3), np.uint8)
    inst = instance.astype(np.float32)
    edge = cv2.dilate(inst, kernel) != cv2.erode(inst, kernel)
    band = cv2.dilate(edge.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    return band > 0


def generate_scene(seed: int, index: int, size: tuple[int, int] | None = None,
                   min_visible: float = 0.25) -> Scene:
    """The scene (seed, index): deterministic. ``size`` (H, W) overrides the random 320–512 size.

    Each object's visible part must keep ``min_visible`` of its silhouette and at least 0.5 % of the
    image; objects occluded beyond that are dropped, so every labelled class can be seen.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = size if size is not None else scene_size(rng)
    background, names = _choose_classes(rng)
    canvas = BACKGROUND_PAINTERS[background](rng, h, w).astype(np.float32)
    _clutter(rng, canvas)
    instance = np.zeros((h, w), np.int32)
    placed: list[tuple[int, str, str, int]] = []  # (instance id, class, colour, silhouette pixels)
    for ident, name in enumerate(names, start=1):
        # Area 3–50 % of the image; sprites fill roughly half their canvas.
        area = math.exp(rng.uniform(math.log(0.03), math.log(0.5))) * h * w
        side = int(min(1.3 * max(h, w), math.sqrt(area / 0.45)))
        side = max(side, 24)
        rgb, alpha, colour = _render_sprite(rng, name, side)
        x = int(rng.integers(-side // 5, max(1, w - side + side // 5)))
        y = int(rng.integers(-side // 5, max(1, h - side + side // 5)))
        _paste(canvas, instance, rgb, alpha, x, y, ident)
        silhouette = int((instance == ident).sum())
        if silhouette:  # a sprite that owns no pixel left the instance map untouched
            placed.append((ident, name, colour, silhouette))
    # Global photograph look: uneven light and sensor noise.
    light = 1 + 0.12 * fractal_noise(rng, h, w, (2, 3))
    canvas = canvas * light[..., None] + rng.normal(0, 3.0, (h, w, 3)).astype(np.float32)
    image = np.clip(canvas, 0, 255).astype(np.uint8)

    mask = np.zeros((h, w), np.uint8)
    objects = []
    for ident, name, colour, silhouette in placed:
        visible = instance == ident
        n = int(visible.sum())
        if n < min_visible * silhouette or n < 0.005 * h * w:
            instance[visible] = 0  # too hidden to name: it becomes part of the background
            continue
        ys, xs = np.nonzero(visible)
        cls = CLASSES.index(name)
        mask[visible] = cls + 1
        objects.append(SceneObject(cls, colour, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                   n))
    band = max(3, round(max(h, w) / 100)) | 1
    mask[outline_band(instance, band)] = IGNORE
    return Scene(image, mask, background, objects)


# ---------------------------------------------------------------- captions


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


CAPTION_TEMPLATES = (
    "a photo of {objects} on {background}.",
    "{objects} on {background}.",
    "a picture of {objects}.",
    "a photo of {objects}.",
    "a clean origami {one}.",
    "a clean origami {background_word}.",
    "a photo of {background_word}.",
    "a {background_word} with {objects}.",
)


@dataclass(frozen=True)
class Caption:
    """A caption and what it claims: the classes it names (all of them when ``exhaustive``) and the
    background it names, if any."""

    text: str
    classes: frozenset[int]
    background: str | None
    exhaustive: bool

    def true_of(self, labels, background: str) -> bool:
        """Whether the caption holds for a scene with these class labels and background."""
        if self.background is not None and self.background != background:
            return False
        return self.classes == set(labels) if self.exhaustive else self.classes <= set(labels)


def _plural(name: str) -> str:
    return {"fish": "fish", "bus": "buses"}.get(name, name + "s")


def caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A caption true of the scene: every object (with colour words half the time) and maybe the
    background, one class alone in CLIP-ES's "a clean origami {}." prompt, or only the background."""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    if not scene.objects and ("{objects}" in template or "{one}" in template):
        template = "a clean origami {background_word}."
    coloured = rng.random() < 0.5
    groups: dict[int, list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.cls, []).append(o)
    phrases = []
    for cls, objs in groups.items():
        name = CLASSES[cls]
        if len(objs) > 1:
            phrases.append(f"two {_plural(name)}")
        else:
            phrases.append(_a(f"{objs[0].colour} {name}" if coloured else name))
    objects_text = _join([phrases[i] for i in rng.permutation(len(phrases))]) if phrases else ""
    one = int(rng.choice(list(groups))) if groups else -1
    text = template.format(objects=objects_text, background=scene.background, background_word=scene.background,
                           one=CLASSES[one] if one >= 0 else "")
    if "{objects}" in template:
        classes, exhaustive = frozenset(groups), True
    else:
        classes, exhaustive = (frozenset({one}) if "{one}" in template else frozenset()), False
    return Caption(text, classes, scene.background if "{background" in template else None, exhaustive)


def prompt_captions(template: str = "a clean origami {}.") -> list[Caption]:
    """The prompts CLIP-ES asks with: one per class and one per background word, each claiming only
    its own word."""
    return [Caption(template.format(c), frozenset({i}), None, False) for i, c in enumerate(CLASSES)] + \
        [Caption(template.format(b), frozenset(), b, False) for b in BACKGROUNDS]


# ---------------------------------------------------------------- datasets


def scene_xml(stem: str, scene: Scene) -> str:
    h, w = scene.mask.shape
    objects = "".join(
        f"  <object>\n    <name>{CLASSES[o.cls]}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
        f"    <bndbox><xmin>{o.box[0] + 1}</xmin><ymin>{o.box[1] + 1}</ymin>"
        f"<xmax>{o.box[2]}</xmax><ymax>{o.box[3]}</ymax></bndbox>\n  </object>\n"
        for o in scene.objects)
    return (f"<annotation>\n  <folder>synthetic</folder>\n  <filename>{stem}.jpg</filename>\n"
            f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
            f"  <segmented>1</segmented>\n  <background>{scene.background}</background>\n{objects}</annotation>\n")


def scene_stem(seed: int, index: int) -> str:
    return f"synth_{seed}_{index:06d}"


def write_dataset(out: str | os.PathLike, num: int, seed: int = 0, split: str = "all", start: int = 0,
                  overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write scenes start..start+num−1 of ``seed`` as a VOC-layout folder; returns their stems.

    JPEGImages/<stem>.jpg (quality 92), SegmentationClass/<stem>.png (VOC palette, class index + 1,
    255 outline band), Annotations/<stem>.xml, ImageSets/Segmentation/<split>.txt. Existing scenes
    with the same stem are kept (the same seed always makes the same scene) unless ``overwrite``.
    """
    from PIL import Image
    from tqdm import tqdm

    from .export import save_label_png
    from .fileio import atomic_write

    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    out = Path(out)
    stems = []
    for index in tqdm(range(start, start + num), desc="scenes", unit="img", disable=not progress):
        stem = scene_stem(seed, index)
        stems.append(stem)
        paths = (out / "JPEGImages" / f"{stem}.jpg", out / "SegmentationClass" / f"{stem}.png",
                 out / "Annotations" / f"{stem}.xml")
        if not overwrite and all(p.is_file() for p in paths):
            continue
        scene = generate_scene(seed, index)
        atomic_write(paths[0], lambda f: Image.fromarray(scene.image).save(f, format="JPEG", quality=92),
                     overwrite=True)
        save_label_png(scene.mask, paths[1], overwrite=True)
        atomic_write(paths[2], lambda f: f.write(scene_xml(stem, scene).encode()), overwrite=True)
    split_path = out / "ImageSets" / "Segmentation" / f"{split}.txt"
    previous = split_path.read_text().split() if split_path.is_file() else []
    listed = previous + [s for s in stems if s not in set(previous)]
    atomic_write(split_path, lambda f: f.write(("\n".join(listed) + "\n").encode()), overwrite=True)
    return stems
