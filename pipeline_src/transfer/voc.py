"""PASCAL VOC detection data, read from the released VOCdevkit layout.

Layout: `VOCdevkit/VOC<year>/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<split>.txt}`.
The embedded synthetic data uses the same layout and XML schema with its own class names, so every
reader takes the class list as an argument (default: the 20 VOC classes).

Coordinates. VOC XML gives 1-based inclusive pixel indices: xmin=1, xmax=10 covers the first ten
pixel columns. Records hold 0-based continuous coordinates, the convention of torchvision detection
models: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax, so the width x2 - x1 = xmax - xmin + 1.
IoU on these boxes without any "+1" (`metrics.box_iou`) therefore equals the official devkit's
"+1" IoU on the raw XML numbers. A raw box with xmin == xmax is one pixel wide and valid; xmax < xmin
(x2 <= x1 after conversion) or a box reaching outside [1, width] x [1, height] is an error.

A missing `<difficult>` tag means 0, as in the devkit. Labels in records are 0-based indices into the
class list; `VOCDetection` shifts them by one because torchvision detectors reserve 0 for background.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline_src.errors import InputError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
BACKGROUND = 0  # the label torchvision detectors reserve; VOCDetection labels start at 1


class VOCFormatError(InputError, ValueError):
    """A VOCdevkit file that is missing or does not follow the format; the message names the file."""


@dataclass(frozen=True)
class VOCRecord:
    """One annotated image: boxes (N, 4) float32 0-based x1, y1, x2, y2; labels (N,) int64 0-based."""

    image_id: str
    year: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def resolve_devkit(path: str | Path) -> Path:
    """Accept either the VOCdevkit folder itself or the folder holding it (params `data.voc_dir`)."""
    path = Path(path)
    if (path / "VOCdevkit").is_dir():
        return path / "VOCdevkit"
    if any((path / f"VOC{year}").is_dir() for year in ("2007", "2012")):
        return path
    raise VOCFormatError(
        f"{path}: no VOCdevkit here; pass the VOCdevkit folder (holding VOC2007/, VOC2012/) "
        "or the folder that holds VOCdevkit/"
    )


def _class_index(classes: Sequence[str] | None) -> dict[str, int]:
    names = list(VOC_CLASSES if classes is None else classes)
    if not names:
        raise ValueError("the class list is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the class list repeats {duplicates}")
    return {name: i for i, name in enumerate(names)}


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise VOCFormatError(f"{path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(node, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise VOCFormatError(f"{path}: {where} <{tag}> is not a number: {text!r}") from None
    if not np.isfinite(value):
        raise VOCFormatError(f"{path}: {where} <{tag}> is not finite: {text!r}")
    return value


def parse_annotation(
    path: Path, class_index: dict[str, int]
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Read one VOC XML file: (width, height, boxes, labels, difficult), boxes converted to 0-based."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise VOCFormatError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise VOCFormatError(f"{path}: cannot read the annotation ({exc})") from None
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: no <size> element")
    width, height = _number(size, "width", path, "<size>"), _number(size, "height", path, "<size>")
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise VOCFormatError(
            f"{path}: <size> must give positive integer width and height, got {width} x {height}"
        )
    width, height = int(width), int(height)
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path, f"object {k}")
        if name not in class_index:
            raise VOCFormatError(
                f"{path}: object {k} has unknown class {name!r}; known classes: {list(class_index)}"
            )
        flag = obj.find("difficult")
        flag_text = flag.text.strip() if flag is not None and flag.text else "0"
        if flag_text not in ("0", "1"):
            raise VOCFormatError(f"{path}: object {k} <difficult> must be 0 or 1, got {flag_text!r}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VOCFormatError(f"{path}: object {k} ({name}) has no <bndbox>")
        where = f"object {k} ({name}) <bndbox>"
        xmin, ymin, xmax, ymax = (_number(bndbox, t, path, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise VOCFormatError(
                f"{path}: {where} is empty: xmin={xmin:g} xmax={xmax:g} ymin={ymin:g} ymax={ymax:g}"
            )
        if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            raise VOCFormatError(
                f"{path}: {where} ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside the "
                f"{width} x {height} image (VOC boxes are 1-based, within [1, width] x [1, height])"
            )
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))
        labels.append(class_index[name])
        difficult.append(flag_text == "1")
    return (
        width,
        height,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def read_ids(devkit: Path, year: str, split: str) -> list[str]:
    """The image ids listed in `VOC<year>/ImageSets/Main/<split>.txt`."""
    path = Path(devkit) / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise VOCFormatError(
            f"{path}: split file not found (is VOC{year} in {devkit}, and is '{split}' a split?)"
        )
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCFormatError(f"{path}: lists no image ids")
    if len(set(ids)) != len(ids):
        raise VOCFormatError(f"{path}: lists some image ids twice")
    return ids


def read_split(
    devkit: str | Path, year: str, split: str, classes: Sequence[str] | None = None
) -> list[VOCRecord]:
    """Every image of one split with its parsed annotation; `classes` defaults to VOC_CLASSES."""
    devkit = Path(devkit)
    class_index = _class_index(classes)
    base = devkit / f"VOC{year}"
    records = []
    for image_id in read_ids(devkit, year, split):
        image_path = base / "JPEGImages" / f"{image_id}.jpg"
        annotation_path = base / "Annotations" / f"{image_id}.xml"
        for kind, p in (("image", image_path), ("annotation", annotation_path)):
            if not p.is_file():
                raise VOCFormatError(
                    f"{p}: {kind} file missing for id {image_id!r} listed in VOC{year} {split}.txt"
                )
        width, height, boxes, labels, difficult = parse_annotation(annotation_path, class_index)
        records.append(
            VOCRecord(image_id, year, image_path, annotation_path, width, height, boxes, labels, difficult)
        )
    return records


def trainval_0712(
    devkit: str | Path, classes: Sequence[str] | None = None, allow_missing_2012: bool = False
) -> list[VOCRecord]:
    """The paper's training set, VOC2007 trainval + VOC2012 trainval.

    A missing VOC2012 folder is an error, since training on 07 alone silently changes the experiment;
    pass `allow_missing_2012=True` to train on VOC2007 trainval only.
    """
    devkit = Path(devkit)
    records = read_split(devkit, "2007", "trainval", classes)
    if (devkit / "VOC2012").is_dir():
        records += read_split(devkit, "2012", "trainval", classes)
    elif not allow_missing_2012:
        raise VOCFormatError(
            f"{devkit / 'VOC2012'}: not found; the paper trains on VOC2007+2012 trainval. Add VOC2012 "
            "to the devkit, or allow 2007 only (allow_missing_2012=True)"
        )
    return records


def test_07(devkit: str | Path, classes: Sequence[str] | None = None) -> list[VOCRecord]:
    """The paper's test set, VOC2007 test."""
    return read_split(devkit, "2007", "test", classes)



def load_rgb(path: Path, error: type[ValueError]) -> torch.Tensor:
    """Decode an image file to a float32 (3, H, W) tensor in [0, 1]."""
    try:
        with Image.open(path) as img:
            pixels = np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise error(f"{path}: cannot decode the image ({exc})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


class VOCDetection(Dataset):
    """(image, target) pairs for torchvision detectors: image float (3, H, W) in [0, 1]; target has
    boxes (N, 4) float32, labels (N,) int64 in 1..C, difficult (N,) bool, image_id () int64 (the index
    into `records`, whose `image_id` is the VOC id)."""

    def __init__(
        self,
        records: Sequence[VOCRecord],
        transforms: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None,
    ) -> None:
        self.records = list(records)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self.records[index]
        image = load_rgb(rec.image_path, VOCFormatError)
        if image.shape[1:] != (rec.height, rec.width):
            raise VOCFormatError(
                f"{rec.image_path}: image is {image.shape[2]} x {image.shape[1]} but "
                f"{rec.annotation_path} gives <size> {rec.width} x {rec.height}"
            )
        target = {
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels + (BACKGROUND + 1)),
            "difficult": torch.from_numpy(rec.difficult.copy()),
            "image_id": torch.tensor(index, dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[tuple, tuple]:
    """Batch as (images, targets) tuples: detection images differ in size and are not stacked."""
    images, targets = zip(*batch)
    return images, targets
