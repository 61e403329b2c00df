"""ADE20K scene parsing data, read from the released ADEChallengeData2016 layout.

Layout: `ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}`; a mask is a
single-channel PNG whose value 0 means "other" (not labelled) and c in 1..num_classes is class c.

Label convention, shared by the training loss and the metrics: `to_train_ids` maps 0 -> IGNORE_INDEX
(255) and c -> c - 1, so a model predicts num_classes channels and
`cross_entropy(..., ignore_index=IGNORE_INDEX)` and `metrics.SegmentationMeter` skip unlabelled pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline_src.errors import InputError
from pipeline_src.transfer.voc import load_rgb

ADE20K_NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLITS = ("training", "validation")


class ADE20KFormatError(InputError, ValueError):
    """An ADE20K file that is missing or does not follow the format; the message names the file."""


@dataclass(frozen=True)
class ADERecord:
    image_id: str
    image_path: Path
    mask_path: Path


def resolve_root(path: str | Path) -> Path:
    """Accept either ADEChallengeData2016 itself or the folder holding it (params `data.ade20k_dir`)."""
    path = Path(path)
    if (path / "ADEChallengeData2016").is_dir():
        return path / "ADEChallengeData2016"
    if (path / "images").is_dir() and (path / "annotations").is_dir():
        return path
    raise ADE20KFormatError(
        f"{path}: no ADE20K data here; pass ADEChallengeData2016 (holding images/ and annotations/) "
        "or the folder that holds it"
    )


def read_split(root: str | Path, split: str) -> list[ADERecord]:
    """Pair `images/<split>/<id>.jpg` with `annotations/<split>/<id>.png`; an unpaired file is an error."""
    if split not in SPLITS:
        raise ValueError(f"ADE20K split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root)
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise ADE20KFormatError(f"{d}: folder not found")
    images = {p.stem: p for p in image_dir.glob("*.jpg")}
    masks = {p.stem: p for p in mask_dir.glob("*.png")}
    if not images:
        raise ADE20KFormatError(f"{image_dir}: holds no .jpg images")
    no_mask = sorted(images.keys() - masks.keys())
    if no_mask:
        raise ADE20KFormatError(
            f"{mask_dir / (no_mask[0] + '.png')}: mask missing for image {images[no_mask[0]]} "
            f"({len(no_mask)} image(s) in {image_dir} have no mask)"
        )
    no_image = sorted(masks.keys() - images.keys())
    if no_image:
        raise ADE20KFormatError(
            f"{image_dir / (no_image[0] + '.jpg')}: image missing for mask {masks[no_image[0]]} "
            f"({len(no_image)} mask(s) in {mask_dir} have no image)"
        )
    return [ADERecord(stem, images[stem], masks[stem]) for stem in sorted(images)]


def check_num_classes(num_classes: int) -> None:
    """Train ids run 0..num_classes-1 and must stay below IGNORE_INDEX."""
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")


def load_mask(path: Path, num_classes: int) -> np.ndarray:
    """A label PNG as a (H, W) int64 array of raw values 0..num_classes (0 = other)."""
    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise ADE20KFormatError(f"{path}: cannot decode the mask PNG ({exc})") from None
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ADE20KFormatError(
            f"{path}: a mask must be a single-channel integer PNG (mode L or P), "
            f"got shape {mask.shape} {mask.dtype}"
        )
    mask = mask.astype(np.int64)
    top = int(mask.max()) if mask.size else 0
    if top > num_classes or (mask.size and mask.min() < 0):
        raise ADE20KFormatError(
            f"{path}: holds label {top}, but values must be in 0..{num_classes} (num_classes={num_classes})"
        )
    return mask


def to_train_ids(mask: np.ndarray) -> np.ndarray:
    """Raw ADE labels -> training ids: 0 (other) -> IGNORE_INDEX, c -> c - 1."""
    return np.where(mask == 0, IGNORE_INDEX, mask - 1).astype(np.int64)


class ADE20KSegmentation(Dataset):
    """(image, mask) pairs: image float (3, H, W) in [0, 1]; mask int64 (H, W) of training ids."""

    def __init__(
        self,
        records: Sequence[ADERecord],
        num_classes: int,
        transforms: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        check_num_classes(num_classes)
        self.records = list(records)
        self.num_classes = num_classes
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records[index]
        image = load_rgb(rec.image_path, ADE20KFormatError)
        raw = load_mask(rec.mask_path, self.num_classes)
        if raw.shape != tuple(image.shape[1:]):
            raise ADE20KFormatError(
                f"{rec.mask_path}: mask is {raw.shape[1]} x {raw.shape[0]} but its image "
                f"{rec.image_path} is {image.shape[2]} x {image.shape[1]}"
            )
        mask = torch.from_numpy(to_train_ids(raw))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
