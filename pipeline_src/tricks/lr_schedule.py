"""Per-iteration LR: linear warmup (warmup.py), then step decay (section 2) or cosine decay (section 5.1).

step:   lr * gamma ** (number of milestone epochs already reached), milestones counted in whole epochs.
cosine: lr * 1/2 (1 + cos(pi t / T)), t = iterations since the end of warmup, T = iterations after warmup.
Warmup multiplies the decay factor, so a milestone inside the warmup still counts once it is passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from .warmup import warmup_factor, warmup_iterations

SCHEDULES = ("step", "cosine")


@dataclass
class LRSchedule:
    """The LR multiplier at each iteration; a plain callable so LambdaLR's state_dict saves its fields."""

    iters_per_epoch: int
    epochs: int
    warmup_epochs: float
    schedule: str
    milestones: list[int]
    gamma: float

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LR schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.iters_per_epoch < 1 or self.epochs < 1:
            raise ValueError(
                f"iters_per_epoch and epochs must be >= 1, got {self.iters_per_epoch} and {self.epochs}"
            )
        self.milestones = list(self.milestones)

    def __call__(self, iteration: int) -> float:
        warmup_iters = warmup_iterations(self.warmup_epochs, self.iters_per_epoch)
        factor = warmup_factor(iteration, warmup_iters)
        if self.schedule == "step":
            epoch = iteration // self.iters_per_epoch
            return factor * self.gamma ** sum(epoch >= m for m in self.milestones)
        decay_iters = self.iters_per_epoch * self.epochs - warmup_iters
        if iteration < warmup_iters or decay_iters <= 0:
            return factor
        t = min(iteration - warmup_iters, decay_iters)  # one step past the end (LambdaLR's last step) -> 0
        return factor * 0.5 * (1.0 + math.cos(math.pi * t / decay_iters))


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    iters_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    schedule: str,
    milestones: list[int],
    gamma: float,
) -> float:
    """The LR of (0-based) training iteration `iteration`."""
    schedule_fn = LRSchedule(iters_per_epoch, epochs, warmup_epochs, schedule, milestones, gamma)
    return base_lr * schedule_fn(iteration)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    iters_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    schedule: str,
    milestones: list[int],
    gamma: float,
) -> LambdaLR:
    """A LambdaLR over the optimizer's LRs, to be stepped after every optimizer step (not every epoch).

    Its state_dict holds the iteration count and the schedule's fields, so loading it resumes exactly.
    """
    lr_lambda = LRSchedule(iters_per_epoch, epochs, warmup_epochs, schedule, milestones, gamma)
    return LambdaLR(optimizer, lr_lambda)
