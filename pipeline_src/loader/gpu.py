"""The colour augmentations as batched torch ops, for the device path.

With CUDA the loader ships uint8 crops to the GPU and runs jitter, lighting and normalization
there. The random factors come from `draws` keyed by the batch's sample indices, exactly as the
numba pass in `kernels.py` draws them, so both paths give the same images up to float rounding. The
maths runs in float32 (pixel values reach 255, beyond bf16's integer precision); only the
result is cast to the training dtype. Everything here also runs on CPU tensors (the tests do).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import draws

if TYPE_CHECKING:  # state imports ffcv; this module runs without it (bench/gpu_check.py on a bare GPU machine)
    from .state import EpochState

_GRAY = torch.tensor(draws.GRAY, dtype=torch.float32)


def apply_color_steps(x: torch.Tensor, m: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x (N, 3, H, W) float in [0, 255]; per image and step k: clip(m[:, k] @ rgb + beta[:, k] * grey mean)."""
    gray = _GRAY.to(x.device)
    for k in range(m.shape[1]):
        mean_gray = torch.einsum("nchw,c->n", x, gray) / (x.shape[2] * x.shape[3])
        x = torch.einsum("nij,njhw->nihw", m[:, k], x) + (beta[:, k] * mean_gray)[:, None, None, None]
        x = x.clamp_(0.0, 255.0)
    return x


def apply_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Add one RGB vector per image (the lighting noise), clipped to [0, 255]."""
    return (x + shift[:, :, None, None]).clamp_(0.0, 255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


class DeviceAugment:
    """uint8 NCHW batch (on its device) -> jittered, lit, normalized batch in `dtype`."""

    def __init__(self, strengths: tuple[float, float, float, float], lighting_std: float,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 state: EpochState | None, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.strengths = np.array(strengths, dtype=np.float64)
        self.lighting_std = float(lighting_std)
        self.random = bool(self.strengths.any() or self.lighting_std > 0)
        if self.random and state is None:
            raise ValueError("random colour augmentation needs an EpochState (the seed and epoch)")
        self.state = state
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
        x = images.float()
        if self.random:
            m, beta, shift = draws.batch_color_draws(
                self.state.seed, self.state.epoch, samples.numpy(), self.strengths,
                self.lighting_std, draws.PCA_EIGVAL, draws.PCA_EIGVEC)
            if m.shape[1]:
                x = apply_color_steps(x, self._on_device(m), self._on_device(beta))
            if self.lighting_std > 0:
                x = apply_shift(x, self._on_device(shift))
        x = normalize(x, self.mean, self.std)
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, torch.float32, non_blocking=True)
