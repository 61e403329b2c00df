"""GPU acceptance check: every CUDA branch of the pipeline run once on a real device, JSON out.

    python bench/gpu_check.py [--device cuda] [--out FILE] [--steps 100] [--batch 256] [--res 224]
    python bench/gpu_check.py --device cpu    # tiny sizes, the same code on CPU (tests/test_gpu_check.py)

Checks (each one code path of the pipeline, called as the stages call it):
  device_augment   loader/gpu.py's torch twins on the device against the same ops on CPU, same seeded draws
  loader           (ffcv) a beton from the synthetic generator, train/val loaders on the device path against
                   the worker path, and loader-only images/s
  train_eager /    train.train_one_epoch on a ResNet (ResNet-50 at 224 px on CUDA) with train.precision=amp
  train_compiled   (fp16 + GradScaler on CUDA), channels_last, without / with torch.compile: images/s, peak memory
  tricks_autocast  label smoothing, mixup and distillation losses under autocast against fp32 on CPU
  ddp              one DistributedDataParallel epoch (NCCL on CUDA, gloo on CPU) in a 1-process group,
                   SyncBatchNorm, against the same steps without DDP
  checkpoint       save after 2 steps (GradScaler state included), resume in fresh objects, 2 more steps:
                   the weights equal an uninterrupted run's
  transfer_detection / transfer_segmentation: one training step of each transfer stage's model
Where ffcv cannot be imported (GPU machines without its C build), `loader` is reported as skipped with
the reason and every torch-side check still runs. Any failed check makes the exit code 1, and stderr names
each failed check and its error. `speedup` is train_compiled / train_eager images/s.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_src import checkpoint, distributed, params as params_mod  # noqa: E402
from pipeline_src.io import write_json  # noqa: E402
from pipeline_src.models import build_model  # noqa: E402
from pipeline_src.engine import build_optimizer  # noqa: E402
from pipeline_src.training import build_batch_transform, build_criterion, train_one_epoch  # noqa: E402
from pipeline_src.tricks.distillation import distillation_loss  # noqa: E402
from pipeline_src.tricks.label_smoothing import smooth_targets, soft_target_cross_entropy  # noqa: E402
from pipeline_src.tricks.lr_schedule import build_scheduler  # noqa: E402
from pipeline_src.tricks.mixed_precision import autocast_context, make_grad_scaler  # noqa: E402
from pipeline_src.tricks.mixup import mixup  # noqa: E402

CPU = torch.device("cpu")


class Skipped(Exception):
    """This check cannot run on this machine (the reason is reported; it is not a pass)."""


# Sizes of the two modes: on CUDA the paper's ResNet-50 at 224 px; on CPU the smallest that runs every line.
SIZES = {
    "cuda": dict(depth=50, width=1.0, res=224, batch=256, steps=100, warmup=10, classes=1000,
                 loader_classes=10, loader_per_class=200, loader_size=(300, 500), compile_backend="inductor",
                detection_size=None, segmentation_crop=None),  # None: the ImageNet profile's transfer sizes
    "cpu": dict(depth=26, width=0.125, res=32, batch=4, steps=2, warmup=1, classes=10,
                loader_classes=2, loader_per_class=8, loader_size=(32, 48), compile_backend="eager",
                detection_size=(64, 96), segmentation_crop=48),
}


@functools.cache
def ffcv_status() -> tuple[bool, str]:
    """Whether ffcv (and so the pipeline's loader package) imports here, and why not (asked once)."""
    try:
        importlib.import_module("pipeline_src.loader")
    except ImportError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def device_augment_class():
    """loader/gpu.py's DeviceAugment, also where the loader package (it imports ffcv) cannot be imported."""
    if "pipeline_src.loader" not in sys.modules and not ffcv_status()[0]:
        # The package's __init__ builds ffcv pipelines; gpu.py and draws.py need only torch and numba.
        package = types.ModuleType("pipeline_src.loader")
        package.__path__ = [str(REPO / "pipeline_src" / "loader")]
        sys.modules["pipeline_src.loader"] = package
    return importlib.import_module("pipeline_src.loader.gpu").DeviceAugment


def base_params(device: torch.device, sizes: dict, overrides: list[str]) -> dict:
    """The profile of the device (ImageNet on CUDA, CPU profile on CPU) with this check's sizes."""
    source = REPO / ("configs/imagenet.yaml" if device.type == "cuda" else "params.yaml")
    sets = [f"model.depth={sizes['depth']}", f"model.width={sizes['width']}", f"loader.res={sizes['res']}",
            f"train.batch_size={sizes['batch']}", "train.precision=amp", "train.cpu_amp=bf16",
            "train.channels_last=true", f"monitor.finite_check_every={max(1, sizes['steps'])}", *overrides]
    return params_mod.resolve_run(params_mod.load(source, sets), "efficient")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """A loader stand-in: `steps` batches cycling over a few fixed ones already on the device."""

    def __init__(self, device: torch.device, steps: int, batch: int, res: int, classes: int, dtype: torch.dtype,
                 distinct: int = 2, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.data = [(torch.randn(batch, 3, res, res, generator=gen).to(device, dtype)
                      .contiguous(memory_format=torch.channels_last),
                      torch.randint(0, classes, (batch,), generator=gen).to(device)) for _ in range(distinct)]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.data[i % len(self.data)]


def amp_input_dtype(device: torch.device) -> torch.dtype:
    """What the loader yields under amp: fp16 batches on CUDA, float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def setup_run(params: dict, device: torch.device, steps: int, seed: int = 0, lr: float | None = None,
              sync_bn: bool = False):
    """Model, optimizer, scheduler and scaler as train.train builds them (BatchNorm synced before the optimizer)."""
    torch.manual_seed(seed)
    model = build_model(params["model"], params["_classes"])
    if sync_bn:
        model = distributed.sync_batchnorm(model, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, params["train"], params["train"]["base_lr"] if lr is None else lr)
    scheduler = build_scheduler(optimizer, iters_per_epoch=steps, epochs=1, warmup_epochs=0, schedule="cosine",
                                milestones=[], gamma=0.1)
    return model, optimizer, scheduler, make_grad_scaler(device, "amp")


def run_epoch(net, optimizer, scheduler, scaler, params: dict, device: torch.device, loader,
              precision: str = "amp") -> dict:
    batch_transform = build_batch_transform(params["train"], params["_classes"], torch.Generator().manual_seed(0))
    stats, _ = train_one_epoch(net, loader, build_criterion(None, params["distill"]), batch_transform, optimizer,
                               scheduler, scaler, params, device, precision, 0)
    if not torch.isfinite(torch.tensor(stats["train_loss"])):
        raise RuntimeError(f"train loss is {stats['train_loss']}")
    return stats


# ---------------------------------------------------------------------------------------------- checks

def check_device_augment(ctx: dict) -> dict:
    DeviceAugment = device_augment_class()
    device, n, res = ctx["device"], 16, ctx["sizes"]["res"]
    images = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    samples = torch.arange(100, 100 + n)
    state = types.SimpleNamespace(seed=3, epoch=2)  # DeviceAugment reads the EpochState's seed and epoch
    args = ((0.4, 0.4, 0.4, 0.1), 0.1, (123.68, 116.779, 103.939), (58.393, 57.12, 57.375), state)
    # the dtype the loader gives the model under amp: fp16 on CUDA, bf16 stands in for it on CPU
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    on_device = DeviceAugment(*args, device, low, True)(images.to(device), samples)
    reference = DeviceAugment(*args, CPU, torch.float32, True)(images, samples)
    diff = (on_device.float().cpu() - reference).abs().max().item()
    tolerance = 2e-2 if low == torch.float16 else 4e-2  # normalized units; one grey level is ~0.017
    if not on_device.is_contiguous(memory_format=torch.channels_last) or on_device.dtype != low:
        raise AssertionError(f"device batch is {on_device.dtype}, channels_last "
                             f"{on_device.is_contiguous(memory_format=torch.channels_last)}")
    if not diff <= tolerance:
        raise AssertionError(f"device twin differs from the CPU ops by {diff} > {tolerance}")
    return {"max_abs_diff": diff, "tolerance": tolerance, "dtype": str(low)}


def _write_betons(ctx: dict) -> Path:
    from pipeline_src.prepare import prepare
    from pipeline_src.synthetic import generate_imagenet

    sizes, data = ctx["sizes"], Path(ctx["tmp"]) / "data"
    lo, hi = sizes["loader_size"]
    params = params_mod.load(REPO / "params.yaml", [
        f"paths.data={data}", f"synthetic.classes={sizes['loader_classes']}",
        f"synthetic.train_per_class={sizes['loader_per_class']}", "synthetic.val_per_class=4",
        f"synthetic.min_size={lo}", f"synthetic.max_size={hi}", f"prepare.max_resolution={hi}",
        f"prepare.num_workers={min(8, os.cpu_count() or 1)}"])
    generate_imagenet(data / "synthetic", params["synthetic"])
    return prepare(params)


def check_loader(ctx: dict) -> dict:
    available, reason = ffcv_status()
    if not available:
        raise Skipped(f"ffcv cannot be imported here ({reason}); the torch twins ran in device_augment")
    from pipeline_src.loader import make_train_loader, make_val_loader, measure_throughput

    device, sizes = ctx["device"], ctx["sizes"]
    start = time.perf_counter()
    betons = Path(ctx["betons"]) if ctx["betons"] else _write_betons(ctx)
    write_s = time.perf_counter() - start
    params = base_params(device, sizes, [f"loader.num_workers={min(8, os.cpu_count() or 1)}",
                                         f"loader.val_res={sizes['res']}"])
    batch = min(sizes["batch"], 64)
    on_device = make_train_loader(betons / "train.beton", params, batch, 0, device, color_on_device=True)
    in_workers = make_train_loader(betons / "train.beton", params, batch, 0, CPU, color_on_device=False)
    tolerance = 2e-2 if device.type == "cuda" else 1e-3
    worst, compared = 0.0, 0
    for (x1, y1), (x2, y2) in zip(on_device, in_workers):
        if not torch.equal(y1.cpu(), y2):
            raise AssertionError("device and worker paths give other labels for the same seed and epoch")
        worst = max(worst, (x1.float().cpu() - x2).abs().max().item())
        compared += 1
        if compared == 3:
            break
    if not worst <= tolerance:
        raise AssertionError(f"device path batches differ from the worker path by {worst} > {tolerance}")
    val = make_val_loader(betons / "val.beton", params, batch, device)
    images, labels = next(iter(val))
    if images.device.type != device.type or images.shape[1:] != (3, sizes["res"], sizes["res"]):
        raise AssertionError(f"val batch {tuple(images.shape)} on {images.device}")
    throughput = measure_throughput(on_device)
    return {"betons_write_s": write_s, "batches_compared": compared, "max_abs_diff": worst,
            "tolerance": tolerance, "loader_images_per_s": throughput["images_per_s"], "batch": batch}


def _check_train(ctx: dict, compiled: bool) -> dict:
    device, sizes = ctx["device"], ctx["sizes"]
    params = {**base_params(device, sizes, []), "_classes": sizes["classes"]}
    model, optimizer, scheduler, scaler = setup_run(params, device, sizes["warmup"] + sizes["steps"])
    net = torch.compile(model, backend=sizes["compile_backend"]) if compiled else model
    make = lambda steps: Batches(device, steps, sizes["batch"], sizes["res"], sizes["classes"],  # noqa: E731
                                 amp_input_dtype(device))
    start = time.perf_counter()
    run_epoch(net, optimizer, scheduler, scaler, params, device, make(sizes["warmup"]))  # compiles when compiled
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = run_epoch(net, optimizer, scheduler, scaler, params, device, make(sizes["steps"]))
    out = {"images_per_s": stats["images_per_s"], "train_loss": stats["train_loss"], "warmup_s": warmup_s,
           "steps": sizes["steps"], "batch": sizes["batch"], "res": sizes["res"], "depth": sizes["depth"],
           "width": sizes["width"], "precision": "fp16+GradScaler" if scaler.is_enabled() else "bf16",
           "channels_last": True, "compile_backend": sizes["compile_backend"] if compiled else None}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["loss_scale"] = scaler.get_scale()
    return out


def check_tricks_autocast(ctx: dict) -> dict:
    device, classes, n = ctx["device"], 10, 32
    gen = torch.Generator().manual_seed(0)
    features, labels = torch.randn(n, 64, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    student, teacher = nn.Linear(64, classes), nn.Linear(64, classes)

    def losses(dev: torch.device, precision: str) -> dict:
        s, t = copy.deepcopy(student).to(dev), copy.deepcopy(teacher).to(dev)
        x, y = features.to(dev), labels.to(dev)
        targets = smooth_targets(y, classes, 0.1)
        mixed, mixed_targets, lam = mixup(x, targets, 0.2, torch.Generator().manual_seed(5))
        with autocast_context(dev, precision):
            logits = s(mixed)
            out = {"label_smoothing": soft_target_cross_entropy(s(x), targets),
                   "mixup": soft_target_cross_entropy(logits, mixed_targets),
                   "distillation": distillation_loss(logits, t(mixed), mixed_targets, 20.0, 1.0)}
        total = sum(out.values())
        total.backward()
        grads_finite = all(torch.isfinite(p.grad).all().item() for p in s.parameters())
        return {**{k: v.float().item() for k, v in out.items()}, "lam": lam, "grads_finite": grads_finite,
                "dtype": str(logits.dtype)}

    low, exact = losses(device, "amp"), losses(CPU, "fp32")
    if not low["grads_finite"]:
        raise AssertionError("non-finite gradients under autocast")
    if low["lam"] != exact["lam"]:
        raise AssertionError(f"mixup drew lam {low['lam']} on {device} but {exact['lam']} on CPU")
    worst = max(abs(low[k] - exact[k]) / abs(exact[k]) for k in ("label_smoothing", "mixup", "distillation"))
    if not worst <= 2e-2:
        raise AssertionError(f"autocast losses differ from fp32 by {worst:.3g} (relative): {low} vs {exact}")
    return {"autocast_dtype": low["dtype"], "max_rel_diff": worst, "losses": {k: low[k] for k in
            ("label_smoothing", "mixup", "distillation")}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group(device: torch.device):
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def check_ddp(ctx: dict) -> dict:
    device, sizes = ctx["device"], ctx["sizes"]
    small = {**sizes, "depth": 26, "width": 0.25, "res": 64 if device.type == "cuda" else 32, "batch": 16}
    params = {**base_params(device, small, ["train.sync_bn=true"]), "_classes": 10}
    # fp32 on CPU: GlobalBatchNorm2d (the CPU twin of SyncBatchNorm) rounds otherwise than BatchNorm2d in bf16
    precision = "amp" if device.type == "cuda" else "fp32"
    batches = lambda: Batches(device, 2, small["batch"], small["res"], 10, amp_input_dtype(device))  # noqa: E731
    weights = lambda m: {k: v.detach().float().cpu().clone() for k, v in m.state_dict().items()  # noqa: E731
                         if v.is_floating_point() and "running" not in k}
    results = []
    for wrap in (False, True):
        model, optimizer, scheduler, scaler = setup_run(params, device, 2, lr=1e-3, sync_bn=wrap)
        init = weights(model)
        if wrap:
            with one_process_group(device) as backend:
                net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                          else None)
                run_epoch(net, optimizer, scheduler, scaler, params, device, batches(), precision)
        else:
            run_epoch(model, optimizer, scheduler, scaler, params, device, batches(), precision)
        results.append(weights(model))
    plain, ddp = results
    moved = max((plain[k] - init[k]).abs().max().item() for k in plain)
    worst = max((plain[k] - ddp[k]).abs().max().item() for k in plain)
    tolerance = 0.01 * moved
    if not (moved > 0 and worst <= tolerance):
        raise AssertionError(f"DDP (1 process) weights differ from plain ones by {worst} > {tolerance} "
                             f"(training moved them by {moved})")
    sync_bn = "SyncBatchNorm" if device.type == "cuda" else "GlobalBatchNorm2d"
    return {"backend": backend, "batchnorm": sync_bn, "precision": precision, "max_abs_diff_vs_plain": worst,
            "max_weight_change": moved}


def check_checkpoint(ctx: dict) -> dict:
    device = ctx["device"]
    small = {**ctx["sizes"], "depth": 26, "width": 0.25, "res": 64 if device.type == "cuda" else 32, "batch": 8}
    params = {**base_params(device, small, []), "_classes": 10}
    batches = lambda: Batches(device, 2, small["batch"], small["res"], 10, amp_input_dtype(device))  # noqa: E731
    path = Path(ctx["tmp"]) / "last.pt"
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model, optimizer, scheduler, scaler = setup_run(params, device, 4)
        run_epoch(model, optimizer, scheduler, scaler, params, device, batches())
        checkpoint.save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": checkpoint.capture_rng_state({}), "epoch": 0})
        saved_scale = scaler.get_scale() if scaler.is_enabled() else None
        run_epoch(model, optimizer, scheduler, scaler, params, device, batches())
        straight = model.state_dict()

        state = checkpoint.load_checkpoint(path)  # on CPU: RNG states must stay CPU tensors
        resumed, optimizer, scheduler, scaler = setup_run(params, device, 4, seed=1)
        resumed.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng_state(state["rng"], {})
        loaded_scale = scaler.get_scale() if scaler.is_enabled() else None
        run_epoch(resumed, optimizer, scheduler, scaler, params, device, batches())
    finally:
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(False)
    if saved_scale != loaded_scale:
        raise AssertionError(f"GradScaler scale {saved_scale} saved but {loaded_scale} resumed")
    worst = max((straight[k].float() - v.float()).abs().max().item()
                for k, v in resumed.state_dict().items() if v.is_floating_point())
    if not worst <= 1e-5:
        raise AssertionError(f"resumed weights differ from the uninterrupted run's by {worst}")
    return {"loss_scale": loaded_scale, "max_abs_diff_vs_uninterrupted": worst, "weights_only_load": True}


def _backbone(ctx: dict, dilation: tuple[bool, bool, bool]):
    from pipeline_src.models.resnet import ResNet

    depth, width = (50, 1.0) if ctx["device"].type == "cuda" else (26, 0.125)
    model = ResNet(depth, "B", width, 10, "kaiming", replace_stride_with_dilation=dilation)
    model.fc, model.avgpool = nn.Identity(), nn.Identity()
    return model


def check_transfer_detection(ctx: dict) -> dict:
    from pipeline_src.transfer import detection

    device = ctx["device"]
    params = base_params(device, ctx["sizes"], [])
    cfg = params["transfer"]["detection"]
    side = ctx["sizes"]["detection_size"] or (cfg["min_size"], cfg["max_size"])
    cfg = {**cfg, "min_size": side[0], "max_size": side[1]}
    model = detection.build_faster_rcnn(_backbone(ctx, (False, False, False)), 20, cfg,
                                        params["augment"]["mean"], params["augment"]["std"]).to(device)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, side[0], side[1], generator=gen) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, side[1] / 2, side[0] / 2], [5.0, 5.0, side[1] - 5.0, side[0] - 5.0]]),
                "labels": torch.tensor([3, 7])} for _ in images]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    stats = detection.train_one_epoch(model, [(images, targets)], optimizer, device)
    return {"loss": stats["loss"], "image_size": list(side), "style": cfg["style"]}


def check_transfer_segmentation(ctx: dict) -> dict:
    from pipeline_src.transfer import segmentation

    device = ctx["device"]
    cfg = base_params(device, ctx["sizes"], [])["transfer"]["segmentation"]
    model = segmentation.build_fcn(_backbone(ctx, (False, True, True)), 151, cfg["aux_loss"]).to(device)
    gen = torch.Generator().manual_seed(0)
    crop = ctx["sizes"]["segmentation_crop"] or cfg["crop_size"]
    images = torch.randn(2, 3, crop, crop, generator=gen)
    masks = torch.randint(0, 151, (2, crop, crop), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scheduler = segmentation.poly_scheduler(optimizer, 1, cfg["poly_power"])
    stats = segmentation.train_one_epoch(model, [(images, masks)], optimizer, scheduler, cfg["aux_weight"], device)
    return {"loss": stats["loss"], "crop_size": crop}


CHECKS: dict[str, Callable[[dict], dict]] = {
    "device_augment": check_device_augment,
    "loader": check_loader,
    "train_eager": lambda ctx: _check_train(ctx, compiled=False),
    "train_compiled": lambda ctx: _check_train(ctx, compiled=True),
    "tricks_autocast": check_tricks_autocast,
    "ddp": check_ddp,
    "checkpoint": check_checkpoint,
    "transfer_detection": check_transfer_detection,
    "transfer_segmentation": check_transfer_segmentation,
}


def environment(device: torch.device) -> dict:
    ffcv, reason = ffcv_status()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "ffcv": ffcv, "ffcv_error": reason or None, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return env


def run_checks(device: torch.device, sizes: dict, names: list[str], betons: str | None) -> dict:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = {"device": device, "sizes": sizes, "tmp": tmp, "betons": betons}
        for name in names:
            start = time.perf_counter()
            try:
                result = {"status": "ok", **CHECKS[name](ctx)}
                synchronize(device)
            except Skipped as exc:
                result = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - every failure is reported, by check, then the exit is 1
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=8)}
            result["seconds"] = round(time.perf_counter() - start, 3)
            results[name] = result
            print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--betons", default=None, help="a folder with train.beton/val.beton (default: write one)")
    for key in ("steps", "batch", "res", "warmup"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default: {SIZES['cuda'][key]} on cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: FAILED: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run with --device cpu for the CPU mode", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0) if args.device == "cuda" else CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = {**SIZES[args.device], **{k: getattr(args, k) for k in ("steps", "batch", "res", "warmup")
                                      if getattr(args, k) is not None}}
    results = run_checks(device, sizes, args.only, args.betons)
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    eager, compiled = results.get("train_eager", {}), results.get("train_compiled", {})
    speedup = (compiled["images_per_s"] / eager["images_per_s"]
               if eager.get("status") == compiled.get("status") == "ok" else None)
    report = {"benchmark": "gpu_check", "environment": environment(device), "sizes": sizes, "checks": results,
              "failed": failed, "skipped": [n for n, r in results.items() if r["status"] == "skipped"],
              "speedup": speedup, "speedup_of": "train_compiled / train_eager images/s"}
    print(json.dumps(report, indent=1))
    if args.out is not None:
        write_json(args.out, report)
    for name in failed:
        print(f"gpu_check: FAILED: {name}: {results[name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
