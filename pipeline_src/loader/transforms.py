"""The loader's augmentations after the crop: ffcv numba ops on HWC batches, and the fused pass.

ffcv 1.0.2 lacks PCA lighting, its colour ops are applied with probability 1/2 in a fixed order,
and its random ops use numba's unseeded RNG. These draw every random number from `draws` keyed by
(seed, epoch, sample index), so a batch is a pure function of the seed and epoch. All ops must
come before `ToTensor` (ffcv's graph loops forever on a numba op after a torch op; `check_jit`
turns that into an error).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import draws
from .kernels import copy_image
from .state import EpochState, read_state


def check_jit(op: Operation, state: State) -> None:
    if not state.jit_mode or state.device.type != "cpu":
        raise ValueError(
            f"{type(op).__name__} runs in the loader's numba workers on HWC numpy batches: place it "
            "before ToTensor / ToDevice / ToTorchImage in the pipeline"
        )



class SampleOp(Operation):
    """A per-sample numba op on HWC batches that sees the batch's sample indices."""

    out_dtype: np.dtype | None = None  # None: keep the input dtype

    def __init__(self, state: EpochState):
        super().__init__()
        self.state = state

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        check_jit(self, previous_state)
        dtype = previous_state.dtype if self.out_dtype is None else self.out_dtype
        return replace(previous_state, dtype=dtype), AllocationQuery(previous_state.shape, dtype)



class SeededFlip(SampleOp):
    """Horizontal flip with probability 1/2, drawn per sample."""

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        address = self.state.address
        sample_key, flip_draw, stream = draws.sample_key, draws.flip_draw, draws.STREAM_FLIP

        def flip(images, dst, indices):
            seed, epoch = read_state(np.int64(address))
            for i in my_range(images.shape[0]):
                copy_image(images[i], dst[i], flip_draw(sample_key(seed, epoch, indices[i], stream)))
            return dst[:images.shape[0]]

        flip.is_parallel = True
        flip.with_indices = True
        return flip


class FusedAugment:
    """Flip -> colour jitter -> PCA lighting -> Normalize in one pass per image; uint8 in, float32 out.

    The same draws (same streams) and the same maths as those ops in sequence (`fused_augment`; the
    sequential ops are the tests' reference, tests/loader_reference.py), without the intermediate
    float32 images. Not a pipeline op of its own: `SeededRandomResizedCrop` runs it on each crop in
    its decode loop, while the crop is in cache. A part that is off (flip false, all strengths 0,
    lighting std 0) is skipped.
    """

    def __init__(self, flip: bool, strengths: tuple[float, float, float, float], lighting_std: float,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 eigval: np.ndarray = draws.PCA_EIGVAL, eigvec: np.ndarray = draws.PCA_EIGVEC):
        self.flip = bool(flip)
        self.strengths = np.array(strengths, dtype=np.float64)
        if self.strengths.shape != (4,) or (self.strengths < 0).any():
            raise ValueError(f"strengths must be 4 values >= 0, got {strengths}")
        self.lighting_std = float(lighting_std)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)
        self.mean = np.array(mean, dtype=np.float32)
        self.inv_std = (1.0 / np.array(std, dtype=np.float64)).astype(np.float32)

    @property
    def parts(self) -> tuple[str, ...]:
        """The sequential ops this one stands for, in order."""
        return tuple(name for name, on in (("flip", self.flip), ("jitter", bool(self.strengths.any())),
                                           ("lighting", self.lighting_std > 0), ("normalize", True)) if on)

    def kernel_args(self) -> tuple:
        """`kernels.augment_image`'s arguments after (src, dst, sample, seed, epoch).

        The decoder passes them to the cached kernel itself: a compiled closure over them would be
        compiled again in every process (numba cannot cache closures).
        """
        return (self.flip, self.strengths, self.lighting_std, self.eigval, self.eigvec, self.mean, self.inv_std)


class Normalize(Operation):
    """(x - mean) / std per channel, uint8 or float32 HWC in, float32 out."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.mean = np.array(mean, dtype=np.float32)
        self.inv_std = (1.0 / np.array(std, dtype=np.float64)).astype(np.float32)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        check_jit(self, previous_state)
        f32 = np.dtype("float32")
        return replace(previous_state, dtype=f32), AllocationQuery(previous_state.shape, f32)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        mean, inv_std = self.mean, self.inv_std

        def normalize(images, dst):
            for i in my_range(images.shape[0]):
                img, out = images[i], dst[i]
                for y in range(img.shape[0]):
                    for x in range(img.shape[1]):
                        for c in range(3):
                            out[y, x, c] = (np.float32(img[y, x, c]) - mean[c]) * inv_std[c]
            return dst[:images.shape[0]]

        normalize.is_parallel = True
        return normalize
