"""ffcv train / val loaders built from params, for a CPU or a CUDA training loop.

One definition, two device paths. The random-resized crop always runs in the loader's numba
workers (the decoder, `SeededRandomResizedCrop`). Then either
  * CPU: flip, colour jitter -> PCA lighting -> normalize as one fused numba pass (`FusedAugment`)
    that the decoder applies to each crop in its own loop, float32 batches (the tests compare it
    with the four ops one after the other, tests/loader_reference.py); or
  * CUDA: flip in the workers on uint8, then the uint8 batch goes to the GPU
    (`ToDevice(non_blocking=True)`) and `gpu.DeviceAugment` applies the same jitter, lighting and
    normalization as torch ops there.
An augmentation whose params value is off (flip false, a strength 0) is left out of both paths.
No CUDA call is made unless `device` is a CUDA device.

Determinism: the sample order is ffcv's (a permutation seeded by hash(seed) + epoch) and every random
augmentation is keyed by (seed, epoch, sample index) (see `draws`), so epoch e's batches are the
same whether or not epochs 0..e-1 ran before in the process. Each `iter(loader)` yields epoch
`loader.epoch` and then advances it; `loader.set_epoch(e)` jumps there (resume).

ffcv reuses its output buffers: use or copy a batch before asking for the next few, and before the
next epoch starts (all epochs of a loader share one set of buffers, `_share_epoch_buffers`).
"""
from __future__ import annotations

import functools
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from pipeline_src.errors import InputError

from . import draws
from .gpu import DeviceAugment
from .decoders import SampleIndexDecoder, SeededRandomResizedCrop
from .state import EpochState
from .transforms import FusedAugment, Normalize, SeededFlip

ORDERS = {
    "random": OrderOption.RANDOM,
    "quasi_random": OrderOption.QUASI_RANDOM,
    "sequential": OrderOption.SEQUENTIAL,
}
# How long the consumer waits for a batch before checking that ffcv's pipeline thread is alive.
_POLL_SECONDS = 1.0


class LoaderError(InputError, RuntimeError):
    """The loader cannot be built from these params or files, or its pipeline thread died."""


@dataclass(frozen=True)
class Augment:
    """params['augment'] in the shape the ops take."""

    area: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    strengths: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    lighting_std: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_params(cls, params: dict) -> "Augment":
        a = params["augment"]
        return cls(tuple(a["crop_area"]), tuple(a["crop_ratio"]), a["flip"],
                   (a["brightness"], a["contrast"], a["saturation"], a["hue"]),
                   a["lighting_std"], tuple(a["mean"]), tuple(a["std"]))


def _device_dtype(params: dict, device: torch.device) -> torch.dtype:
    """float16 batches on CUDA under train.precision=amp, else float32 (CPU autocast casts itself)."""
    return torch.float16 if device.type == "cuda" and params["train"]["precision"] == "amp" else torch.float32


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device {device} requested but no CUDA device is visible; pass torch.device('cpu')")
    if device.type not in ("cpu", "cuda"):
        raise LoaderError(f"device {device}: the loader supports cpu and cuda only")


def _check_beton(beton: Path) -> Path:
    beton = Path(beton)
    if not beton.is_file():
        raise LoaderError(f"{beton}: beton not found; run the prepare stage (python -m pipeline_src.prepare)")
    return beton


def image_pipeline(decoder, worker_ops: list, device: torch.device, channels_last: bool) -> PipelineSpec:
    """decoder -> numba ops -> torch tensor NCHW on `device` (the order ffcv needs: numba ops first).

    On the CPU the batch stays in the buffer of the last numba op: ToDevice(cpu) would only copy it
    into another buffer that ffcv recycles in the same way (batches_ahead + 2 slots per op).
    """
    to_device = [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]
    transforms = [*worker_ops, ToTensor(), *to_device, ToTorchImage(channels_last=channels_last)]
    return PipelineSpec("image", decoder=decoder, transforms=transforms)


def train_ops(aug: Augment, state: EpochState, color_in_workers: bool) -> tuple[FusedAugment | None, list]:
    """(fused, ops): what runs in the workers after the crop is drawn and resized.

    CPU path: flip, jitter, lighting and normalize as one `FusedAugment`, which the decoder runs on
    each crop, and no pipeline ops. Device path: no fused pass, the flip as a pipeline op (if on).
    """
    if color_in_workers:
        return FusedAugment(aug.flip, aug.strengths, aug.lighting_std, aug.mean, aug.std), []
    return None, [SeededFlip(state)] if aug.flip else []


def _label_pipeline(device: torch.device) -> list:
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]


def _check_fields(beton: Path) -> None:
    try:
        fields = Reader(str(beton)).handlers
    except Exception as exc:  # ffcv raises assorted errors on a truncated or foreign file
        raise LoaderError(f"{beton}: not a readable ffcv beton ({exc}); re-run the prepare stage") from exc
    for name, kind in (("image", RGBImageField), ("label", IntField)):
        if not isinstance(fields.get(name), kind):
            raise LoaderError(f"{beton}: needs field '{name}' of type {kind.__name__}, has "
                              f"{ {k: type(v).__name__ for k, v in fields.items()} }; re-run the prepare stage")


def _ffcv_loader(beton: Path, params: dict, batch_size: int, pipelines: dict, order: str, seed: int,
                 drop_last: bool, distributed: bool) -> Loader:
    cfg = params["loader"]
    _check_fields(beton)
    if distributed and order == "quasi_random":
        raise LoaderError("key 'loader.order' = quasi_random is not supported by ffcv with distributed=True; "
                          "use random")
    if batch_size < 1:
        raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
    return Loader(str(beton), batch_size=batch_size, num_workers=cfg["num_workers"], os_cache=cfg["os_cache"],
                  order=ORDERS[order], distributed=distributed, seed=seed, pipelines=pipelines,
                  drop_last=drop_last)


class FastLoader:
    """Iterates (images, labels) of one epoch per `iter()`; see the module docstring."""

    def __init__(self, loader: Loader, state: EpochState | None, device_ops: DeviceAugment | None,
                 device: torch.device):
        self.loader = loader
        outputs = list(loader.pipeline_specs)  # ffcv yields one tensor per output, in this order
        self._slots = [outputs.index(name) for name in ("image", "label", "index") if name in outputs]
        self.state = state
        self.device_ops = device_ops
        self.device = device
        self.epoch = 0
        self._running = None  # the ffcv EpochIterator of the epoch being read
        _share_epoch_buffers(loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        """The next `iter()` yields epoch `epoch` (its order and augmentations), e.g. to resume."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        if self._running is not None:  # an unfinished earlier epoch would read the new epoch's state
            _stop(self._running)
        if self.state is not None:
            self.state.set_epoch(epoch)
        if self.device.type == "cuda":  # the last epoch's batches may still be read on the GPU
            torch.cuda.current_stream(self.device).synchronize()
        self.loader.next_epoch = epoch
        self._running = iter(self.loader)
        for batch in _drain(self._running):
            images, labels, *samples = (batch[i] for i in self._slots)
            if self.device_ops is not None:
                images = self.device_ops(images, samples[0] if samples else None)
            yield images, labels


def _share_epoch_buffers(loader: Loader) -> None:
    """Allocate the pipeline's batch buffers once, not once per epoch as ffcv 1.0.2 does.

    Each fresh allocation is zero-filled by the kernel page by page on first write: 6-7 % of the
    train loader's CPU on 2,000-image epochs of 300-500 px images (bench/README), and pinned host
    memory on CUDA. FastLoader never runs two epochs of a loader at once, so one set serves all.
    """
    loader.graph.allocate_memory = functools.cache(loader.graph.allocate_memory)


def _drain(it) -> Iterator[tuple]:
    """ffcv's EpochIterator.__next__ (1.0.2), but an error if its pipeline thread dies.

    ffcv blocks forever on its queue when a pipeline op raises in its thread; here the consumer
    polls and raises instead. Stopping early (break) stops and joins that thread.
    """
    try:
        while True:
            try:
                item = it.output_queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not it.is_alive():
                    raise LoaderError("the ffcv pipeline thread stopped before the end of the epoch; "
                                      "its traceback is printed above") from None
                continue
            if item is None:
                return
            slot, result = item
            if IS_CUDA:
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield result
    finally:
        _stop(it)


def _stop(it) -> None:
    """Stop and join an ffcv EpochIterator's thread (idempotent)."""
    it.terminate_event.set()
    while it.is_alive():  # at the epoch's end it blocks on put(None) until the queue has room
        try:
            it.output_queue.get_nowait()
        except queue.Empty:
            pass
        it.join(timeout=0.05)
    it.close()


def make_train_loader(beton: Path, params: dict, batch_size: int, seed: int, device: torch.device,
                      distributed: bool = False, color_on_device: bool | None = None) -> FastLoader:
    """Train batches: random-resized crop at loader.res, flip, colour jitter, PCA lighting, normalize.

    `batch_size` is per process (global batch // world size under DDP); with distributed=True each
    rank reads its shard (ffcv uses torch.distributed's rank and world size). `color_on_device`
    picks the path (default: torch ops on CUDA devices, numba ops in the workers on CPU). JPEGs are
    decoded at up to 1 / loader.max_decode_scale of their size when the crop allows, and only the
    crop's region where the crop library is built (`decoders`).
    """
    beton = _check_beton(beton)
    _check_device(device)
    cfg, aug = params["loader"], Augment.from_params(params)
    channels_last = params["train"]["channels_last"]
    state = EpochState(seed)
    in_workers = device.type == "cpu" if color_on_device is None else not color_on_device
    res = cfg["res"]
    fused, worker_ops = train_ops(aug, state, in_workers)
    # the fused augmentation is no pipeline op: the decoder runs it on each crop while it is in cache
    decoder = SeededRandomResizedCrop((res, res), aug.area, aug.ratio, state, cfg["max_decode_scale"], fused)
    pipelines = {
        "image": image_pipeline(decoder, worker_ops, device, channels_last),
        "label": _label_pipeline(device),
    }
    device_ops = None
    if not in_workers:
        device_ops = DeviceAugment(aug.strengths, aug.lighting_std, aug.mean, aug.std, state, device,
                                   _device_dtype(params, device), channels_last)
        if device_ops.random:
            pipelines["index"] = PipelineSpec("label", SampleIndexDecoder(), [ToTensor()])
    loader = _ffcv_loader(beton, params, batch_size, pipelines, cfg["order"], _order_seed(seed),
                          cfg["drop_last"], distributed)
    if len(loader) == 0:
        raise LoaderError(f"{beton}: {loader.reader.num_samples} samples give no batch of {batch_size} "
                          "(loader.drop_last is true); lower the batch size or set loader.drop_last=false")
    return FastLoader(loader, state, device_ops, device)


def make_val_loader(beton: Path, params: dict, batch_size: int, device: torch.device,
                    distributed: bool = False) -> FastLoader:
    """Val batches: shorter side to val_res / val_crop_ratio, centre crop val_res, normalize; in order.

    ffcv's CenterCropRGBImageDecoder cuts the centred square of side int(val_crop_ratio * shorter
    side) and resizes it to val_res: the same box as resize-then-crop. With distributed=True,
    ffcv's DistributedSampler pads the shards to equal length by repeating a few images.
    """
    beton = _check_beton(beton)
    _check_device(device)
    cfg, aug = params["loader"], Augment.from_params(params)
    channels_last = params["train"]["channels_last"]
    decoder = CenterCropRGBImageDecoder((cfg["val_res"], cfg["val_res"]), ratio=cfg["val_crop_ratio"])
    in_workers = device.type == "cpu"
    worker_ops = [Normalize(aug.mean, aug.std)] if in_workers else []
    pipelines = {
        "image": image_pipeline(decoder, worker_ops, device, channels_last),
        "label": _label_pipeline(device),
    }
    device_ops = None
    if not in_workers:
        device_ops = DeviceAugment((0.0, 0.0, 0.0, 0.0), 0.0, aug.mean, aug.std, None, device,
                                   _device_dtype(params, device), channels_last)
    loader = _ffcv_loader(beton, params, batch_size, pipelines, "sequential", 0, False, distributed)
    return FastLoader(loader, None, device_ops, device)


def _order_seed(seed: int) -> int:
    """ffcv permutes epoch e with seed + e, so seeds s and s + 1 would share shifted orders; hash it."""
    return int(draws.sample_key(seed, 0, 0, draws.STREAM_ORDER)) % 2**31


def measure_throughput(loader: FastLoader, batches: int | None = None, epochs: int = 1) -> dict:
    """Iterate `epochs` epochs (or stop after `batches` batches); images/s after the first batch.

    The first batch (numba compilation, pipeline start-up) is excluded from the clock.
    """
    seen = done = 0
    start = None
    for _ in range(epochs):
        for images, _labels in loader:
            done += 1
            if start is None:
                start = time.perf_counter()
            else:
                seen += images.shape[0]
            if batches is not None and done >= batches:
                break
        if batches is not None and done >= batches:
            break
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    return {"batches": done, "images": seen, "seconds": elapsed,
            "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
