"""Data-parallel plumbing: torchrun's environment, the process group, and BatchNorm over the global batch.

NCCL on GPUs, gloo on CPU. torch's SyncBatchNorm only runs on CUDA, so the CPU twin of the GPU
path uses `GlobalBatchNorm2d`, which computes the same statistics with differentiable all-reduces.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(use_cuda: bool) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank's batch (two-pass mean and variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        # statistics in fp32 (bf16 sums lose the variance); the output in the input's dtype, as BatchNorm2d's
        dtype, x = x.dtype, x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        count = dist_fn.all_reduce(count)
        mean = dist_fn.all_reduce(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce(centred.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * count / (count - 1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            return (centred * (scale * self.weight)[None, :, None, None] + self.bias[None, :, None, None]).to(dtype)
        return (centred * scale[None, :, None, None]).to(dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on CUDA; on CPU, every BatchNorm2d becomes a GlobalBatchNorm2d."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model
