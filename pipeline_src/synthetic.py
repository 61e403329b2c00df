"""The embedded default data: ImageNet, VOC and ADE20K look-alikes drawn from a seed.

Nothing can be downloaded here, so the pipeline draws its own data in the real on-disk layouts
(ILSVRC2012 class folders, Pascal VOC XML, ADE20K index PNGs) and the code that reads them is the
code that would read the real datasets. Every image is drawn from its own generator, seeded by
(seed, split, index), so the files do not depend on the order they are written in and the same
params give byte-identical files.

The classes are drawn objects (disc, ring, star, stripes, ...) with random colours, size, aspect,
rotation, position, background clutter and pixel noise: colour says nothing about the class and a
linear model on raw pixels does not solve the task, so training tricks have room to matter.
Objects are lit: brighter than their darker background by a luminance gap, with dimmer clutter.
Random polarity and free colour contrast (version 1) left a 10-class task that a small ResNet could
not learn within the CPU profile's budget (19 % after 15 epochs against 69 % for white on black).

    python -m pipeline_src.synthetic [--params FILE] [--set synthetic.seed=1]

writes `<paths.data>/synthetic/{imagenet,VOCdevkit,ADEChallengeData2016,manifest.json}`; a
dataset whose manifest entry matches the params is skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline_src import params as params_mod
from pipeline_src.errors import run_main
from pipeline_src.io import write_json
from pipeline_src.params import ParamsError

# Bump when the drawing rules change: a manifest from another version is regenerated.
GENERATOR_VERSION = 2
# Part of the dataset's definition like the drawing rules, not a training knob.
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # objects are drawn this much larger, then box-filtered down (anti-aliasing)
# Luminance (ITU-R BT.601 weights): backgrounds are at most BACKGROUND_LUMA, objects at least
# LUMA_GAP brighter than their background, clutter at most CLUTTER_LUMA (dim distractors).
LUMA = np.array([0.299, 0.587, 0.114])
BACKGROUND_LUMA = 110.0
LUMA_GAP = 100.0
CLUTTER_LUMA = 0.45 * 255

# Object scale as a fraction of the image's shorter side.
CLS_SCALE = (0.6, 0.95)
SCENE_SCALE = (0.18, 0.6)
# A scene object is `difficult` below this visible fraction or this longer box side (pixels).
DIFFICULT_VISIBLE = 0.55
DIFFICULT_SIDE = 16
MAX_SCENE_OBJECTS = 4

# The cfg keys each dataset depends on: a change to one of them regenerates that dataset only.
DATASET_KEYS = {
    "imagenet": ("seed", "classes", "train_per_class", "val_per_class", "min_size", "max_size"),
    "voc": ("seed", "classes", "voc_trainval", "voc_test", "scene_size"),
    "ade20k": ("seed", "classes", "ade_train", "ade_val", "scene_size"),
}
DATASET_FOLDERS = {"imagenet": "imagenet", "voc": "VOCdevkit", "ade20k": "ADEChallengeData2016"}


# --------------------------------------------------------------------------- classes


def _check_count(n: int) -> None:
    if not 1 <= n <= len(CLASSES):
        raise ParamsError(
            f"key 'synthetic.classes' = {n}: the generator draws {len(CLASSES)} distinct classes "
            f"({', '.join(CLASSES)}); set synthetic.classes between 2 and {len(CLASSES)}"
        )


def class_names(n: int) -> list[str]:
    """Readable names of the first `n` classes; VOC and ADE20K use the same names in this order."""
    _check_count(n)
    return list(CLASSES[:n])


def wnids(n: int) -> list[str]:
    """ImageNet-style synset ids, increasing so that sorted folder order is class order."""
    _check_count(n)
    return [f"n{1440764 + 8543 * i:08d}" for i in range(n)]


# --------------------------------------------------------------------------- drawing


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator for one image, keyed by name so it does not depend on generation order."""
    keys = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng([seed, *keys])


class _Pen:
    """Draws in unit coordinates: shapes stay within radius 1.1, which maps inside the canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, size: int):
        self.draw = draw
        self.half = size / 2
        self.scale = 0.88 * self.half

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.half + self.scale * x, self.half + self.scale * y)

    def poly(self, points, fill: int = 255) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in points], fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: int = 255) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: int = 255) -> None:
        self.draw.ellipse([self.pt(cx - rx, cy - ry), self.pt(cx + rx, cy + ry)], fill=fill)

    def line(self, points, width: float) -> None:
        self.draw.line([self.pt(x, y) for x, y in points], fill=255,
                       width=max(1, round(width * self.scale)), joint="curve")


def _regular(n: int, radius: float = 1.0, phase: float = -90.0) -> list[tuple[float, float]]:
    angles = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star(pen: _Pen, rng: np.random.Generator) -> None:
    outer, inner = _regular(5), _regular(5, rng.uniform(0.38, 0.5), -90 + 36)
    pen.poly([p for pair in zip(outer, inner) for p in pair])


def _ring(pen: _Pen, rng: np.random.Generator) -> None:
    pen.ellipse(0, 0, 1, 1)
    hole = rng.uniform(0.45, 0.65)
    pen.ellipse(0, 0, hole, hole, fill=0)


def _cross(pen: _Pen, rng: np.random.Generator) -> None:
    a = rng.uniform(0.22, 0.32)
    pen.rect(-1, -a, 1, a)
    pen.rect(-a, -1, a, 1)


def _stripes(pen: _Pen, rng: np.random.Generator) -> None:
    k = int(rng.integers(3, 5))
    width = 1.6 / (2 * k - 1)
    for i in range(k):
        x0 = -0.8 + 2 * i * width
        pen.rect(x0, -0.8, x0 + width, 0.8)


def _checker(pen: _Pen, rng: np.random.Generator) -> None:
    n = int(rng.integers(3, 5))
    cell = 1.6 / n
    for i in range(n):
        for j in range(n):
            if (i + j) % 2 == 0:
                pen.rect(-0.8 + i * cell, -0.8 + j * cell, -0.8 + (i + 1) * cell, -0.8 + (j + 1) * cell)


def _crescent(pen: _Pen, rng: np.random.Generator) -> None:
    pen.ellipse(0, 0, 1, 1)
    r = rng.uniform(0.8, 0.9)
    pen.ellipse(rng.uniform(0.35, 0.5), 0, r, r, fill=0)


def _triangle(pen: _Pen, rng: np.random.Generator) -> None:
    pen.poly([(x + rng.uniform(-0.08, 0.08), y + rng.uniform(-0.08, 0.08)) for x, y in _regular(3)])


def _diamond(pen: _Pen, rng: np.random.Generator) -> None:
    w = rng.uniform(0.45, 0.6)
    pen.poly([(0, -1), (w, 0), (0, 1), (-w, 0)])


def _arrow(pen: _Pen, rng: np.random.Generator) -> None:
    t = rng.uniform(0.15, 0.22)
    pen.poly([(-1, -t), (0.1, -t), (0.1, -0.6), (1, 0), (0.1, 0.6), (0.1, t), (-1, t)])


def _hourglass(pen: _Pen, rng: np.random.Generator) -> None:
    w, neck = rng.uniform(0.6, 0.8), rng.uniform(0.08, 0.15)
    pen.poly([(-w, -1), (w, -1), (neck, 0), (w, 1), (-w, 1), (-neck, 0)])


def _lshape(pen: _Pen, rng: np.random.Generator) -> None:
    t = rng.uniform(0.4, 0.55)
    pen.poly([(-0.7, -1), (-0.7 + t, -1), (-0.7 + t, 1 - t), (0.7, 1 - t), (0.7, 1), (-0.7, 1)])


def _tshape(pen: _Pen, rng: np.random.Generator) -> None:
    t = rng.uniform(0.2, 0.3)
    pen.rect(-1, -0.9, 1, -0.9 + 2 * t)
    pen.rect(-t, -0.9, t, 1)


def _dots(pen: _Pen, rng: np.random.Generator) -> None:
    r = rng.uniform(0.18, 0.24)
    for cx in (-0.6, 0, 0.6):
        for cy in (-0.6, 0, 0.6):
            pen.ellipse(cx, cy, r, r)


def _zigzag(pen: _Pen, rng: np.random.Generator) -> None:
    k = int(rng.integers(4, 6))
    xs = np.linspace(-0.9, 0.9, k + 1)
    pen.line([(x, 0.5 if i % 2 else -0.5) for i, x in enumerate(xs)], rng.uniform(0.2, 0.28))


DRAWERS: dict[str, Callable[[_Pen, np.random.Generator], None]] = {
    "disc": lambda pen, rng: pen.ellipse(0, 0, 1, 1),
    "ring": _ring,
    "triangle": _triangle,
    "square": lambda pen, rng: pen.poly(_regular(4, phase=45)),
    "star": _star,
    "cross": _cross,
    "stripes": _stripes,
    "checker": _checker,
    "crescent": _crescent,
    "ellipse": lambda pen, rng: pen.ellipse(0, 0, 1, rng.uniform(0.4, 0.6)),
    "hexagon": lambda pen, rng: pen.poly(_regular(6)),
    "pentagon": lambda pen, rng: pen.poly(_regular(5)),
    "diamond": _diamond,
    "arrow": _arrow,
    "semicircle": lambda pen, rng: pen.draw.pieslice(
        [pen.pt(-1.05, -0.65), pen.pt(1.05, 1.45)], 180, 360, fill=255),
    "hourglass": _hourglass,
    "lshape": _lshape,
    "tshape": _tshape,
    "dots": _dots,
    "zigzag": _zigzag,
}
# Class c is CLASSES[c]; the first ten follow the order the project documents.
CLASSES = tuple(DRAWERS)


def _object_alpha(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of one object drawn in a box of about `side` pixels, randomly rotated."""
    big = side * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    DRAWERS[kind](_Pen(ImageDraw.Draw(canvas), big), rng)
    canvas = canvas.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    width = max(2, round(side * rng.uniform(0.85, 1.15)))
    return np.asarray(canvas.resize((width, side), Image.Resampling.BOX), np.float32) / 255.0


def _color_below(luma: float, rng: np.random.Generator) -> np.ndarray:
    """A uniform random colour whose luminance is at most `luma` (rejection, then scaled down)."""
    for _ in range(50):
        color = rng.uniform(0, 255, 3)
        if LUMA @ color <= luma:
            return color
    return color * (luma / float(LUMA @ color))


def _palette(rng: np.random.Generator, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An object colour pair at least LUMA_GAP brighter than the background, otherwise uniform."""
    floor = float(LUMA @ background) + LUMA_GAP
    for _ in range(50):
        color = rng.uniform(0, 255, 3)
        if LUMA @ color >= floor:
            break
    else:
        color = np.full(3, 255.0)
    return color, np.clip(color + rng.normal(0, 15, 3), 0, 255)


def _background(w: int, h: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A dark random colour with a smooth low-frequency variation across the image."""
    base = _color_below(BACKGROUND_LUMA, rng)
    coarse = np.clip(base + rng.normal(0, 15, (3, 3, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), base


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in _color_below(CLUTTER_LUMA, rng))


def _strokes(draw: ImageDraw.ImageDraw, w: int, h: int, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        xy = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
        draw.line(xy, fill=_random_color(rng), width=int(rng.integers(1, 3)))


def _clutter(img: Image.Image, rng: np.random.Generator) -> None:
    """Distractors: thin strokes and small irregular blobs, never one of the classes' shapes."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    _strokes(draw, w, h, int(rng.integers(2, 7)), rng)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.12) * min(w, h)
        k = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = r * rng.uniform(0.3, 1.0, k)
        draw.polygon([(float(cx + q * math.cos(a)), float(cy + q * math.sin(a)))
                      for a, q in zip(angles, radii)], fill=_random_color(rng))


def _offset(extent: int, size: int, slack: float, rng: np.random.Generator) -> int:
    """Where a box of `size` starts in `extent`, allowing `slack` of it to hang outside."""
    lo, hi = -int(slack * size), extent - size + int(slack * size)
    return int(rng.integers(lo, hi + 1)) if hi >= lo else (extent - size) // 2


def _place(alpha: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The object's coverage in the frame of a w x h image, cut where it leaves the image."""
    full = np.zeros((h, w), np.float32)
    oh, ow = alpha.shape
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + ow, w), min(y0 + oh, h)
    if fx1 > fx0 and fy1 > fy0:
        full[fy0:fy1, fx0:fx1] = alpha[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    return full


def _paint(arr: np.ndarray, full: np.ndarray, colors: tuple[np.ndarray, np.ndarray],
           rng: np.random.Generator) -> None:
    """Blend a linear colour gradient into `arr` (float HxWx3) with coverage `full`."""
    h, w = full.shape
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(theta) * np.arange(w)[None, :] / w + np.sin(theta) * np.arange(h)[:, None] / h
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    fill = colors[0] + (colors[1] - colors[0]) * ramp[..., None]
    a = full[..., None]
    arr *= 1.0 - a
    arr += a * fill


def _finish(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    arr += rng.normal(0, rng.uniform(3, 12), arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def draw_classification(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """One classification image: clutter, one object of class `kind`, strokes over it, noise."""
    img, base = _background(w, h, rng)
    _clutter(img, rng)
    arr = np.asarray(img, np.float32).copy()
    side = max(8, int(rng.uniform(*CLS_SCALE) * min(w, h)))
    alpha = _object_alpha(kind, side, rng)
    oh, ow = alpha.shape
    full = _place(alpha, _offset(w, ow, 0.1, rng), _offset(h, oh, 0.1, rng), w, h)
    _paint(arr, full, _palette(rng, base), rng)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    _strokes(ImageDraw.Draw(img), w, h, int(rng.integers(0, 3)), rng)
    return Image.fromarray(_finish(np.asarray(img, np.float32).copy(), rng))


def draw_scene(n_classes: int, w: int, h: int,
               rng: np.random.Generator) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """A scene with 1-4 objects: the image, each object's annotation, and the instance map.

    An object is kept only if it leaves every earlier one at least 30% visible and is itself at
    least half inside the image; boxes bound the visible pixels (0-based, inclusive).
    """
    img, base = _background(w, h, rng)
    _clutter(img, rng)
    arr = np.asarray(img, np.float32).copy()
    instances = np.zeros((h, w), np.int16)
    objects: list[dict] = []
    totals: list[int] = []
    for _ in range(int(rng.integers(1, MAX_SCENE_OBJECTS + 1))):
        for _attempt in range(10):
            cls = int(rng.integers(n_classes))
            side = max(8, int(rng.uniform(*SCENE_SCALE) * min(w, h)))
            alpha = _object_alpha(CLASSES[cls], side, rng)
            oh, ow = alpha.shape
            full = _place(alpha, _offset(w, ow, 0.3, rng), _offset(h, oh, 0.3, rng), w, h)
            own = full >= 0.5
            total = int((alpha >= 0.5).sum())
            if total == 0 or own.sum() < 0.5 * total:
                continue
            after = np.where(own, len(objects) + 1, instances)
            if any((after == j + 1).sum() < 0.3 * t for j, t in enumerate(totals)):
                continue
            _paint(arr, full, _palette(rng, base), rng)
            instances = after
            totals.append(total)
            objects.append({"class": cls, "truncated": int(own.sum() < total)})
            break
    for k, obj in enumerate(objects):
        ys, xs = np.nonzero(instances == k + 1)
        obj["bbox"] = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        visible = len(xs) / totals[k]
        longer = max(obj["bbox"][2] - obj["bbox"][0], obj["bbox"][3] - obj["bbox"][1]) + 1
        obj["difficult"] = int(visible < DIFFICULT_VISIBLE or longer < DIFFICULT_SIDE)
    return _finish(arr, rng), objects, instances


# --------------------------------------------------------------------------- checks and folders


def check_cfg(cfg: dict) -> None:
    """The cross-key rules the schema cannot express, with the key to fix."""
    _check_count(cfg["classes"])
    if cfg["min_size"] > cfg["max_size"]:
        raise ParamsError(
            f"key 'synthetic.min_size' ({cfg['min_size']}) is above 'synthetic.max_size' "
            f"({cfg['max_size']}); set min_size <= max_size"
        )
    lo, hi = cfg["scene_size"]
    if lo > hi:
        raise ParamsError(f"key 'synthetic.scene_size' must be [min, max] with min <= max, got {[lo, hi]}")


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; it replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_jpeg(img: Image.Image | np.ndarray, path: Path) -> None:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, "JPEG", quality=JPEG_QUALITY)


def _sizes(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    w, h = rng.integers(lo, hi + 1, 2)
    return int(w), int(h)


# --------------------------------------------------------------------------- ImageNet


def _build_imagenet(root: Path, cfg: dict) -> dict:
    n, tpc, vpc = cfg["classes"], cfg["train_per_class"], cfg["val_per_class"]
    names, ids = class_names(n), wnids(n)
    val_numbers = _rng(cfg["seed"], "imagenet-val-order").permutation(n * vpc) + 1
    for c, (name, wnid) in enumerate(zip(names, ids)):
        for split, count in (("train", tpc), ("val", vpc)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(count):
                rng = _rng(cfg["seed"], f"imagenet-{split}", c, j)
                img = draw_classification(name, *_sizes(rng, cfg["min_size"], cfg["max_size"]), rng)
                if split == "train":
                    file = f"{wnid}_{j + 1}.JPEG"
                else:
                    file = f"ILSVRC2012_val_{val_numbers[c * vpc + j]:08d}.JPEG"
                _save_jpeg(img, folder / file)
    return {"train": n * tpc, "val": n * vpc}


# --------------------------------------------------------------------------- VOC


def _voc_xml(year: str, image_id: str, w: int, h: int, objects: list[dict], names: list[str]) -> str:
    """The annotation in the VOC schema; coordinates are VOC's 1-based inclusive pixels."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = year
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "tricks-pipeline synthetic"
    ET.SubElement(source, "annotation").text = f"PASCAL {year}"
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(ann, "object")
        ET.SubElement(node, "name").text = names[obj["class"]]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(obj["truncated"])
        ET.SubElement(node, "difficult").text = str(obj["difficult"])
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["bbox"]):
            ET.SubElement(box, tag).text = str(value + 1)
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="unicode") + "\n"


def _voc_split(devkit: Path, cfg: dict, year: str, split: str, ids: list[str], names: list[str]) -> dict:
    """Draw and annotate one split; write its image list and VOC's per-class lists."""
    base = devkit / year
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    flags = {name: [] for name in names}
    n_objects = n_difficult = n_truncated = 0
    for i, image_id in enumerate(ids):
        rng = _rng(cfg["seed"], f"voc-{year}-{split}", i)
        w, h = _sizes(rng, *cfg["scene_size"])
        img, objects, _ = draw_scene(len(names), w, h, rng)
        _save_jpeg(img, base / "JPEGImages" / f"{image_id}.jpg")
        (base / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(year, image_id, w, h, objects, names))
        for c, name in enumerate(names):
            present = [o for o in objects if o["class"] == c]
            # VOC's per-class lists: 1 present, 0 present only as difficult, -1 absent
            flag = -1 if not present else (1 if any(not o["difficult"] for o in present) else 0)
            flags[name].append(flag)
        n_objects += len(objects)
        n_difficult += sum(o["difficult"] for o in objects)
        n_truncated += sum(o["truncated"] for o in objects)
    main = base / "ImageSets" / "Main"
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for name, values in flags.items():
        (main / f"{name}_{split}.txt").write_text("".join(f"{i} {v:2d}\n" for i, v in zip(ids, values)))
    return {"images": len(ids), "objects": n_objects, "difficult": n_difficult, "truncated": n_truncated}


def _build_voc(root: Path, cfg: dict) -> dict:
    """VOC2007 trainval + test and VOC2012 trainval (`voc_trainval` images in each year)."""
    names = class_names(cfg["classes"])
    tv, test = cfg["voc_trainval"], cfg["voc_test"]
    splits = (
        ("VOC2007", "trainval", [f"{i:06d}" for i in range(1, tv + 1)]),
        ("VOC2007", "test", [f"{i:06d}" for i in range(tv + 1, tv + test + 1)]),
        ("VOC2012", "trainval", [f"2012_{i:06d}" for i in range(1, tv + 1)]),
    )
    return {f"{year}/{split}": _voc_split(root, cfg, year, split, ids, names)
            for year, split, ids in splits}


# --------------------------------------------------------------------------- ADE20K


def _build_ade20k(root: Path, cfg: dict) -> dict:
    """Scenes with index masks: 0 = other, class c is c + 1; objectInfo150.txt lists the classes."""
    names = class_names(cfg["classes"])
    pixels = np.zeros(len(names) + 1, np.int64)
    images = {"training": np.zeros(len(names), np.int64), "validation": np.zeros(len(names), np.int64)}
    counts = {}
    for split, prefix, count in (("training", "ADE_train", cfg["ade_train"]),
                                 ("validation", "ADE_val", cfg["ade_val"])):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            rng = _rng(cfg["seed"], f"ade-{split}", i)
            img, objects, instances = draw_scene(len(names), *_sizes(rng, *cfg["scene_size"]), rng)
            labels = np.zeros(instances.shape, np.uint8)
            for k, obj in enumerate(objects):
                labels[instances == k + 1] = obj["class"] + 1
            stem = f"{prefix}_{i + 1:08d}"
            _save_jpeg(img, root / "images" / split / f"{stem}.jpg")
            Image.fromarray(labels).save(root / "annotations" / split / f"{stem}.png")
            pixels += np.bincount(labels.ravel(), minlength=len(names) + 1)
            images[split][np.unique(labels[labels > 0]) - 1] += 1
        counts[split] = count
    ratio = pixels / max(int(pixels.sum()), 1)
    rows = [f"{c + 1}\t{ratio[c + 1]:.6f}\t{images['training'][c]}\t{images['validation'][c]}\t{name}\n"
            for c, name in enumerate(names)]
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(rows))
    return counts


# --------------------------------------------------------------------------- public API

BUILDERS = {"imagenet": _build_imagenet, "voc": _build_voc, "ade20k": _build_ade20k}


def _generate(kind: str, out_dir: Path, cfg: dict) -> tuple[Path, dict]:
    """Build one dataset in a temp folder (plain writes suffice there) and rename it into place."""
    check_cfg(cfg)
    target = Path(out_dir) / DATASET_FOLDERS[kind]
    with _atomic_dir(target) as tmp:
        counts = BUILDERS[kind](tmp, cfg)
    return target, counts


def generate_imagenet(out_dir: Path, cfg: dict) -> Path:
    """Write `<out_dir>/imagenet/{train,val}/<wnid>/*.JPEG` (ILSVRC2012 layout) atomically."""
    return _generate("imagenet", out_dir, cfg)[0]


def generate_voc(out_dir: Path, cfg: dict) -> Path:
    """Write `<out_dir>/VOCdevkit/{VOC2007,VOC2012}` (Pascal VOC layout) atomically."""
    return _generate("voc", out_dir, cfg)[0]


def generate_ade20k(out_dir: Path, cfg: dict) -> Path:
    """Write `<out_dir>/ADEChallengeData2016` (ADE20K SceneParsing layout) atomically."""
    return _generate("ade20k", out_dir, cfg)[0]


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"synthetic: {path} is not valid JSON; regenerating every dataset")
        return {}
    return manifest if isinstance(manifest, dict) else {}


def generate_all(out_dir: Path, cfg: dict) -> dict:
    """Generate the three datasets under `out_dir`, skipping those the manifest shows up to date."""
    check_cfg(cfg)
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    previous = _read_manifest(manifest_path)
    done = previous.get("datasets", {}) if previous.get("generator_version") == GENERATOR_VERSION else {}
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg["seed"],
        "classes": [{"index": i, "name": name, "wnid": wnid}
                    for i, (name, wnid) in enumerate(zip(class_names(cfg["classes"]), wnids(cfg["classes"])))],
        "datasets": {},
    }
    for kind, keys in DATASET_KEYS.items():
        wanted = {k: cfg[k] for k in keys}
        folder = out_dir / DATASET_FOLDERS[kind]
        entry = done.get(kind)
        if isinstance(entry, dict) and entry.get("params") == wanted and folder.is_dir():
            print(f"synthetic: {kind} in {folder} matches the params; skipped")
            manifest["datasets"][kind] = entry
            continue
        start = time.perf_counter()
        _, counts = _generate(kind, out_dir, cfg)
        print(f"synthetic: wrote {kind} to {folder} in {time.perf_counter() - start:.1f} s: {counts}")
        manifest["datasets"][kind] = {"folder": DATASET_FOLDERS[kind], "params": wanted, "counts": counts}
        # after each dataset, so a crash later never leaves a finished dataset unrecorded
        write_json(manifest_path, {**manifest, "datasets": {**done, **manifest["datasets"]}})
    write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        generate_all(Path(params["paths"]["data"]) / "synthetic", params["synthetic"])

    return run_main("synthetic", body)

if __name__ == "__main__":
    sys.exit(main())
