"""Stage: ILSVRC2012 folders -> FFCV betons (`train.beton`, `val.beton`, `classes.json`, `manifest.json`).

Why it is built this way:
- Byte-identical betons. ffcv's `DatasetWriter` with several worker processes places pages in the
  order the workers happen to finish, and `write_mode='proportion'` picks JPEG or raw with the
  unseeded global numpy RNG; either makes two writes of the same data differ. So the writer runs in
  one process, a pool of `prepare.num_workers` processes decodes the images ahead of it in order,
  and the global RNG is seeded from (`prepare.seed`, image index) just before ffcv encodes an image.
- Fail fast. Every image is decoded before any beton is written, and all broken files are reported
  in one message (or skipped and listed, with `data.on_corrupt: skip`). The free space the betons
  need is checked before writing, and a writer process that dies (a full disk) ends the stage at
  once instead of leaving ffcv's parent loop waiting forever.
- Atomic. One prepare per data dir (`locks.dir_lock`). The new betons and `classes.json` are written
  as temp files beside the old set, which stays usable until all three are complete and renamed over
  it; `manifest.json` is written last and is the only "done" marker. A re-run whose inputs, settings
  and checksums match the manifest does nothing.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import errno
import hashlib
import json
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image

from pipeline_src import params as params_mod
from pipeline_src.errors import InputError, run_main
from pipeline_src.ffcv_import import import_ffcv
from pipeline_src.io import (IMAGE_SUFFIXES, MB, DiskFullError, atomic_path, check_free_space, free_bytes, sha256,
                             write_json)
from pipeline_src.locks import dir_lock

if TYPE_CHECKING:
    from ffcv.fields import RGBImageField

VAL_SOLUTION = "LOC_val_solution.csv"  # Kaggle's labels for a flat val/ folder
SYNSET_MAPPING = "LOC_synset_mapping.txt"  # Kaggle's "wnid name, name" lines (optional)
KAGGLE_SUBDIR = ("ILSVRC", "Data", "CLS-LOC")  # where Kaggle keeps train/ and val/ below its CSVs
SPLITS = ("train", "val")
OUTPUTS = ("classes.json", "train.beton", "val.beton")
MANIFEST = "manifest.json"
DECODE_BLOCK = 256  # images decoded ahead of the writer; bounds memory, does not change the output
PAGE_SIZE = 8 * MB  # ffcv's default page; each page is written whole, however little it holds
JPEG_RATIO = 10  # raw pixels over JPEG bytes at ImageNet's quality, for the free-space estimate
METADATA_BYTES = 64  # per image: ffcv's metadata row and allocation-table entry, rounded up
PROGRESS_EVERY_S = 30.0  # a progress line this often when stderr is not a terminal
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
REFUSED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


class PrepareError(InputError, RuntimeError):
    """Bad input for the prepare stage; the message names the path and what to do."""


@dataclass(frozen=True)
class Item:
    path: Path
    label: int


@dataclass
class ImageNetScan:
    """What a dataset folder holds: class wnids in index order and the labelled images per split."""

    root: Path
    wnids: list[str]
    train: list[Item]
    val: list[Item]
    names: list[str | None]
    label_files: list[Path] = field(default_factory=list)  # CSVs the labels came from
    odd: list[tuple[Path, str]] = field(default_factory=list)  # named like images but no image file


# ---------------------------------------------------------------- scanning the folders

def _visible(path: Path, below: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(below).parts)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _not_a_file(path: Path) -> str | None:
    """Why an entry named like an image is no image file (a folder, a broken or looping symlink), or None."""
    if path.is_file():
        return None
    if path.is_dir():
        return "a folder, not an image file (its contents are scanned as usual)"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"broken symlink (target {os.readlink(path)} not found)" if path.is_symlink() else str(exc)
    return "not a regular file"


def _image_entries(folder: Path) -> list[Path]:
    """Everything named like an image anywhere below `folder`, skipping dotfiles and hidden folders."""
    return sorted(p for p in folder.rglob("*") if _is_image(p) and _visible(p, folder))


def _image_files(folder: Path) -> list[Path]:
    """Images anywhere below `folder` (like ImageFolder); `_odd_entries` reports what this leaves out."""
    return [p for p in _image_entries(folder) if p.is_file()]


def _odd_entries(split_dir: Path) -> list[tuple[Path, str]]:
    return [(p, why) for p in _image_entries(split_dir) if (why := _not_a_file(p)) is not None]


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _loose_images(split_dir: Path) -> list[Path]:
    files = (p for p in split_dir.iterdir() if _is_image(p) and not p.name.startswith("."))
    return sorted(p for p in files if p.is_file())


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise PrepareError(
            f"{path}: missing {what} folder; data.imagenet_dir must hold train/<wnid>/*.JPEG and "
            f"val/ (val/<wnid>/*.JPEG, or flat val/*.JPEG with {VAL_SOLUTION})"
        )


def _scan_class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """wnid -> images of each class folder; every folder must hold at least one image."""
    loose = _loose_images(split_dir)
    if loose:
        raise PrepareError(
            f"{split_dir}: {len(loose)} image(s) outside a class folder (e.g. {loose[0].name}); "
            "move each into its <wnid>/ folder"
        )
    folders = {d.name: _image_files(d) for d in _class_dirs(split_dir)}
    empty = [str(split_dir / w) for w, files in folders.items() if not files]
    if empty:
        raise PrepareError(
            "class folder(s) without images: " + ", ".join(empty) + "; add the images or remove the folder"
        )
    return folders


def _find_label_file(root: Path, name: str) -> Path | None:
    """`name` in the dataset folder, in val/, or at the top of a Kaggle download."""
    candidates = [root / name, root / "val" / name]
    resolved = root.resolve()
    if resolved.parts[-3:] == KAGGLE_SUBDIR:
        candidates.append(resolved.parents[2] / name)
    return next((p for p in candidates if p.is_file()), None)


def _read_val_solution(path: Path) -> dict[str, str]:
    """ImageId -> wnid, from Kaggle's `ImageId,PredictionString` (the string starts with the wnid)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise PrepareError(f"{path}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        labels = {}
        for line, row in enumerate(reader, start=2):
            words = (row["PredictionString"] or "").split()
            if not words:
                raise PrepareError(f"{path}: line {line}: empty PredictionString for {row['ImageId']}")
            labels[row["ImageId"]] = words[0]
    return labels


def _scan_flat_val(root: Path, val_dir: Path) -> tuple[dict[str, list[Path]], Path]:
    """wnid -> images of a flat val/ folder labelled by LOC_val_solution.csv."""
    solution = _find_label_file(root, VAL_SOLUTION)
    if solution is None:
        raise PrepareError(
            f"{val_dir}: val/ has no class folders and no {VAL_SOLUTION} was found in {root} or "
            f"{val_dir}; put Kaggle's {VAL_SOLUTION} there or sort the images into val/<wnid>/"
        )
    images = _image_files(val_dir)
    if not images:
        raise PrepareError(f"{val_dir}: val/ holds no images")
    labels = _read_val_solution(solution)
    unlabelled = [str(p) for p in images if p.stem not in labels]
    if unlabelled:
        raise PrepareError(
            f"{len(unlabelled)} val image(s) missing from {solution}: " + ", ".join(unlabelled[:20])
            + (" ..." if len(unlabelled) > 20 else "") + "; add their rows or remove the images"
        )
    by_class: dict[str, list[Path]] = {}
    for path in images:
        by_class.setdefault(labels[path.stem], []).append(path)
    return by_class, solution


def _read_names(root: Path, wnids: list[str]) -> list[str | None]:
    mapping = _find_label_file(root, SYNSET_MAPPING)
    if mapping is None:
        return [None] * len(wnids)
    names = dict(line.split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
    return [names.get(w) for w in wnids]


def _labelled(by_class: dict[str, list[Path]], index: dict[str, int]) -> list[Item]:
    return [Item(p, index[w]) for w in sorted(by_class) for p in by_class[w]]


def scan_imagenet(root: Path) -> ImageNetScan:
    """Read the folder layout; class indices are the sorted train wnids. Raises PrepareError.

    Images are ordered by class, then path, in both val layouts, so a flat val/ gives the same
    val.beton as the same images sorted into class folders.
    """
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    _require_dir(train_dir, "train/")
    _require_dir(val_dir, "val/")
    train = _scan_class_folders(train_dir)
    if not train:
        raise PrepareError(f"{train_dir}: no class folders; expected train/<wnid>/*.JPEG")
    if _class_dirs(val_dir):
        val, label_files = _scan_class_folders(val_dir), []
    else:
        val, solution = _scan_flat_val(root, val_dir)
        label_files = [solution]
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise PrepareError(
            f"{val_dir}: val class(es) {unknown} have no folder in {train_dir}; "
            "the class list comes from train/, so add those train folders or remove those val images"
        )
    wnids = sorted(train)
    index = {w: i for i, w in enumerate(wnids)}
    return ImageNetScan(root, wnids, _labelled(train, index), _labelled(val, index),
                        _read_names(root, wnids), label_files, _odd_entries(train_dir) + _odd_entries(val_dir))


# ---------------------------------------------------------------- checking and decoding images

def to_rgb(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8. 16-bit greyscale is scaled to 8 bits (PIL's convert("RGB") clips it, turning a
    16-bit PNG almost white); every other mode goes through convert("RGB"), which drops alpha as
    torchvision's `pil_loader` does. 32-bit modes are refused by `image_problem` before this runs.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.uint32)
        eight = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(eight[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def inspect_image(path: Path, draft_size: int) -> tuple[str | None, tuple[int, int]]:
    """(why `path` cannot be used as an RGB image or None, its width and height). Decodes the whole file.

    JPEGs decode at a reduced DCT scale (`draft`), which still reads all the compressed data, so
    truncation and corruption show up at a fraction of the cost of a full-size decode.
    """
    size = (0, 0)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", size
        with Image.open(path) as img:
            size = img.size
            if img.mode in REFUSED_MODES:
                return (f"unsupported image mode {img.mode} ({REFUSED_MODES[img.mode]}): it has no fixed "
                        "white level to map to 8 bits; convert it to 8- or 16-bit RGB or greyscale"), size
            img.draft("RGB", (draft_size, draft_size))
            to_rgb(img)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        return f"unreadable ({type(exc).__name__}: {exc})", size
    return None, size


def inspect_images(paths: list[Path], workers: int, draft_size: int) -> tuple[list[tuple[Path, str]], list]:
    """(path, reason) of every image that does not decode, and every image's (width, height)."""
    with mp.Pool(workers) as pool:
        found = pool.map(partial(inspect_image, draft_size=draft_size), paths, chunksize=32)
    bad = [(p, why) for p, (why, _) in zip(paths, found) if why is not None]
    return bad, [size for _, size in found]


def load_rgb(path: Path, max_resolution: int) -> np.ndarray:
    """HxWx3 uint8 RGB, longest side at most `max_resolution`, resized by ffcv's own `resizer` (so the
    writer's resize is then a no-op and the pixels are what the stock writer would store).

    CMYK, grayscale, 16-bit, palette and RGBA images (and PNGs named .JPEG) become RGB (`to_rgb`).
    EXIF orientation is not applied, as torchvision's ImageFolder does not apply it.
    """
    import_ffcv()
    from ffcv.fields.rgb_image import resizer

    with Image.open(path) as img:
        rgb = to_rgb(img)
    return resizer(rgb, max_resolution)


def _load_or_none(path: Path, max_resolution: int) -> np.ndarray | None:
    try:
        return load_rgb(path, max_resolution)
    except Exception:  # reported by the writer's parent, which names the file
        return None


def _decode_in_order(paths: list[Path], max_resolution: int, workers: int) -> Iterator[np.ndarray | None]:
    """Decoded images in order; the pool works on the next block while this one is consumed."""
    job = partial(_load_or_none, max_resolution=max_resolution)
    blocks = [paths[i:i + DECODE_BLOCK] for i in range(0, len(paths), DECODE_BLOCK)]
    with mp.Pool(workers) as pool:
        pending = pool.map_async(job, blocks[0])
        for following in blocks[1:] + [None]:
            ready = pending.get()
            if following is not None:
                pending = pool.map_async(job, following)
            yield from ready


class DecodedAhead:
    """(image, label) samples for ffcv's writer, which must read them in order from one process.

    Before returning sample i it seeds numpy's global RNG with (seed, i): that is the RNG ffcv's
    `RGBImageField.encode` draws from in 'proportion' mode, so the JPEG-or-raw choice of each image
    depends only on the seed and its index. A sample that cannot be produced (its file changed since
    validation, or anything else goes wrong) becomes a 1x1 placeholder and its index is recorded in
    `failed`, so the error names the file (an exception raised here would only kill ffcv's worker).
    """

    def __init__(self, items: list[Item], max_resolution: int, workers: int, seed: int, failed):
        self.items, self.max_resolution, self.workers, self.seed = items, max_resolution, workers, seed
        self.failed = failed
        self._stream: Iterator | None = None
        self._next = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            image = self._decoded(index)
        except Exception:
            traceback.print_exc()
            image = None
        if image is None:
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = index
            image = np.zeros((1, 1, 3), np.uint8)
        np.random.seed([self.seed, index])
        return image, self.items[index].label

    def _decoded(self, index: int) -> np.ndarray | None:
        if self._stream is None:
            paths = [item.path for item in self.items]
            self._stream = _decode_in_order(paths, self.max_resolution, self.workers)
        if index != self._next:
            raise IndexError(f"samples must be read in order: expected {self._next}, got {index}")
        self._next += 1
        image = next(self._stream)
        if self._next == len(self.items):
            self._stream.close()  # shuts the pool down
        return image


# ---------------------------------------------------------------- writing

class Progress:
    """Images written and images/s: a bar redrawn in place on a terminal, else a line every
    `every_s` seconds (Snakemake and log files get no carriage-return noise)."""

    def __init__(self, name: str, total: int, every_s: float = PROGRESS_EVERY_S, stream=None):
        self.name, self.total, self.every_s = name, total, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else self.every_s):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        text = (f"prepare: {self.name}: {done}/{self.total} images, {rate:.0f} images/s, "
                f"ETA {eta:.0f} s" if not final else
                f"prepare: {self.name}: {done} images in {now - self.start:.1f} s, {rate:.0f} images/s")
        if self.tty:
            width = 24
            filled = int(width * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def watched_writer(path: Path, fields: dict, name: str):
    """ffcv's `DatasetWriter`, except that the parent watches its writer process: ffcv's own loop
    waits for a sample count that a dead worker (ENOSPC in `flush_page`, a crash) never reaches,
    so it hangs forever. Here a dead worker ends the write at once with an error. It also reports
    progress in our format instead of ffcv's tqdm bar."""
    import_ffcv()
    from ffcv.writer import DatasetWriter

    class WatchedWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            _write_watched(self, name, num_samples, queue_content, work_fn, extra_worker_args)

    # One writer process: with more, page order depends on process timing (see the module doc).
    return WatchedWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=1)


def _write_watched(writer, name: str, num_samples: int, queue_content, work_fn, extra_worker_args) -> None:
    """ffcv 1.0.2's `DatasetWriter._write_common` with a liveness check and our progress report."""
    from ffcv.memory_allocator import MemoryAllocator

    writer.num_samples = num_samples
    writer.prepare()
    work = mp.Queue()
    for todo in queue_content:
        work.put(todo)
    allocations = mp.Queue()
    for _ in range(writer.num_workers):
        work.put(None)
    done = mp.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations,
            *extra_worker_args)
    processes = [mp.Process(target=work_fn, args=args) for _ in range(writer.num_workers)]
    for proc in processes:
        proc.start()
    progress = Progress(name, num_samples)
    try:
        collected: list = []
        while len(collected) < len(processes):  # each worker sends its allocations as it ends
            try:
                collected.append(allocations.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            progress.update(done.value)
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise WriterDied(dead[0].exitcode)
        progress.update(done.value, final=True)
        writer.finalize([a for content in collected for a in content])
    finally:
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


class WriterDied(PrepareError):
    """ffcv's writer process exited with an error (its traceback is printed above)."""

    def __init__(self, exitcode: int):
        super().__init__(f"ffcv's writer process exited with status {exitcode}")
        self.exitcode = exitcode


def beton_bytes(sizes: list[tuple[int, int]], settings: dict) -> int:
    """About how large ffcv's file of images of these sizes will be: whole pages of stored pixels
    (raw bytes, or about a tenth of them when JPEG-encoded) plus per-image metadata."""
    raw = 0
    for width, height in sizes:
        ratio = min(1.0, settings["max_resolution"] / max(width, height, 1))
        raw += int(ratio * width) * int(ratio * height) * 3  # ffcv's resizer truncates the same way
    jpeg = {"raw": 0.0, "jpg": 1.0, "proportion": settings["compress_probability"]}[settings["write_mode"]]
    data = raw * (1 - jpeg) + raw * jpeg / JPEG_RATIO
    return max(1, -(-int(data) // PAGE_SIZE)) * PAGE_SIZE + len(sizes) * METADATA_BYTES


def image_field(settings: dict) -> RGBImageField:
    """ffcv's `RGBImageField` with `settings`' (prepare's) write mode, size and quality, its JPEGs
    carrying a restart marker every `jpeg_restart_interval` MCUs (0: ffcv's own encoder). The
    loader's crop decoder then Huffman-decodes only the restart intervals a crop touches
    (loader/jpegcrop.c). ffcv's field has no encoder option, and its reader knows fields by their
    exact class (a subclass would be read back as unknown), so the instance's `encode` is replaced."""
    import_ffcv()
    from ffcv.fields import RGBImageField

    field = RGBImageField(write_mode=settings["write_mode"], max_resolution=settings["max_resolution"],
                          jpeg_quality=settings["jpeg_quality"], compress_probability=settings["compress_probability"])
    if settings["jpeg_restart_interval"] > 0:
        field.encode = partial(_encode_restart_marked, field, settings["jpeg_restart_interval"])
    return field


def _encode_restart_marked(field, interval: int, destination, image, malloc) -> None:
    """ffcv 1.0.2's `RGBImageField.encode` (raw, jpg, or one of them drawn from numpy's global RNG as
    ffcv draws it), with OpenCV's restart interval added to the JPEG encoder's settings."""
    import cv2
    from ffcv.fields.rgb_image import IMAGE_MODES, resizer

    image = resizer(np.asarray(image), field.max_resolution)
    mode = field.write_mode
    if mode == "proportion":
        mode = "jpg" if np.random.rand() < field.proportion else "raw"
    if mode == "jpg":
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, field.jpeg_quality, cv2.IMWRITE_JPEG_RST_INTERVAL, interval])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    else:
        data = np.ascontiguousarray(image)
    destination["mode"] = IMAGE_MODES[mode]
    destination["height"], destination["width"] = image.shape[:2]
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data.reshape(-1)


def write_beton(path: Path, items: list[Item], settings: dict, name: str = "beton") -> None:
    """Write `items` to an ffcv file at `path`, byte for byte the same on every run."""
    import_ffcv()
    from ffcv.fields import IntField

    failed = mp.Value("q", -1)
    dataset = DecodedAhead(items, settings["max_resolution"], settings["num_workers"], settings["seed"],
                           failed)
    fields = {"image": image_field(settings), "label": IntField()}
    writer = watched_writer(path, fields, name)
    try:
        writer.from_indexed_dataset(dataset)
    except WriterDied as exc:
        free = free_bytes(path.parent)
        if free < PAGE_SIZE:  # the worker could not write its next page
            raise DiskFullError(
                f"no space left on {path.parent}: writing {name} stopped with {free / MB:.1f} MB free; "
                f"a beton needs whole {PAGE_SIZE // MB} MB pages; free some space or point paths.data at a "
                "larger disk, then re-run"
            ) from exc
        raise PrepareError(f"{path}: {exc}; any traceback is printed above; re-run prepare") from exc
    if failed.value >= 0:
        raise PrepareError(
            f"{items[failed.value].path}: writing failed at this image although it passed validation "
            "(did the file change during prepare? any traceback is printed above); re-run prepare"
        )


def count_jpeg(path: Path) -> int:
    """How many images of a beton are stored as JPEG (the rest are raw pixels)."""
    import_ffcv()
    from ffcv.reader import Reader

    modes = Reader(str(path)).metadata["f0"]["mode"]  # f0: the image field, written first
    return int((modes == 0).sum())  # ffcv's IMAGE_MODES: 0 = jpg, 1 = raw


def input_fingerprint(scan: ImageNetScan) -> str:
    """Digest of every input file's path, size and mtime (hashing ImageNet's content takes too long)."""
    digest = hashlib.sha256()
    for item in scan.train + scan.val:
        _add_file(digest, item.path, scan.root, f"{item.label}")
    for path in scan.label_files:
        _add_file(digest, path, scan.root, "labels")
    return digest.hexdigest()


def _add_file(digest, path: Path, root: Path, tag: str) -> None:
    stat = path.stat()
    digest.update(f"{tag}\t{path.relative_to(root) if path.is_relative_to(root) else path}"
                  f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())


def is_prepared(out: Path, expected: dict) -> bool:
    """The manifest says these inputs and settings were written, and every output matches its sha256."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    recorded = manifest.get("sha256", {})
    return all((out / name).is_file() and recorded.get(name) == sha256(out / name) for name in OUTPUTS)


def _remove_temp_files(out: Path) -> None:
    """Temp files a killed run left behind (only ever called under the data dir's lock)."""
    for name in (MANIFEST,) + OUTPUTS:
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------- the stage

def imagenet_root(params: dict) -> Path:
    """`data.imagenet_dir`, or the embedded dataset that `python -m pipeline_src.synthetic` writes."""
    given = params["data"]["imagenet_dir"]
    if given is not None:
        root = Path(given)
        if not root.is_dir():
            raise PrepareError(
                f"data.imagenet_dir = {given}: no such folder; point it at the folder holding train/ and val/"
            )
        return root
    root = Path(params["paths"]["data"]) / "synthetic" / "imagenet"
    if not root.is_dir():
        raise PrepareError(
            f"{root}: embedded dataset not found; run `python -m pipeline_src.synthetic` first, "
            "or set data.imagenet_dir to an ILSVRC2012 folder"
        )
    return root


def _settings(params: dict) -> dict:
    return {**params["prepare"], "on_corrupt": params["data"]["on_corrupt"]}


def _check_images(scan: ImageNetScan, settings: dict) -> tuple[list[dict], list[tuple[int, int]]]:
    """Decode every image; raise listing all bad ones (broken symlinks too), or drop them from `scan`.

    Returns what the manifest lists as skipped (with `data.on_corrupt: skip` the bad files; always
    the folders named like images) and the (width, height) of every image kept.
    """
    items = scan.train + scan.val
    bad, sizes = inspect_images([i.path for i in items], settings["num_workers"], settings["max_resolution"])
    folders = [(p, why) for p, why in scan.odd if p.is_dir()]
    bad += [(p, why) for p, why in scan.odd if not p.is_dir()]
    if folders:
        print(f"prepare: {len(folders)} folder(s) named like images (listed in {MANIFEST}):\n"
              + "\n".join(f"  {path}" for path, _ in folders))
    if bad:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        if settings["on_corrupt"] == "error":
            raise PrepareError(
                f"{len(bad)} unreadable image file(s) under {scan.root}:\n{lines}\n"
                "Replace or delete them, or set data.on_corrupt=skip to leave them out "
                "(they are then listed in manifest.json)."
            )
        print(f"prepare: skipping {len(bad)} unreadable image file(s) (data.on_corrupt=skip):\n{lines}")
    dropped = {path for path, _ in bad}
    sizes = [size for item, size in zip(items, sizes) if item.path not in dropped]
    scan.train = [i for i in scan.train if i.path not in dropped]
    scan.val = [i for i in scan.val if i.path not in dropped]
    missing = sorted(set(scan.wnids) - {scan.wnids[i.label] for i in scan.train})
    if missing:
        raise PrepareError(f"{scan.root / 'train'}: class(es) {missing} have no readable images left")
    if not scan.val:
        raise PrepareError(f"{scan.root / 'val'}: no readable images left")
    skipped = [{"file": str(path.relative_to(scan.root)), "reason": reason} for path, reason in bad + folders]
    return skipped, sizes


def _split_summary(items: list[Item], wnids: list[str], beton: Path) -> dict:
    counts = np.bincount([i.label for i in items], minlength=len(wnids))
    return {"images": len(items), "jpeg_encoded": count_jpeg(beton),
            "per_class": {w: int(n) for w, n in zip(wnids, counts)}}


def _software() -> dict:
    return {name: version(name) for name in ("ffcv", "pillow", "opencv-python", "numpy")}


def _write_outputs(scan: ImageNetScan, out: Path, settings: dict) -> None:
    """Write the new set beside the old one, then swap it in: a killed re-prepare keeps the old set."""
    classes = {"wnids": scan.wnids, "names": scan.names}
    with atomic_path(out / "classes.json") as classes_tmp, \
            atomic_path(out / "train.beton") as train_tmp, atomic_path(out / "val.beton") as val_tmp:
        classes_tmp.write_text(json.dumps(classes, indent=2) + "\n")
        for split, tmp in (("train", train_tmp), ("val", val_tmp)):
            write_beton(tmp, getattr(scan, split), settings, f"{split}.beton")
        # The old set stops counting as done just before the three renames that replace it.
        (out / MANIFEST).unlink(missing_ok=True)


def _check_space(out: Path, sizes: list[tuple[int, int]], scan: ImageNetScan, settings: dict) -> None:
    """Both new betons must fit beside the old ones (kept until the new set is complete)."""
    n_train = len(scan.train)
    need = beton_bytes(sizes[:n_train], settings) + beton_bytes(sizes[n_train:], settings)
    check_free_space(out, need, f"writing {len(sizes)} images into train.beton and val.beton")


def prepare(params: dict) -> Path:
    """Write the betons of `data.imagenet_dir` (or the embedded data) to `<paths.data>/betons/`."""
    settings = _settings(params)
    root = imagenet_root(params)
    out = Path(params["paths"]["data"]) / "betons"
    scan = scan_imagenet(root)
    expected = {"source": str(root), "inputs": input_fingerprint(scan), "settings": settings}
    if is_prepared(out, expected):
        print(f"prepare: {out} is up to date (inputs, settings and checksums match {MANIFEST}); "
              "nothing to do")
        return out
    skipped, sizes = _check_images(scan, settings)
    with dir_lock(out):
        _remove_temp_files(out)
        _check_space(out, sizes, scan, settings)
        _write_outputs(scan, out, settings)
        manifest = {
            **expected,
            "classes": len(scan.wnids),
            "splits": {s: _split_summary(getattr(scan, s), scan.wnids, out / f"{s}.beton") for s in SPLITS},
            "sha256": {name: sha256(out / name) for name in OUTPUTS},
            "skipped": skipped,
            "software": _software(),
        }
        write_json(out / MANIFEST, manifest)
    print(f"prepare: {out}: {len(scan.train)} train, {len(scan.val)} val images, {len(scan.wnids)} classes")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ILSVRC2012 folders -> FFCV betons + manifest")
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        prepare(params_mod.from_args(args))

    return run_main("prepare", body)


if __name__ == "__main__":
    sys.exit(main())
