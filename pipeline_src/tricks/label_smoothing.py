"""Label smoothing (section 5.2) with the paper's formula, and the cross entropy against soft targets.

The paper puts 1 - eps on the true class and eps / (K - 1) on each other class. torch's
`cross_entropy(label_smoothing=eps)` instead mixes with the uniform distribution: eps / K on every
class, 1 - eps + eps / K on the true one. The two differ, so this module builds the targets itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_targets(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """(N,) int labels -> (N, K) float32 targets: 1 - eps on the true class, eps / (K - 1) elsewhere."""
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must be in [0, 1], got {eps}")
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError(
            f"labels must be a 1-d integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot * (1.0 - eps) + (1.0 - one_hot) * (eps / (num_classes - 1))


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_i q_i log softmax(z)_i, computed in float32 (safe under autocast)."""
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and soft targets {tuple(targets.shape)} differ in shape"
        )
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(targets.float() * log_probs).sum(dim=-1).mean()
