"""What every stage that trains or scores a classifier shares (torchvision's `references/.../engine.py`).

The train, teacher, sanity, evaluate and export stages and the transfer fine-tunes import these
pieces (and `training.train`); no stage imports another stage.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline_src import checkpoint, params as params_mod
from pipeline_src.errors import InputError
from pipeline_src.io import read_json, sha256, write_json
from pipeline_src.tricks.mixed_precision import autocast_context
from pipeline_src.tricks.no_bias_decay import param_groups


class EngineInputError(InputError):
    """Something a stage needs is missing (the betons' classes, the GPU it asks for); says what to do."""


def betons_dir(params: dict) -> Path:
    return Path(params["paths"]["data"]) / "betons"


def read_classes(params: dict) -> list[str]:
    """The wnids of the betons, in class-index order (`classes.json`, written by prepare)."""
    path = betons_dir(params) / "classes.json"
    if not path.is_file():
        raise EngineInputError(f"{path} not found: run the prepare stage first (python -m pipeline_src.prepare)")
    data = read_json(path)
    return data["wnids"] if isinstance(data, dict) else data


def run_params_of(params: dict, meta: dict) -> dict:
    """The params a final model's run trained with (its `meta['run']`), if the params file defines that run."""
    run = meta.get("run")
    return params_mod.resolve_run(params, run) if run in params_mod.all_run_names(params) else params


def pick_device(params: dict, local_rank: int = 0) -> torch.device:
    """`loader.device` (auto: CUDA when visible); on CUDA this process's GPU, `cuda:<local_rank>`."""
    choice, has_cuda = params["loader"]["device"], torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise EngineInputError("key 'loader.device' is 'cuda' but no CUDA device is visible; set it to auto or cpu")
    if choice == "cpu" or not has_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def build_optimizer(model: nn.Module, train_cfg: dict, lr: float) -> torch.optim.Optimizer:
    """The paper's NAG: SGD with Nesterov momentum, weight decay per `no_bias_decay`."""
    groups = param_groups(model, train_cfg["weight_decay"], train_cfg["no_bias_decay"])
    return torch.optim.SGD(groups, lr=lr, momentum=train_cfg["momentum"], nesterov=train_cfg["nesterov"])


@torch.no_grad()
def evaluate(model: nn.Module, loader, params: dict, device: torch.device, precision: str, num_classes: int,
             keep_gaps: bool = False) -> dict:
    """Top-1 / top-5 / loss on the val beton; optionally the logit gaps of the paper's Figure 4."""
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    gaps: list[float] = []
    for images, labels in loader:
        if params["train"]["channels_last"]:
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


def write_run_outputs(out: Path, params: dict, seed: int, state_dict: dict, meta: dict, metrics: dict,
                      final: dict, tracker, epochs: list[dict] | None = None,
                      lr_curve: list[list[float]] | None = None) -> dict:
    """model.pt, history.json and metrics.json of a run, the report's and the students' inputs, also
    logged to MLflow; one writer for trained and imported models, so both read back the same way.

    `final` is the last evaluation (with its logit gaps); returns `metrics` with the model's sha256.
    """
    run = params["run"]["name"]
    checkpoint.save_final_model(out / "model.pt", state_dict, meta)
    metrics = {**metrics, "model_sha256": sha256(out / "model.pt")}
    write_json(out / "history.json", {"run": run, "seed": seed, "tricks": params["run"]["tricks"],
                                      "epochs": epochs or [], "lr_curve": lr_curve or [],
                                      "logit_gaps": final["logit_gaps"],
                                      "label_smoothing": params["train"]["label_smoothing"]})
    write_json(out / "metrics.json", metrics)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"final_{k}": v for k, v in numbers.items()}, step=len(epochs or []))
    tracker.log_artifact(out / "history.json")
    tracker.log_model(out / "model.pt", meta)
    return metrics
