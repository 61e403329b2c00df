"""Atomic writes: a killed stage never leaves a file that looks finished. Plus the checks around
them: enough free space before a write, file digests, and JSON reads that name a bad file."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline_src.errors import InputError

MB = 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # what the readers open


class DiskFullError(InputError):
    """Not enough free space for an output; the message names the folder and the sizes."""


class BadFileError(InputError):
    """A file a stage reads that is not what it should be (not JSON, not UTF-8)."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def free_bytes(folder: str | Path) -> int:
    return shutil.disk_usage(folder).free


def no_space(folder: str | Path, need: int, what: str) -> DiskFullError:
    return DiskFullError(
        f"no space left on {folder}: {what} needs about {need / MB:.1f} MB, have "
        f"{free_bytes(folder) / MB:.1f} MB; free some space or point paths.* at a larger disk, then re-run"
    )


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """Refuse a write that cannot fit before it starts, rather than fill the disk and fail half-way."""
    if free_bytes(folder) < need:
        raise no_space(folder, need, what)


def read_json(path: str | Path) -> Any:
    """A JSON file; one that is not UTF-8 JSON is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(
            f"{path}: not valid UTF-8 JSON ({exc}); delete it and re-run the stage that writes it"
        ) from exc
