"""Benchmark: our ffcv train loader vs torchvision ImageFolder + DataLoader, same augmentation.

Both read the same synthetic ImageNet-like JPEGs (pipeline_src.synthetic at 300-500 px) and produce
the same batches: random-resized crop to --res, flip, colour jitter 0.4, PCA lighting 0.1,
normalize; same worker count and batch size. After one warm-up epoch each (numba compilation,
page cache, worker start-up), timed blocks of --epochs epochs alternate the two loaders, the order
flipping every repeat (AB BA AB ...), so load from other processes hits both; each loader's figure
is the median of its --repeats blocks. Also timed: single-threaded JPEG decode of the same files
with PIL, OpenCV and ffcv's libjpeg-turbo decoder, the ceiling of any loader per core.

    python bench/loader.py [--images 2000] [--epochs 1] [--repeats 5] [--res 128] [--workers 2] [--batch 64]

Prints one JSON object; `speedup` = ffcv images/s / torchvision images/s (medians), `speedup_paired`
the median of the per-repeat ratios. The synthetic data and the beton are cached in --workdir
(default $TMPDIR/tricks-bench-loader) and reused by later runs.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_src import params as P  # noqa: E402
from pipeline_src.io import atomic_path, write_json  # noqa: E402
from pipeline_src.loader import draws, make_train_loader  # noqa: E402
from pipeline_src.synthetic import generate_imagenet  # noqa: E402


def prepare_data(workdir: Path, images: int, min_size: int, max_size: int) -> tuple[Path, Path]:
    """The synthetic train folder and a JPEG beton of it, made once per configuration."""
    classes = 10
    cfg = {"seed": 0, "classes": classes, "train_per_class": -(-images // classes), "val_per_class": 1,
           "min_size": min_size, "max_size": max_size, "scene_size": [96, 128]}
    root = workdir / f"n{cfg['train_per_class'] * classes}_{min_size}-{max_size}"
    marker = root / "done.json"
    beton = root / "train.beton"
    if not marker.is_file():
        print(f"generating {cfg['train_per_class'] * classes} images in {root} (once)", file=sys.stderr)
        generate_imagenet(root, cfg)
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
        from torchvision.datasets import ImageFolder

        fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()}
        with atomic_path(beton) as tmp:
            DatasetWriter(str(tmp), fields, num_workers=2).from_indexed_dataset(ImageFolder(root / "imagenet/train"))
        write_json(marker, cfg)
    return root / "imagenet/train", beton


class Lighting:
    """AlexNet PCA lighting on a float CHW tensor in [0, 255], then normalization (torchvision side)."""

    def __init__(self, std: float, mean: list[float], sd: list[float]):
        self.std = std
        self.eigval = torch.tensor(draws.PCA_EIGVAL, dtype=torch.float32)
        self.eigvec = torch.tensor(draws.PCA_EIGVEC, dtype=torch.float32)
        self.mean = torch.tensor(mean)[:, None, None]
        self.sd = torch.tensor(sd)[:, None, None]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigvec @ (alpha * self.eigval)
        x = (img.float() + shift[:, None, None]).clamp_(0, 255)
        return (x - self.mean) / self.sd


def torchvision_loader(train_dir: Path, params: dict, batch: int, workers: int):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    a, res = params["augment"], params["loader"]["res"]
    transform = T.Compose([
        T.RandomResizedCrop(res, scale=tuple(a["crop_area"]), ratio=tuple(a["crop_ratio"])),
        T.RandomHorizontalFlip(),
        T.ColorJitter(a["brightness"], a["contrast"], a["saturation"]),
        T.PILToTensor(),
        Lighting(a["lighting_std"], a["mean"], a["std"]),
    ])
    return torch.utils.data.DataLoader(ImageFolder(train_dir, transform=transform), batch_size=batch,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=True)


def cpu_seconds(loader) -> float:
    """CPU time (user + system) of this process and of a DataLoader's worker processes so far."""
    total = time.process_time()
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    for worker in workers:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def time_block(loader, epochs: int) -> tuple[int, float, float]:
    """Images, seconds and CPU seconds (all processes of the loader) of `epochs` full epochs."""
    seen, start, cpu = 0, time.perf_counter(), cpu_seconds(loader)
    for _ in range(epochs):
        for images, _labels in loader:
            seen += images.shape[0]
    return seen, time.perf_counter() - start, cpu_seconds(loader) - cpu


def interleave(loaders: dict, epochs: int, repeats: int) -> dict[str, dict]:
    """One untimed warm-up epoch each, then `repeats` timed blocks each, alternating (AB BA AB ...)."""
    names = list(loaders)
    out: dict[str, dict] = {name: {"images": 0, "seconds": 0.0, "cpu_seconds": 0.0, "blocks": []} for name in names}
    for name in names:
        time_block(loaders[name], 1)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            images, seconds, cpu = time_block(loaders[name], epochs)
            out[name]["images"] += images
            out[name]["seconds"] = round(out[name]["seconds"] + seconds, 3)
            out[name]["cpu_seconds"] = round(out[name]["cpu_seconds"] + cpu, 3)
            out[name]["blocks"].append(round(images / seconds, 1))
    for name in names:
        out[name]["images_per_s"] = round(statistics.median(out[name]["blocks"]), 1)
        # CPU time per image does not depend on how much of the machine other processes take
        out[name]["cpu_ms_per_image"] = round(1000 * out[name]["cpu_seconds"] / out[name]["images"], 3)
    return out


def decode_rates(files: list[Path]) -> dict:
    """Single-threaded full-size decode of the same JPEGs from memory, images/s."""
    import cv2
    from PIL import Image
    from ffcv.libffcv import imdecode

    blobs = [f.read_bytes() for f in files]
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    cv2.setNumThreads(1)

    def rate(fn) -> float:
        start = time.perf_counter()
        for blob, size in zip(blobs, sizes):
            fn(blob, size)
        return round(len(blobs) / (time.perf_counter() - start), 1)

    def ffcv_turbo(blob, size):
        w, h = size
        imdecode(np.frombuffer(blob, np.uint8), np.empty((h, w, 3), np.uint8), h, w, h, w, 0, 0, 1, 1, False, False)

    out = {
        "pil": rate(lambda b, s: Image.open(io.BytesIO(b)).convert("RGB").load()),
        "opencv": rate(lambda b, s: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)),
        "ffcv_turbojpeg": rate(ffcv_turbo),
    }
    try:
        import simplejpeg
        out["simplejpeg"] = rate(lambda b, s: simplejpeg.decode_jpeg(b))
    except ImportError:
        out["simplejpeg"] = None  # not installed
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per loader")
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-size", type=int, default=300)
    parser.add_argument("--max-size", type=int, default=500)
    parser.add_argument("--decode-files", type=int, default=300, help="files in the decode-rate loops")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tricks-bench-loader")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args(argv)

    params = P.load(args.params, [f"loader.res={args.res}", f"loader.num_workers={args.workers}",
                                  "loader.order=random", "loader.drop_last=true", "loader.os_cache=true"])
    train_dir, beton = prepare_data(args.workdir, args.images, args.min_size, args.max_size)

    load_before = round(os.getloadavg()[0], 2)
    # numba's TBB pool prints a warning on stdout when the DataLoader forks its workers: keep
    # stdout for the JSON by pointing file descriptor 1 at stderr while the loaders run
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        timed = interleave({"ffcv": make_train_loader(beton, params, args.batch, 0, torch.device("cpu")),
                            "torchvision": torchvision_loader(train_dir, params, args.batch, args.workers)},
                           args.epochs, args.repeats)
    finally:
        sys.stdout.flush()
        ctypes.CDLL(None).fflush(None)  # C stdio buffers too
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    ffcv, tv = timed["ffcv"], timed["torchvision"]
    files = sorted(train_dir.rglob("*.JPEG"))[:: max(1, args.images // args.decode_files)][: args.decode_files]
    decode = decode_rates(files)
    per_core = ffcv["images_per_s"] / args.workers
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ffcv": ffcv,
        "torchvision": tv,
        "speedup": round(ffcv["images_per_s"] / tv["images_per_s"], 2),
        "speedup_paired": round(statistics.median(a / b for a, b in zip(ffcv["blocks"], tv["blocks"])), 2),
        "ffcv_images_per_s_per_core": round(per_core, 1),
        "torchvision_images_per_s_per_core": round(tv["images_per_s"] / args.workers, 1),
        "decode_images_per_s_one_core": decode,
        "ffcv_per_core_over_turbojpeg_decode": round(per_core / decode["ffcv_turbojpeg"], 2),
        "cpu_ratio": round(tv["cpu_ms_per_image"] / ffcv["cpu_ms_per_image"], 2),
        "ffcv_cpu_images_per_s_per_core": round(1000 / ffcv["cpu_ms_per_image"], 1),
        "ffcv_cpu_per_core_over_turbojpeg_decode": round(1000 / ffcv["cpu_ms_per_image"] / decode["ffcv_turbojpeg"], 2),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "load_average_1min_at_start": load_before,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
