"""The run both transfer stages share: skip a finished fine-tune, train with a log line per epoch,
score, then write model.pt and, last, metrics.json, all inside one MLflow run. A stage only builds
its `FineTune` (data, model, optimizer, one epoch, the scoring)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline_src import checkpoint, tracking
from pipeline_src.engine import pick_device
from pipeline_src.io import write_json
from pipeline_src.transfer import backbone as backbone_mod


@dataclass(frozen=True)
class FineTune:
    """One task's fine-tune, built before the first epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_epoch: Callable[[], dict[str, float]]  # one pass over the training data: its mean loss, speed
    evaluate: Callable[[], dict]  # the task's entries of metrics.json: test metrics (percent), sizes
    headline: tuple[str, ...]  # the metrics logged and printed when done
    tags: dict[str, str]  # MLflow tags beside task, backbone and its checkpoint
    meta: dict  # model.pt meta beside run, seed, task and backbone


Builder = Callable[[dict, str, int, Path, torch.device], FineTune]


def run(params: dict, task: str, backbone: str, seed: int, build: Builder) -> dict:
    """Fine-tune `backbone` for `task` (or skip when finished) and return the metrics of metrics.json.

    `build(params, backbone, seed, checkpoint, device)` runs after the global RNGs are seeded."""
    out = backbone_mod.result_dir(params, task, backbone, seed)
    finished = backbone_mod.finished_metrics(params, task, backbone, seed)
    if finished is not None:
        return finished
    start = time.perf_counter()
    epochs = params["transfer"][task]["epochs"]
    ckpt = backbone_mod.check_backbone_run(params, backbone, seed)
    backbone_mod.seed_all(seed)
    job = build(params, backbone, seed, ckpt, pick_device(params))
    run_name = f"transfer-{task}/{backbone}"
    tags = {"task": task, "backbone": backbone, **job.tags, "backbone_checkpoint": str(ckpt)}
    with tracking.start_run(params, run_name, seed, tags) as tracker:
        for epoch in range(epochs):
            lr, epoch_start = job.optimizer.param_groups[0]["lr"], time.perf_counter()
            stats = job.train_epoch()
            stats.update(lr=lr, epoch_time_s=time.perf_counter() - epoch_start)
            tracker.log_metrics(stats, step=epoch)
            print(json.dumps({"task": task, "backbone": backbone, "seed": seed, "epoch": epoch, **stats}), flush=True)
        metrics = {
            **job.evaluate(),
            "backbone": backbone,
            "backbone_top1": backbone_mod.backbone_top1(params, backbone, seed),
            "train_loss": stats["loss"],
            "wall_time_s": time.perf_counter() - start,
        }
        meta = {"run": run_name, "seed": seed, "task": task, "backbone": backbone, **job.meta}
        checkpoint.save_final_model(out / checkpoint.FINAL_NAME, job.model.state_dict(), meta)
        metrics = backbone_mod.stamped(params, task, backbone, seed, metrics)
        write_json(out / "metrics.json", metrics)
        final = {key: metrics[key] for key in (*job.headline, "wall_time_s")}
        tracker.log_metrics(final, step=epochs)
        tracker.log_artifact(out / "metrics.json")
    print(json.dumps({"task": task, "backbone": backbone, "seed": seed, **final}), flush=True)
    return metrics
