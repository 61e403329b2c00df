"""The paper's tricks, one module each: small functions of tensors and numbers used by the trainer."""
from .distillation import distillation_loss
from .label_smoothing import smooth_targets, soft_target_cross_entropy
from .linear_scaling import scaled_lr
from .lr_schedule import build_scheduler, lr_at
from .mixed_precision import autocast_context, make_grad_scaler
from .mixup import mixup
from .no_bias_decay import param_groups
from .warmup import warmup_factor
from .zero_gamma import apply_zero_gamma

__all__ = [
    "apply_zero_gamma",
    "autocast_context",
    "build_scheduler",
    "distillation_loss",
    "lr_at",
    "make_grad_scaler",
    "mixup",
    "param_groups",
    "scaled_lr",
    "smooth_targets",
    "soft_target_cross_entropy",
    "warmup_factor",
]
