"""Mixup (section 5.4): train on convex combinations of two examples and of their (soft) targets.

x = lam x_i + (1 - lam) x_j, y = lam y_i + (1 - lam) y_j with lam ~ Beta(alpha, alpha) drawn once per
batch. The partner j of example i is a random permutation of the batch (not the batch reversed, so a
sequential loader order does not pair the same images every epoch; an example may draw itself).
Both lam and the permutation come from the given torch.Generator: same seed, same mix, and the
generator's state can be checkpointed for an exact resume.
"""
from __future__ import annotations

import math

import torch


def _log_gamma_sample(shape: float, generator: torch.Generator) -> float:
    """log of one Gamma(shape, 1) draw: Marsaglia & Tsang (2000), with the boost
    Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1, kept in log space so tiny draws do not underflow."""
    boost = 0.0
    if shape < 1.0:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        boost = math.log(max(u, 1e-300)) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * x) ** 3
        if v <= 0.0:
            continue
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d * v) + boost


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) as G1 / (G1 + G2) with G1, G2 ~ Gamma(alpha), from `generator`.

    torch.distributions.Beta takes no generator, hence the sampler here.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    log_g1 = _log_gamma_sample(alpha, generator)
    log_g2 = _log_gamma_sample(alpha, generator)
    return 1.0 / (1.0 + math.exp(log_g2 - log_g1))


def mixup(
    x: torch.Tensor, targets_soft: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a permutation of itself; returns (mixed inputs, mixed targets, lam).

    `targets_soft` are (N, K) float targets, already label-smoothed when smoothing is on.
    """
    if not targets_soft.dtype.is_floating_point or targets_soft.dim() != 2:
        raise ValueError(
            f"mixup needs (N, K) float targets (use smooth_targets first), got {targets_soft.dtype} "
            f"of shape {tuple(targets_soft.shape)}"
        )
    if x.shape[0] != targets_soft.shape[0]:
        raise ValueError(f"mixup: {x.shape[0]} inputs but {targets_soft.shape[0]} targets")
    lam = sample_beta(alpha, generator)
    partner = torch.randperm(x.shape[0], generator=generator).to(x.device)
    x_mixed = x * lam + x[partner] * (1.0 - lam)
    targets_mixed = targets_soft * lam + targets_soft[partner] * (1.0 - lam)
    return x_mixed, targets_mixed, lam
