"""No bias decay (section 3.1): weight decay only on conv and FC weights, as L2 on those alone.

Biases and BN gamma/beta (and any parameter that is not a conv or FC weight) are not decayed when on.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd


def decayed_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the conv and fully-connected weights of `model`."""
    return {
        id(m.weight) for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear)) and m.weight is not None
    }


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """Optimizer parameter groups: one group decayed by `weight_decay`, or, with no_bias_decay, the conv
    and FC weights decayed and everything else in a group with weight_decay 0. Every parameter of the
    model appears exactly once; empty groups are left out."""
    params = list(model.parameters())  # deduplicated: a shared parameter appears once
    if not no_bias_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    decayed = decayed_parameter_ids(model)
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
