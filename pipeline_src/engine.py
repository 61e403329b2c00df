"""What every stage that trains or scores a classifier shares (torchvision's `references/.../engine.py`).

The train, teacher, sanity and evaluate stages and the transfer fine-tunes import these pieces; no
stage imports another stage for them.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline_src.errors import InputError
from pipeline_src.io import read_json
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
