"""Stage: train one named run of params.yaml for one seed.

    python -m pipeline_src.train --run baseline --seed 0 [--params FILE] [--set key=value ...]
    torchrun --nproc_per_node 2 -m pipeline_src.train -- --run efficient   # DDP (NCCL / gloo)

(The `--` keeps torchrun's own parser from reading `--run` as an abbreviation of its `--run-path`.)

The loop below is the paper's recipe with every trick a switch: linear scaling, warmup, zero gamma,
no bias decay, mixed precision, step / cosine decay, label smoothing, mixup and distillation.
Outputs: data/runs/<run>/seed<k>/{last.pt, model.pt, history.json, metrics.json}; a run whose --set
overrides change its recipe writes to data/runs/adhoc/<run>-<hash>/seed<k>/ or --out DIR instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline_src import checkpoint, distributed, params as P
from pipeline_src.errors import DIVERGED, InputError, run_main
from pipeline_src.io import read_json, sha256, write_json
from pipeline_src.locks import dir_lock
from pipeline_src.models import build_model
from pipeline_src.run_folders import output_dir, run_dir, with_same_overrides
from pipeline_src.tricks.distillation import distillation_loss
from pipeline_src.tricks.label_smoothing import smooth_targets, soft_target_cross_entropy
from pipeline_src.tricks.linear_scaling import scaled_lr
from pipeline_src.tricks.lr_schedule import build_scheduler
from pipeline_src.tricks.mixed_precision import autocast_context, effective_precision, hardware, make_grad_scaler
from pipeline_src.tricks.mixup import mixup
from pipeline_src.tricks.no_bias_decay import param_groups


class NonFiniteLoss(InputError, RuntimeError):
    """Training diverged; the last good checkpoint is kept for inspection or a restart."""

    exit_status = DIVERGED


class TrainInputError(InputError):
    """Something train needs is missing or does not fit (betons, teacher, device); says what to run."""


def betons_dir(params: dict) -> Path:
    return Path(params["paths"]["data"]) / "betons"


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainInputError("loader.device is 'cuda' but no CUDA device is visible; set loader.device=cpu or auto")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def read_classes(params: dict) -> list[str]:
    path = betons_dir(params) / "classes.json"
    if not path.is_file():
        raise TrainInputError(f"{path} not found: run the prepare stage first (python -m pipeline_src.prepare)")
    data = read_json(path)
    return data["wnids"] if isinstance(data, dict) else data


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


def build_optimizer(model: nn.Module, cfg: dict, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg["weight_decay"], cfg["no_bias_decay"])
    return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"])


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


def train_one_epoch(model, teacher, loader, optimizer, scheduler, scaler, cfg: dict, device, precision: str,
                    num_classes: int, mix_gen: torch.Generator, epoch: int, ckpt: Path) -> tuple[dict, list]:
    """One pass over the train beton; also samples the LR ~20 times for the schedule plot."""
    train, distill = cfg["train"], cfg["distill"]
    monitor = StepMonitor(device, cfg["monitor"]["finite_check_every"])
    show = progress_enabled(cfg["monitor"]["progress"]) and not (dist.is_initialized() and dist.get_rank())
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    seen, loss_sum, start = 0, 0.0, time.perf_counter()
    iters = len(loader)
    lr_points = []
    for step, (images, labels) in enumerate(loader):
        if step % max(1, iters // 20) == 0:
            lr_points.append([epoch + step / iters, optimizer.param_groups[0]["lr"]])
        if train["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = smooth_targets(labels, num_classes, train["label_smoothing"])
        if train["mixup_alpha"] > 0:
            images, targets, _ = mixup(images, targets, train["mixup_alpha"], mix_gen)
        with autocast_context(device, precision):
            logits = model(images)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = distillation_loss(logits, teacher_logits, targets, distill["temperature"], distill["weight"])
            else:
                loss = soft_target_cross_entropy(logits, targets)
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
                f"{monitor.every} steps, monitor.finite_check_every); the last good checkpoint is "
                f"{ckpt if ckpt.is_file() else '(none yet)'}; lower train.base_lr or add warmup"
            )
        if show:
            elapsed = time.perf_counter() - start
            minutes, seconds = divmod(round(elapsed / (step + 1) * (iters - step - 1)), 60)
            print(f"epoch {epoch} step {step + 1}/{iters} loss {loss_sum / seen:.4f} "
                  f"{seen * world / elapsed:.0f} images/s ETA {minutes}:{seconds:02d}",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "images_per_s": seen / elapsed}, lr_points


@torch.no_grad()
def evaluate(model, loader, cfg: dict, device, precision: str, num_classes: int, keep_gaps: bool = False) -> dict:
    """Top-1 / top-5 / loss on the val beton; optionally the logit gaps of the paper's Figure 4."""
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    gaps: list[float] = []
    for images, labels in loader:
        if cfg["train"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        seen += labels.numel()
        if keep_gaps:
            best = logits.max(dim=1).values
            rest = (logits.sum(dim=1) - best) / (num_classes - 1)
            gaps += (best - rest).tolist()
    totals = torch.tensor([correct1, correct5, seen, loss_sum], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    correct1, correct5, seen, loss_sum = totals.tolist()
    out = {"top1": 100 * correct1 / seen, "top5": 100 * correct5 / seen, "val_loss": loss_sum / seen}
    if keep_gaps:
        out["logit_gaps"] = gaps
    return out


def check_batch_size(cfg: dict, betons: Path) -> None:
    """A batch above the split's image count gives no batch at all (drop_last) or a loader error."""
    manifest = betons / "manifest.json"
    if not manifest.is_file():
        return  # make_train_loader names the missing beton
    images = read_json(manifest)["splits"]["train"]["images"]
    batch = cfg["train"]["batch_size"]
    if batch > images:
        raise TrainInputError(
            f"run '{cfg['run']['name']}': key 'train.batch_size' ({batch}) is above the {images} images of "
            f"{betons / 'train.beton'}; lower train.batch_size (in the run's tricks or with --set)"
        )


def train(cfg: dict, run: str, seed: int, out: str | Path | None = None) -> dict | None:
    """Train (or resume, or skip) one run; returns its final metrics on rank 0.

    `out` (--out) overrides the folder `run_folders.output_dir` picks. Rank 0 holds the run folder's
    lock throughout, so a second job of the same run and seed stops at once ("in use by pid N")
    instead of overwriting this one's checkpoint.
    """
    out = output_dir(cfg, run, seed, out)
    rank0 = os.environ.get("RANK", "0") == "0"
    if out != run_dir(cfg, run, seed) and rank0:
        print(f"{run} seed {seed}: not the recipe {cfg['_source']} gives this run, so writing to {out}")
    with dir_lock(out) if rank0 else contextlib.nullcontext():
        return _train(cfg, run, seed, out)


def _train(cfg: dict, run: str, seed: int, out: Path) -> dict | None:
    # Imported here, not at the top: the loop below runs without ffcv and mlflow (bench/gpu_check.py).
    from pipeline_src import tracking
    from pipeline_src.loader import make_train_loader, make_val_loader

    recipe = P.recipe_hash(cfg)
    finished = checkpoint.finished_metrics(out, recipe)
    if finished is not None:
        print(f"{out}: already finished with these params, skipping (delete it to re-train)")
        return finished
    train_cfg = cfg["train"]
    check_batch_size(cfg, betons_dir(cfg))
    ddp = distributed.setup(cfg["loader"]["device"] != "cpu" and torch.cuda.is_available())
    device = pick_device(cfg["loader"]["device"], ddp.local_rank)
    if train_cfg["batch_size"] % ddp.world:
        raise TrainInputError(f"train.batch_size {train_cfg['batch_size']} is not divisible by {ddp.world} processes")
    torch.manual_seed(seed)
    wnids = read_classes(cfg)
    num_classes = len(wnids)

    model = build_model(cfg["model"], num_classes)
    if train_cfg["sync_bn"] and ddp.world > 1:
        model = distributed.sync_batchnorm(model, device)
    model = model.to(device)
    if train_cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    teacher = load_teacher(cfg, wnids, device) if train_cfg["distill"] else None

    local_batch = train_cfg["batch_size"] // ddp.world
    betons = betons_dir(cfg)
    train_loader = make_train_loader(betons / "train.beton", cfg, local_batch, seed, device, ddp.world > 1)
    val_loader = make_val_loader(betons / "val.beton", cfg, local_batch, device, ddp.world > 1)
    iters = len(train_loader)
    lr = scaled_lr(train_cfg["base_lr"], train_cfg["batch_size"], train_cfg["base_batch"], train_cfg["linear_scaling"])
    optimizer = build_optimizer(model, train_cfg, lr)
    scheduler = build_scheduler(
        optimizer, iters_per_epoch=iters, epochs=train_cfg["epochs"],
        warmup_epochs=train_cfg["warmup_epochs"], schedule=train_cfg["schedule"],
        milestones=train_cfg["step_milestones"], gamma=train_cfg["step_gamma"],
    )
    precision = effective_precision(device, train_cfg["precision"], train_cfg["cpu_amp"])
    if precision != train_cfg["precision"] and ddp.main:
        print(f"train.precision is amp but this CPU has no native bf16 and train.cpu_amp is native_only: "
              "training in fp32 (set train.cpu_amp=bf16 to force bf16)")
    scaler = make_grad_scaler(device, precision)
    mix_gen = torch.Generator().manual_seed(seed)

    ckpt = out / "last.pt"
    history: list[dict] = []
    lr_curve: list[list[float]] = []
    start_epoch = 0
    state = checkpoint.load_checkpoint(ckpt) if ckpt.is_file() else None
    if state is not None and state["recipe"] != recipe:
        if ddp.main:
            print(f"{ckpt}: written with other params; starting this run afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng_state(state["rng"], {"mixup": mix_gen})
        history, lr_curve = json.loads(state["history"]), json.loads(state["lr_curve"])
        start_epoch = state["epoch"] + 1
        if ddp.main:
            print(f"{ckpt}: resuming at epoch {start_epoch}")

    net = model if ddp.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = torch.compile(net) if train_cfg["compile"] else net
    tags = {"run": run, "seed": str(seed), "profile": cfg["profile"]["name"], "precision_effective": precision,
            "run_dir": str(out), **beton_tags(betons)}
    tracker = tracking.start_run(cfg, run, seed, tags, enabled=ddp.main, resume=state is not None)
    with tracker:
        tracker.log_history(history)  # epochs an outage or a kill kept out of the store
        final = None  # the last epoch's evaluation, with the logit gaps of Figure 4
        for epoch in range(start_epoch, train_cfg["epochs"]):
            train_loader.set_epoch(epoch)
            lr_now = optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            stats, lr_points = train_one_epoch(compiled, teacher, train_loader, optimizer, scheduler, scaler, cfg,
                                               device, precision, num_classes, mix_gen, epoch, ckpt)
            last = epoch == train_cfg["epochs"] - 1
            if last:
                final = evaluate(model, val_loader, cfg, device, precision, num_classes, keep_gaps=True)
                stats.update({k: v for k, v in final.items() if k != "logit_gaps"})
            elif (epoch + 1) % train_cfg["eval_every"] == 0:
                stats.update(evaluate(model, val_loader, cfg, device, precision, num_classes))
            stats.update(epoch=epoch, lr=lr_now, images_per_s=stats["images_per_s"] * ddp.world,
                         epoch_time_s=time.perf_counter() - epoch_start)
            history.append(stats)
            lr_curve += lr_points
            if ddp.main:
                print(json.dumps({"run": run, "seed": seed, **stats}), flush=True)
                checkpoint.save_checkpoint(ckpt, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": checkpoint.capture_rng_state({"mixup": mix_gen}),
                    "epoch": epoch, "history": json.dumps(history), "lr_curve": json.dumps(lr_curve),
                    "recipe": recipe,
                })
            # After the checkpoint: a tracking outage costs no training (it retries, then warns).
            tracker.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
        if final is None:  # resumed after the last epoch's checkpoint
            final = evaluate(model, val_loader, cfg, device, precision, num_classes, keep_gaps=True)
        if not ddp.main:
            return None
        metrics = {
            "top1": final["top1"], "top5": final["top5"], "val_loss": final["val_loss"],
            "train_loss": history[-1]["train_loss"],
            "images_per_s": statistics.median(h["images_per_s"] for h in history),  # robust to warm-up
            "wall_time_s": sum(h["epoch_time_s"] for h in history), "recipe": recipe,
            "precision": precision, "machine": hardware(device),
        }
        meta = {"run": run, "seed": seed, "model": cfg["model"], "num_classes": num_classes, "wnids": wnids}
        checkpoint.save_final_model(out / "model.pt", model.state_dict(), meta)
        metrics["model_sha256"] = sha256(out / "model.pt")
        write_json(out / "history.json", {"run": run, "seed": seed, "tricks": cfg["run"]["tricks"],
                                          "epochs": history, "lr_curve": lr_curve,
                                          "logit_gaps": final["logit_gaps"],
                                          "label_smoothing": train_cfg["label_smoothing"]})
        write_json(out / "metrics.json", metrics)
        numbers = {k: v for k, v in metrics.items() if k not in ("recipe", "precision", "machine", "model_sha256")}
        tracker.log_metrics({f"final_{k}": v for k, v in numbers.items()}, step=train_cfg["epochs"])
        tracker.log_artifact(out / "history.json")
        tracker.log_model(out / "model.pt", meta)
    ckpt.unlink(missing_ok=True)  # model.pt holds the weights now; the resume state is spent
    return metrics


def beton_tags(betons: Path) -> dict:
    manifest = betons / "manifest.json"
    if not manifest.is_file():
        return {}
    data = json.loads(manifest.read_text())
    return {f"sha256_{k}": v for k, v in data.get("sha256", {}).items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run name from params.yaml (runs, single-*, loo-*)")
    parser.add_argument("--seed", type=int, default=None, help="default: the first of study.seeds")
    parser.add_argument("--out", default=None, help="output folder (default: paths.runs/<run>/seed<k>, or "
                        "paths.runs/adhoc/<run>-<hash>/seed<k> when --set changes the run's recipe)")
    P.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        params = P.from_args(args)
        cfg = P.resolve_run(params, args.run)
        try:
            train(cfg, args.run, params["study"]["seeds"][0] if args.seed is None else args.seed, args.out)
        finally:
            distributed.teardown()

    return run_main("train", body)


if __name__ == "__main__":
    sys.exit(main())
