"""Linear scaling (section 3.1): a batch b times larger takes an LR b times larger (Goyal et al. 2017)."""
from __future__ import annotations


def scaled_lr(base_lr: float, batch_size: int, base_batch: int, enabled: bool) -> float:
    """base_lr * batch_size / base_batch when enabled (paper: 0.1 x b / 256), else base_lr unchanged."""
    if batch_size < 1 or base_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, base_batch={base_batch}")
    return base_lr * batch_size / base_batch if enabled else base_lr
