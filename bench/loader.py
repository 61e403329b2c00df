"""Benchmark: our ffcv train loader vs torchvision ImageFolder + DataLoader and vs stock FFCV.

All three read the same synthetic ImageNet-like JPEGs (pipeline_src.synthetic, 300-500 px by
default) and produce the same batches: random-resized crop to --res, flip, colour jitter 0.4, PCA
lighting 0.1, normalize; same worker count and batch size. *Stock FFCV* is ffcv's own
RandomResizedCropRGBImageDecoder, RandomHorizontalFlip and NormalizeImage in its workers, with the
jitter and lighting as torch ops on each batch. After one warm-up epoch each (numba compilation,
page cache, worker start-up), timed blocks of --epochs epochs alternate the loaders, the order
reversed every repeat (ABC CBA ABC ...), so load from other processes hits all; each loader's
figure is the median of its --repeats blocks. Also measured: single-threaded JPEG decode of the
same files with PIL, OpenCV and ffcv's libjpeg-turbo decoder (the ceiling of a loader that decodes
every pixel, per core), our decoder's stages one at a time on the JPEGs of our beton, and the
start-up of our loader in a fresh process with an empty and with a filled numba cache. Our beton is
written as prepare writes one (`prepare.jpeg_restart_interval` of the params file); stock FFCV
reads a beton of ffcv's own JPEG field.

    python bench/loader.py [--images 2000] [--epochs 1] [--repeats 5] [--res 128] [--workers 2] [--batch 64]
    python bench/loader.py --min-size 48 --max-size 96 --res 32     # the CPU profile's images

Prints one JSON object; `speedup` = ours / torchvision images/s (medians), `speedup_vs_ffcv` =
ours / stock FFCV, `speedup_paired` the median of the per-repeat ratios. The synthetic data and the
betons are cached in --workdir (default $TMPDIR/tricks-bench-loader) and reused by later runs.
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
STAGE_ROUNDS = 5  # passes over the decode files per decoder and per stage (decode rates, stage costs)
sys.path.insert(0, str(REPO))

from pipeline_src import params as params_mod  # noqa: E402
from pipeline_src.io import atomic_path, write_json  # noqa: E402
from pipeline_src.loader import draws, make_train_loader  # noqa: E402
from pipeline_src.prepare import image_field  # noqa: E402
from pipeline_src.synthetic import generate_imagenet  # noqa: E402


def prepare_data(workdir: Path, images: int, min_size: int, max_size: int,
                 restart_interval: int) -> tuple[Path, Path, Path]:
    """The synthetic train folder and two JPEG betons of it (quality 90), made once per configuration:
    ours as prepare writes it (a restart marker every `restart_interval` MCUs), and stock FFCV's as
    its users write it (ffcv's own `RGBImageField`, no restart markers)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    classes = 10
    cfg = {"seed": 0, "classes": classes, "train_per_class": -(-images // classes), "val_per_class": 1,
           "min_size": min_size, "max_size": max_size, "scene_size": [96, 128]}
    root = workdir / f"n{cfg['train_per_class'] * classes}_{min_size}-{max_size}"
    if not (root / "done.json").is_file():
        print(f"generating {cfg['train_per_class'] * classes} images in {root} (once)", file=sys.stderr)
        generate_imagenet(root, cfg)
        write_json(root / "done.json", cfg)
    settings = {"write_mode": "jpg", "max_resolution": None, "jpeg_quality": 90, "compress_probability": 0.5,
                "jpeg_restart_interval": restart_interval}
    ours, stock = root / f"train_restart{restart_interval}.beton", root / "train.beton"
    for beton, field in ((ours, image_field(settings)), (stock, RGBImageField(write_mode="jpg", jpeg_quality=90))):
        if not beton.is_file():
            with atomic_path(beton) as tmp:
                DatasetWriter(str(tmp), {"image": field, "label": IntField()},
                              num_workers=2).from_indexed_dataset(ImageFolder(root / "imagenet/train"))
    return root / "imagenet/train", ours, stock


def beton_jpegs(beton: Path, indices: list[int]) -> list[np.ndarray]:
    """The stored JPEG bytes of these samples of a beton (image field, all JPEG)."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    pointers = reader.metadata["f0"]["data_ptr"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(beton, np.uint8, "r")
    return [np.array(data[p:p + sizes[p]]) for p in pointers[indices].tolist()]


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


class BatchColor:
    """Stock FFCV's tail as a user writes it: per-image jitter and PCA lighting as torch batch ops.

    ffcv's NormalizeImage runs in the workers (after ToDevice on a CPU it never returns), so the
    batch is mapped back to 0-255, jittered (brightness, contrast, saturation, one random order per
    batch, factors per image), lit and normalized again.
    """

    def __init__(self, params: dict):
        a = params["augment"]
        self.strengths = torch.tensor([a["brightness"], a["contrast"], a["saturation"]])
        self.lighting = Lighting(a["lighting_std"], a["mean"], a["std"])
        self.mean = torch.tensor(a["mean"])[None, :, None, None]
        self.sd = torch.tensor(a["std"])[None, :, None, None]
        self.gray = torch.tensor(draws.GRAY, dtype=torch.float32)[None, :, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.contiguous() * self.sd + self.mean
        factors = 1 + self.strengths * (2 * torch.rand(n, 3) - 1)
        for op in torch.randperm(3).tolist():
            f = factors[:, op, None, None, None]
            if op == 0:
                x = x * f
            else:
                grey = (x * self.gray).sum(1, keepdim=True)
                x = x * f + (1 - f) * (grey.mean((2, 3), keepdim=True) if op == 1 else grey)
            x = x.clamp_(0, 255)
        alpha = torch.randn(n, 3) * self.lighting.std
        shift = (alpha * self.lighting.eigval) @ self.lighting.eigvec.T
        x = (x + shift[:, :, None, None]).clamp_(0, 255)
        return (x - self.mean) / self.sd


class StockFFCV:
    """ffcv's own decoder and transforms (see BatchColor) over its own beton."""

    def __init__(self, beton: Path, params: dict, batch: int, workers: int):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        a, res = params["augment"], params["loader"]["res"]
        image = [RandomResizedCropRGBImageDecoder((res, res), scale=tuple(a["crop_area"]), ratio=tuple(a["crop_ratio"])),
                 RandomHorizontalFlip(), NormalizeImage(np.array(a["mean"]), np.array(a["std"]), np.float32),
                 ToTensor(), ToTorchImage()]
        self.loader = Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                             os_cache=True, drop_last=True, seed=0,
                             pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]})
        self.color = BatchColor(params)

    def __iter__(self):
        for images, labels in self.loader:
            yield self.color(images), labels


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


def decode_rates(files: list[Path], rounds: int = STAGE_ROUNDS) -> dict:
    """Single-threaded full-size decode of the same JPEGs from memory, images/s: the median of
    `rounds` passes over the files (single passes of one decoder varied by 15-30 % on an idle machine)."""
    import cv2
    from PIL import Image
    from ffcv.libffcv import imdecode

    blobs = [f.read_bytes() for f in files]
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    cv2.setNumThreads(1)

    def rate(fn) -> float:
        passes = []
        for _ in range(rounds):
            start = clock()
            for blob, size in zip(blobs, sizes):
                fn(blob, size)
            passes.append(len(blobs) / (clock() - start))
        return round(statistics.median(passes), 1)

    def ffcv_turbo(blob, size):
        w, h = size
        imdecode(np.frombuffer(blob, np.uint8), np.empty((h, w, 3), np.uint8), h, w, h, w, 0, 0, 1, 1, False, False)

    out = {}
    for clock in (time.perf_counter, time.thread_time):
        rates = {
            "pil": rate(lambda b, s: Image.open(io.BytesIO(b)).convert("RGB").load()),
            "opencv": rate(lambda b, s: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)),
            "ffcv_turbojpeg": rate(ffcv_turbo),
        }
        # by wall clock; by CPU time (the thread's): the rate of one fully used core, whatever the load
        out.update(rates if clock is time.perf_counter else {f"{k}_cpu": v for k, v in rates.items()})
    return out


def stage_costs(ours: list[np.ndarray], stock: list[np.ndarray], params: dict, rounds: int = STAGE_ROUNDS) -> dict:
    """Our decoder's stages one at a time, single-threaded, on the crops the loader draws (seed 0,
    epoch 0) from the JPEGs of our beton (`ours`; `stock`: the same images in stock FFCV's beton,
    without restart markers): microseconds per image of CPU time (`time.thread_time_ns` around each
    call), the median of `rounds` passes over the files with the stages' order reversed every pass.
    One pass of each varied by up to 2x on a quiet machine, and the resize, timed as (region +
    resize) - region before, even came out negative."""
    from ffcv.libffcv import imdecode
    from PIL import Image

    from pipeline_src.loader import decoders, kernels

    a, cfg = params["augment"], params["loader"]
    res, max_scale = cfg["res"], cfg["max_decode_scale"]
    jobs = []
    for i, (blob, plain) in enumerate(zip(ours, stock)):
        width, height = Image.open(io.BytesIO(blob.tobytes())).size
        top, left, h, w = draws.random_crop(np.uint64(draws.sample_key(0, 0, i, draws.STREAM_CROP)), height, width,
                                            *a["crop_area"], *a["crop_ratio"])
        scale = kernels.decode_scale(h, w, res, res, max_scale) if h >= res and w >= res else 1
        jobs.append((blob, height, width, top, left, h, w, scale, plain))
    buffer = np.empty(max(j[1] * j[2] for j in jobs) * 3, np.uint8)
    region, crop, out = np.zeros(2, np.int64), np.empty((res, res, 3), np.uint8), np.empty((res, res, 3), np.float32)
    strengths = np.array([a["brightness"], a["contrast"], a["saturation"], a["hue"]])
    mean = np.array(a["mean"], np.float32)
    inv_std = (1 / np.array(a["std"])).astype(np.float32)

    def full(job, scale, blob=None):
        height, width = job[1:3]
        imdecode(job[0] if blob is None else blob, buffer, height, width, height, width, 0, 0, 1, scale, False, False)

    def rows_cols(job):
        height, width, top, left, h, w, scale = job[1:8]
        sh, sw = -(-height // scale), -(-width // scale)
        r0, r1 = decoders.region_rows(top, h, scale, sh)
        c0, c1 = decoders.region_rows(left, w, scale, sw)
        return r0, r1, max(c0 - 1, 0), min(c1 + 1, sw)

    def region_decode(job, blob=None):
        r0, r1, c0, c1 = rows_cols(job)
        decoders.crop_decode(job[0] if blob is None else blob, buffer, job[7], r0, c0, r1 - r0, c1 - c0, region)

    def resize(job):
        top, left, h, w, scale = job[3:8]
        r0, r1, c0, c1 = rows_cols(job)
        image = buffer[:3 * (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0, 3)
        if h >= res and w >= res:
            kernels.area_resize(image, top / scale, left / scale, h / scale, w / scale, crop, r0, c0)

    def augment(job):
        kernels.augment_image(crop, out, 0, 0, 0, bool(a["flip"]), strengths, float(a["lighting_std"]),
                              draws.PCA_EIGVAL, draws.PCA_EIGVEC, mean, inv_std)

    def cost(fn, before=None) -> float:
        """CPU microseconds of fn per job; `before` (untimed) puts the job's input in place."""
        total = 0
        for job in jobs:
            if before is not None:
                before(job)
            start = time.thread_time_ns()
            fn(job)
            total += time.thread_time_ns() - start
        return total / len(jobs) / 1000

    stages = {"full_decode": (lambda j: full(j, 1), None), "full_decode_stock_jpeg": (lambda j: full(j, 1, j[8]), None),
              "scaled_full_decode": (lambda j: full(j, j[7]), None)}
    if decoders.HAS_CROP_DECODE:
        stages.update(region_decode=(region_decode, None), area_resize=(resize, region_decode),
                      region_decode_stock_jpeg=(lambda j: region_decode(j, j[8]), None))
    stages["fused_augment"] = (augment, None)
    for fn, before in stages.values():  # compile
        if before is not None:
            before(jobs[0])
        fn(jobs[0])
    passes: dict[str, list[float]] = {name: [] for name in stages}
    for r in range(rounds):
        for name in (list(stages) if r % 2 == 0 else list(reversed(stages))):
            passes[name].append(cost(*stages[name]))
    out_costs: dict = {name: round(statistics.median(v), 1) for name, v in passes.items()}
    scales = [j[7] for j in jobs]
    out_costs["decode_scale_share"] = {str(d): round(scales.count(d) / len(scales), 3) for d in (1, 2, 4, 8)}
    out_costs["crop_library_built"] = decoders.HAS_CROP_DECODE
    return out_costs


STARTUP_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch
from pipeline_src import params as params_mod
from pipeline_src.loader import make_train_loader
imported = time.perf_counter()
p = params_mod.load(sys.argv[2], sys.argv[3:])
loader = make_train_loader(sys.argv[1], p, 64, 0, torch.device("cpu"))
next(iter(loader))
print(json.dumps({"import_s": round(imported - start, 2), "first_batch_s": round(time.perf_counter() - imported, 2)}))
"""


def startup_seconds(beton: Path, params_file: Path, sets: list[str]) -> dict:
    """Our loader in a fresh process: import, then build and first batch (numba compilation and
    pipeline start), with an empty numba cache (every kernel compiled) and again with the cache that
    run filled (the `cache=True` kernels loaded; ffcv's generated pipeline code is compiled anew)."""
    import subprocess

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        runs = [json.loads(subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, str(beton), str(params_file), *sets],
                                          env=env, cwd=REPO, check=True, capture_output=True,
                                          text=True).stdout.splitlines()[-1])
                for _ in range(2)]
    return {"empty_numba_cache": runs[0], "filled_numba_cache": runs[1]}


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
    parser.add_argument("--no-startup", dest="startup", action="store_false",
                        help="skip the two fresh-process start-up runs")
    args = parser.parse_args(argv)

    sets = [f"loader.res={args.res}", f"loader.num_workers={args.workers}", "loader.order=random",
            "loader.drop_last=true", "loader.os_cache=true"]
    params = params_mod.load(args.params, sets)
    train_dir, beton, stock_beton = prepare_data(args.workdir, args.images, args.min_size, args.max_size,
                                                 params["prepare"]["jpeg_restart_interval"])

    load_before = round(os.getloadavg()[0], 2)
    # numba's TBB pool prints a warning on stdout when the DataLoader forks its workers: keep
    # stdout for the JSON by pointing file descriptor 1 at stderr while the loaders run
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        # torchvision first: its warm-up forks the worker processes, and a fork after an ffcv loader
        # has its buffers (ours keeps one set for all epochs) makes its next writes copy-on-write faults
        timed = interleave({"torchvision": torchvision_loader(train_dir, params, args.batch, args.workers),
                            "ffcv": make_train_loader(beton, params, args.batch, 0, torch.device("cpu")),
                            "stock_ffcv": StockFFCV(stock_beton, params, args.batch, args.workers)},
                           args.epochs, args.repeats)
    finally:
        sys.stdout.flush()
        ctypes.CDLL(None).fflush(None)  # C stdio buffers too
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    ffcv, tv, stock = timed["ffcv"], timed["torchvision"], timed["stock_ffcv"]
    picked = list(range(0, args.images, max(1, args.images // args.decode_files)))[: args.decode_files]
    all_files = sorted(train_dir.rglob("*.JPEG"))  # ImageFolder's order: the betons'
    files = [all_files[i] for i in picked]
    decode = decode_rates(files)
    per_core = ffcv["images_per_s"] / args.workers
    turbo = decode["ffcv_turbojpeg"]
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ffcv": ffcv,
        "torchvision": tv,
        "stock_ffcv": stock,
        "speedup": round(ffcv["images_per_s"] / tv["images_per_s"], 2),
        "speedup_paired": round(statistics.median(a / b for a, b in zip(ffcv["blocks"], tv["blocks"])), 2),
        "speedup_vs_ffcv": round(ffcv["images_per_s"] / stock["images_per_s"], 2),
        "speedup_vs_ffcv_paired": round(statistics.median(a / b for a, b in zip(ffcv["blocks"], stock["blocks"])), 2),
        "ffcv_images_per_s_per_core": round(per_core, 1),
        "torchvision_images_per_s_per_core": round(tv["images_per_s"] / args.workers, 1),
        "stock_ffcv_images_per_s_per_core": round(stock["images_per_s"] / args.workers, 1),
        "decode_images_per_s_one_core": decode,
        "ffcv_per_core_over_turbojpeg_decode": round(per_core / turbo, 2),
        "stock_ffcv_per_core_over_turbojpeg_decode": round(stock["images_per_s"] / args.workers / turbo, 2),
        "cpu_ratio": round(tv["cpu_ms_per_image"] / ffcv["cpu_ms_per_image"], 2),
        "cpu_ratio_vs_ffcv": round(stock["cpu_ms_per_image"] / ffcv["cpu_ms_per_image"], 2),
        "ffcv_cpu_images_per_s_per_core": round(1000 / ffcv["cpu_ms_per_image"], 1),
        "ffcv_cpu_per_core_over_turbojpeg_decode": round(1000 / ffcv["cpu_ms_per_image"] / decode["ffcv_turbojpeg_cpu"], 2),
        "stock_ffcv_cpu_per_core_over_turbojpeg_decode": round(1000 / stock["cpu_ms_per_image"]
                                                               / decode["ffcv_turbojpeg_cpu"], 2),
        "stages_us_per_image_one_core": stage_costs(beton_jpegs(beton, picked), beton_jpegs(stock_beton, picked),
                                                    params),
        "startup_seconds": startup_seconds(beton, args.params, sets) if args.startup else None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "load_average_1min_at_start": load_before,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
