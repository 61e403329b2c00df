"""LR warmup (section 3.1): the LR rises linearly from 0 to its initial value over the first epochs.

Convention: with W warmup iterations, iteration i (0-based) trains with lr * (i + 1) / W. The 0 of the
paper is the value just before the first step, no step is wasted at LR 0, the last warmup iteration
(i = W - 1) reaches the initial LR, and the decay schedule takes over at i = W.
"""
from __future__ import annotations


def warmup_iterations(warmup_epochs: float, iters_per_epoch: int) -> int:
    """Warmup length in iterations; fractional epochs round to the nearest iteration."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    return int(round(warmup_epochs * iters_per_epoch))


def warmup_factor(iteration: int, warmup_iters: int) -> float:
    """(i + 1) / W during warmup, 1 after it (and always 1 when W = 0)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if iteration >= warmup_iters:
        return 1.0
    return (iteration + 1) / warmup_iters
