"""Training one named run for one seed: what the train and teacher stages both run.

The paper's recipe with every trick a switch: `build_setup` turns linear scaling, warmup, zero gamma,
no bias decay, mixed precision, step / cosine decay, label smoothing, mixup and distillation into the
objects the loop (`train_one_epoch`) uses, so the loop itself has no trick branches; `train` then
resumes, runs the epochs (`fit`) and writes the run's outputs (`engine.write_run_outputs`).
Outputs: data/runs/<run>/seed<k>/{last.pt, model.pt, history.json, metrics.json}; a run whose --set
overrides change its recipe writes to data/runs/adhoc/<run>-<hash>/seed<k>/ or --out DIR instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from pipeline_src import checkpoint, distributed, params as params_mod
from pipeline_src.engine import (betons_dir, build_optimizer, evaluate, pick_device, read_classes,
                                 write_run_outputs)
from pipeline_src.errors import DIVERGED, InputError
from pipeline_src.io import read_json
from pipeline_src.locks import dir_lock
from pipeline_src.models import build_model
from pipeline_src.run_folders import output_dir, run_dir, with_same_overrides
from pipeline_src.tricks.distillation import distillation_loss
from pipeline_src.tricks.label_smoothing import smooth_targets, soft_target_cross_entropy
from pipeline_src.tricks.linear_scaling import scaled_lr
from pipeline_src.tricks.lr_schedule import build_scheduler
from pipeline_src.tricks.mixed_precision import autocast_context, effective_precision, hardware, make_grad_scaler
from pipeline_src.tricks.mixup import mixup


class NonFiniteLoss(InputError, RuntimeError):
    """Training diverged; the last good checkpoint is kept for inspection or a restart."""

    exit_status = DIVERGED


class TrainInputError(InputError):
    """Something train needs is missing or does not fit (teacher, batch size); says what to run."""


def load_teacher(params: dict, wnids: list[str], device: torch.device) -> nn.Module:
    """The frozen teacher that the teacher stage left (trained or imported and already checked).

    It was trained once, with `teacher.seed`: every seed of a student distils from the same teacher."""
    name = params["teacher"]["run"]
    path = output_dir(with_same_overrides(params, name), name, params["teacher"]["seed"]) / "model.pt"
    if not path.is_file():
        raise TrainInputError(f"{path} not found: run the teacher stage first (python -m pipeline_src.teacher)")
    state, meta = checkpoint.load_model_weights(path)
    if meta["wnids"] != wnids:
        raise TrainInputError(f"{path}: the teacher was trained on other classes than the betons' classes.json; "
                              "re-run the teacher stage on the current data")
    teacher = build_model({**meta["model"], "zero_gamma": False}, len(wnids))
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


def progress_enabled(choice: str) -> bool:
    """monitor.progress: auto prints only to a terminal (not into a Snakemake log); always / never force it."""
    return choice == "always" or (choice == "auto" and sys.stderr.isatty())


class StepMonitor:
    """Loss bookkeeping on the device: the host syncs once every N steps, not on every step.

    Each step adds its loss to a device sum and records, still on the device, the first step whose
    loss was not finite. `check` (every N steps and at epoch end) reads both with one sync, so a
    divergence is reported at most N steps late but names the step where it happened.
    """

    def __init__(self, device: torch.device, every: int):
        self.every = every
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int, count: int) -> None:
        loss = loss.detach().double()
        self.loss_sum += loss * count
        bad_here = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad_here, step, self.first_bad)

    def due(self, step: int, iters: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == iters

    def check(self) -> tuple[float, int]:
        """(loss sum so far, first non-finite step or -1), agreed by every rank (one sync)."""
        first_bad = self.first_bad.clone()
        if dist.is_initialized():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        return self.loss_sum.item(), int(first_bad.item())


Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_batch_transform(train_cfg: dict, num_classes: int, generator: torch.Generator) -> Transform:
    """(images, labels) -> (images, soft targets): label smoothing, then mixup (timm's `mixup_fn`)."""
    eps, alpha = train_cfg["label_smoothing"], train_cfg["mixup_alpha"]

    def transform(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = smooth_targets(labels, num_classes, eps)
        if alpha > 0:
            images, targets, _ = mixup(images, targets, alpha, generator)
        return images, targets

    return transform


def build_criterion(teacher: nn.Module | None, distill_cfg: dict) -> Criterion:
    """loss(logits, targets, images): soft-target cross entropy, or with a teacher the distillation loss
    against its logits on the same (mixed) images (timm's `train_loss_fn`)."""
    if teacher is None:
        return lambda logits, targets, images: soft_target_cross_entropy(logits, targets)

    def distill(logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        return distillation_loss(logits, teacher_logits, targets, distill_cfg["temperature"], distill_cfg["weight"])

    return distill


def train_one_epoch(model: nn.Module, loader, criterion: Criterion, batch_transform: Transform,
                    optimizer: torch.optim.Optimizer, scheduler, scaler, params: dict, device: torch.device,
                    precision: str, epoch: int) -> tuple[dict, list]:
    """One pass over the train beton; also samples the LR ~20 times for the schedule plot."""
    monitor = StepMonitor(device, params["monitor"]["finite_check_every"])
    show = progress_enabled(params["monitor"]["progress"]) and not (dist.is_initialized() and dist.get_rank())
    world = dist.get_world_size() if dist.is_initialized() else 1
    channels_last = params["train"]["channels_last"]
    model.train()
    seen, loss_sum, start = 0, 0.0, time.perf_counter()
    iters = len(loader)
    lr_points = []
    for step, (images, labels) in enumerate(loader):
        if step % max(1, iters // 20) == 0:
            lr_points.append([epoch + step / iters, optimizer.param_groups[0]["lr"]])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images, targets = batch_transform(images, labels)
        with autocast_context(device, precision):
            loss = criterion(model(images), targets, images)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += images.shape[0]
        monitor.add(loss, step, images.shape[0])
        if not monitor.due(step, iters):
            continue
        loss_sum, bad_step = monitor.check()
        if bad_step >= 0:
            raise NonFiniteLoss(
                f"loss is not finite ({loss_sum / seen}) at epoch {epoch} step {bad_step} (checked every "
                f"{monitor.every} steps, monitor.finite_check_every)"
            )
        if show:
            elapsed = time.perf_counter() - start
            minutes, seconds = divmod(round(elapsed / (step + 1) * (iters - step - 1)), 60)
            print(f"epoch {epoch} step {step + 1}/{iters} loss {loss_sum / seen:.4f} "
                  f"{seen * world / elapsed:.0f} images/s ETA {minutes}:{seconds:02d}",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "images_per_s": seen / elapsed}, lr_points


def check_batch_size(params: dict, betons: Path) -> None:
    """A batch above the split's image count gives no batch at all (drop_last) or a loader error."""
    manifest = betons / "manifest.json"
    if not manifest.is_file():
        return  # make_train_loader names the missing beton
    images = read_json(manifest)["splits"]["train"]["images"]
    batch = params["train"]["batch_size"]
    if batch > images:
        raise TrainInputError(
            f"run '{params['run']['name']}': key 'train.batch_size' ({batch}) is above the {images} images of "
            f"{betons / 'train.beton'}; lower train.batch_size (in the run's tricks or with --set)"
        )


def train(params: dict, run: str, seed: int, out: str | Path | None = None) -> dict | None:
    """Train (or resume, or skip) one run; returns its final metrics on rank 0.

    `out` (--out) overrides the folder `run_folders.output_dir` picks. Rank 0 holds the run folder's
    lock throughout, so a second job of the same run and seed stops at once ("in use by pid N")
    instead of overwriting this one's checkpoint.
    """
    out = output_dir(params, run, seed, out)
    rank0 = os.environ.get("RANK", "0") == "0"
    if out != run_dir(params, run, seed) and rank0:
        print(f"{run} seed {seed}: not the recipe {params['_source']} gives this run, so writing to {out}")
    with dir_lock(out) if rank0 else contextlib.nullcontext():
        return _train(params, run, seed, out)


@dataclass
class Setup:
    """One run's training objects, built once before the epoch loop."""

    model: nn.Module  # what is evaluated and checkpointed
    net: nn.Module  # what trains: the model, DDP-wrapped and/or compiled
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    criterion: Criterion
    batch_transform: Transform
    mix_gen: torch.Generator  # mixup's draws (checkpointed with the other RNGs)
    device: torch.device
    precision: str
    wnids: list[str]
    ddp: Any


def build_setup(params: dict, seed: int) -> Setup:
    """Device, process group, model, teacher, loaders, optimizer, schedule and loss, as the recipe says."""
    from pipeline_src.loader import make_train_loader, make_val_loader

    train_cfg = params["train"]
    check_batch_size(params, betons_dir(params))
    ddp = distributed.setup(params["loader"]["device"] != "cpu" and torch.cuda.is_available())
    device = pick_device(params, ddp.local_rank)
    if train_cfg["batch_size"] % ddp.world:
        raise TrainInputError(f"train.batch_size {train_cfg['batch_size']} is not divisible by {ddp.world} processes")
    torch.manual_seed(seed)
    wnids = read_classes(params)

    model = build_model(params["model"], len(wnids))
    if train_cfg["sync_bn"] and ddp.world > 1:
        model = distributed.sync_batchnorm(model, device)
    model = model.to(device)
    if train_cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    teacher = load_teacher(params, wnids, device) if train_cfg["distill"] else None

    local_batch = train_cfg["batch_size"] // ddp.world
    betons = betons_dir(params)
    train_loader = make_train_loader(betons / "train.beton", params, local_batch, seed, device, ddp.world > 1)
    val_loader = make_val_loader(betons / "val.beton", params, local_batch, device, ddp.world > 1)
    lr = scaled_lr(train_cfg["base_lr"], train_cfg["batch_size"], train_cfg["base_batch"], train_cfg["linear_scaling"])
    optimizer = build_optimizer(model, train_cfg, lr)
    scheduler = build_scheduler(
        optimizer, iters_per_epoch=len(train_loader), epochs=train_cfg["epochs"],
        warmup_epochs=train_cfg["warmup_epochs"], schedule=train_cfg["schedule"],
        milestones=train_cfg["step_milestones"], gamma=train_cfg["step_gamma"],
    )
    precision = effective_precision(device, train_cfg["precision"], train_cfg["cpu_amp"])
    if precision != train_cfg["precision"] and ddp.main:
        print("train.precision is amp but this CPU has no native bf16 and train.cpu_amp is native_only: "
              "training in fp32 (set train.cpu_amp=bf16 to force bf16)")
    mix_gen = torch.Generator().manual_seed(seed)
    net = model if ddp.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return Setup(
        model=model, net=torch.compile(net) if train_cfg["compile"] else net,
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer, scheduler=scheduler,
        scaler=make_grad_scaler(device, precision), criterion=build_criterion(teacher, params["distill"]),
        batch_transform=build_batch_transform(train_cfg, len(wnids), mix_gen), mix_gen=mix_gen,
        device=device, precision=precision, wnids=wnids, ddp=ddp,
    )


def resume(setup: Setup, ckpt: Path, recipe: str) -> tuple[int, list[dict], list[list[float]]]:
    """Restore the state of `ckpt` if it holds this recipe; (first epoch to train, history, LR curve)."""
    state = checkpoint.load_checkpoint(ckpt) if ckpt.is_file() else None
    if state is not None and state["recipe"] != recipe:
        if setup.ddp.main:
            print(f"{ckpt}: written with other params; starting this run afresh")
        state = None
    if state is None:
        return 0, [], []
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    setup.scaler.load_state_dict(state["scaler"])
    checkpoint.restore_rng_state(state["rng"], {"mixup": setup.mix_gen})
    if setup.ddp.main:
        print(f"{ckpt}: resuming at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, json.loads(state["history"]), json.loads(state["lr_curve"])


def fit(setup: Setup, params: dict, run: str, seed: int, ckpt: Path, recipe: str, start_epoch: int,
        history: list[dict], lr_curve: list[list[float]], tracker) -> dict:
    """The epochs from `start_epoch`: train, evaluate, checkpoint, log; returns the last evaluation
    (with the logit gaps of Figure 4). `history` and `lr_curve` grow in place."""
    s, train_cfg = setup, params["train"]
    final = None
    for epoch in range(start_epoch, train_cfg["epochs"]):
        s.train_loader.set_epoch(epoch)
        lr_now = s.optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        try:
            stats, lr_points = train_one_epoch(s.net, s.train_loader, s.criterion, s.batch_transform, s.optimizer,
                                               s.scheduler, s.scaler, params, s.device, s.precision, epoch)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc}; the last good checkpoint is {ckpt if ckpt.is_file() else '(none yet)'}; "
                                "lower train.base_lr or add warmup") from None
        if epoch == train_cfg["epochs"] - 1:
            final = evaluate(s.model, s.val_loader, params, s.device, s.precision, len(s.wnids), keep_gaps=True)
            stats.update({k: v for k, v in final.items() if k != "logit_gaps"})
        elif (epoch + 1) % train_cfg["eval_every"] == 0:
            stats.update(evaluate(s.model, s.val_loader, params, s.device, s.precision, len(s.wnids)))
        stats.update(epoch=epoch, lr=lr_now, images_per_s=stats["images_per_s"] * s.ddp.world,
                     epoch_time_s=time.perf_counter() - epoch_start)
        history.append(stats)
        lr_curve += lr_points
        if s.ddp.main:
            print(json.dumps({"run": run, "seed": seed, **stats}), flush=True)
            checkpoint.save_checkpoint(ckpt, {
                "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
                "rng": checkpoint.capture_rng_state({"mixup": s.mix_gen}),
                "epoch": epoch, "history": json.dumps(history), "lr_curve": json.dumps(lr_curve),
                "recipe": recipe,
            })
        # After the checkpoint: a tracking outage costs no training (it retries, then warns).
        tracker.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
    if final is None:  # resumed after the last epoch's checkpoint
        final = evaluate(s.model, s.val_loader, params, s.device, s.precision, len(s.wnids), keep_gaps=True)
    return final


def write_outputs(setup: Setup, params: dict, run: str, seed: int, out: Path, recipe: str, history: list[dict],
                  lr_curve: list[list[float]], final: dict, tracker) -> dict:
    """The run's final metrics (what `checkpoint.finished_metrics` reads to skip it), written with its model."""
    metrics = {
        "top1": final["top1"], "top5": final["top5"], "val_loss": final["val_loss"],
        "train_loss": history[-1]["train_loss"],
        "images_per_s": statistics.median(h["images_per_s"] for h in history),  # robust to warm-up
        "wall_time_s": sum(h["epoch_time_s"] for h in history), "recipe": recipe,
        "precision": setup.precision, "machine": hardware(setup.device),
    }
    meta = {"run": run, "seed": seed, "model": params["model"], "num_classes": len(setup.wnids), "wnids": setup.wnids}
    return write_run_outputs(out, params, seed, setup.model.state_dict(), meta, metrics, final, tracker,
                             history, lr_curve)


def _train(params: dict, run: str, seed: int, out: Path) -> dict | None:
    # Imported here, not at the top: the loop runs without mlflow (bench/gpu_check.py).
    from pipeline_src import tracking

    recipe = params_mod.recipe_hash(params)
    finished = checkpoint.finished_metrics(out, recipe)
    if finished is not None:
        print(f"{out}: already finished with these params, skipping (delete it to re-train)")
        return finished
    setup = build_setup(params, seed)
    ckpt = out / "last.pt"
    start_epoch, history, lr_curve = resume(setup, ckpt, recipe)
    tags = {"run": run, "seed": str(seed), "profile": params["profile"]["name"], "precision_effective": setup.precision,
            "run_dir": str(out), **beton_tags(betons_dir(params))}
    tracker = tracking.start_run(params, run, seed, tags, enabled=setup.ddp.main, resume=start_epoch > 0)
    with tracker:
        tracker.log_history(history)  # epochs an outage or a kill kept out of the store
        final = fit(setup, params, run, seed, ckpt, recipe, start_epoch, history, lr_curve, tracker)
        if not setup.ddp.main:
            return None
        metrics = write_outputs(setup, params, run, seed, out, recipe, history, lr_curve, final, tracker)
    ckpt.unlink(missing_ok=True)  # model.pt holds the weights now; the resume state is spent
    return metrics


def beton_tags(betons: Path) -> dict:
    manifest = betons / "manifest.json"
    if not manifest.is_file():
        return {}
    data = json.loads(manifest.read_text())
    return {f"sha256_{k}": v for k, v in data.get("sha256", {}).items()}
