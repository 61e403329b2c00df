"""ffcv Operations that run in the loader's numba workers (the CPU path).

ffcv 1.0.2 lacks PCA lighting, its colour ops are applied with probability 1/2 in a fixed order,
and its random ops use numba's unseeded RNG. These ops draw every random number from
`draws` keyed by (seed, epoch, sample index), so a batch is a pure function of the seed and epoch.

The epoch reaches compiled code through `EpochState`: numba freezes arrays captured in closures,
so the ops read (seed, epoch) from a fixed buffer by its address and the loader updates it before
each epoch. All ops must come before `ToTensor` (ffcv's graph loops forever on a numba op after a
torch op; `_check_jit` turns that into an error).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from numba import carray, njit

from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.utils import cast_int_to_byte_ptr

from . import draws


class EpochState:
    """(seed, epoch) in a buffer whose address compiled ops read; `set_epoch` before each epoch."""

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.buffer = np.array([seed, 0], dtype=np.int64)
        self.address = self.buffer.ctypes.data

    @property
    def seed(self) -> int:
        return int(self.buffer[0])

    @property
    def epoch(self) -> int:
        return int(self.buffer[1])

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.buffer[1] = epoch


def _state_reader(address: int) -> Callable:
    """A compiled getter of (seed, epoch) from an EpochState's buffer."""

    @njit
    def read_state():
        view = carray(cast_int_to_byte_ptr(address), 16).view(np.int64)
        return view[0], view[1]

    return read_state


def _check_jit(op: Operation, state: State) -> None:
    if not state.jit_mode or state.device.type != "cpu":
        raise ValueError(
            f"{type(op).__name__} runs in the loader's numba workers on HWC numpy batches: place it "
            "before ToTensor / ToDevice / ToTorchImage in the pipeline"
        )


# --------------------------------------------------------------------------- per-image kernels


# Kernels are cached module functions with explicit loops; the ops' parallel loops only call them
# (array expressions inside a numba prange body compile several times slower).


@njit(cache=True)
def copy_image(src, dst, mirror):
    """dst = src (or src mirrored left-right), converting the dtype."""
    h, w = src.shape[0], src.shape[1]
    for y in range(h):
        for x in range(w):
            sx = w - 1 - x if mirror else x
            for c in range(3):
                dst[y, x, c] = src[y, sx, c]


@njit(fastmath=True, cache=True)
def apply_color_steps(img, m, beta, steps):
    """In place on a C-contiguous float32 HWC image in [0, 255]: each step `m @ rgb + beta * grey mean`,
    clipped to [0, 255]."""
    pixels = img.reshape(-1, 3)
    g0, g1, g2 = np.float32(draws.GRAY[0]), np.float32(draws.GRAY[1]), np.float32(draws.GRAY[2])
    for k in range(steps):
        offset = np.float32(0.0)
        if beta[k] != 0.0:
            total = 0.0
            for p in range(pixels.shape[0]):
                total += g0 * pixels[p, 0] + g1 * pixels[p, 1] + g2 * pixels[p, 2]
            offset = np.float32(beta[k] * total / pixels.shape[0])
        mk = m[k].astype(np.float32)
        m00, m01, m02 = mk[0, 0], mk[0, 1], mk[0, 2]
        m10, m11, m12 = mk[1, 0], mk[1, 1], mk[1, 2]
        m20, m21, m22 = mk[2, 0], mk[2, 1], mk[2, 2]
        for p in range(pixels.shape[0]):
            r, g, b = pixels[p, 0], pixels[p, 1], pixels[p, 2]
            pixels[p, 0] = min(max(m00 * r + m01 * g + m02 * b + offset, np.float32(0.0)), np.float32(255.0))
            pixels[p, 1] = min(max(m10 * r + m11 * g + m12 * b + offset, np.float32(0.0)), np.float32(255.0))
            pixels[p, 2] = min(max(m20 * r + m21 * g + m22 * b + offset, np.float32(0.0)), np.float32(255.0))


@njit(fastmath=True, cache=True)
def apply_shift(src, dst, shift):
    """dst = clip(src + shift, 0, 255) per pixel (the lighting noise), float32 out."""
    h, w = src.shape[0], src.shape[1]
    for y in range(h):
        for x in range(w):
            for c in range(3):
                dst[y, x, c] = min(max(np.float32(src[y, x, c]) + shift[c], 0.0), 255.0)


# --------------------------------------------------------------------------- decoders


class SeededRandomResizedCrop(Operation):
    """ffcv's RandomResizedCropRGBImageDecoder with the crop box drawn from `draws.random_crop`.

    Decodes (JPEG or raw) and resizes the crop straight to `output_size` with ffcv's C resize.
    """

    def __init__(self, output_size: tuple[int, int], area: tuple[float, float],
                 ratio: tuple[float, float], state: EpochState):
        super().__init__()
        self.output_size = tuple(output_size)
        self.area = (float(area[0]), float(area[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.state = state

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (*self.output_size, 3)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
            (AllocationQuery(shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)),
        )

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # compiled per loader as ffcv does: numba loses the overloads of a dispatcher shared by
        # two loaders' pipelines once the first is garbage-collected
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        read_state = _state_reader(self.state.address)
        area_lo, area_hi = self.area
        ratio_lo, ratio_hi = self.ratio
        sample_key, random_crop, stream = draws.sample_key, draws.random_crop, draws.STREAM_CROP

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            seed, epoch = read_state()
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                key = sample_key(seed, epoch, source_ix, stream)
                top, left, h, w = random_crop(key, height, width, area_lo, area_hi, ratio_lo, ratio_hi)
                resize_crop_c(temp_buffer, top, top + h, left, left + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SampleIndexDecoder(Operation):
    """Decode a batch's sample indices (from any field): the device path keys its draws on them."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        i8 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(), dtype=i8), AllocationQuery((), i8)

    def generate_code(self) -> Callable:
        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                destination[i] = batch_indices[i]
            return destination[:len(batch_indices)]

        return decode


# --------------------------------------------------------------------------- transforms


class _SampleOp(Operation):
    """A per-sample numba op on HWC batches that sees the batch's sample indices."""

    out_dtype: np.dtype | None = None  # None: keep the input dtype

    def __init__(self, state: EpochState):
        super().__init__()
        self.state = state

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        _check_jit(self, previous_state)
        dtype = previous_state.dtype if self.out_dtype is None else self.out_dtype
        return replace(previous_state, dtype=dtype), AllocationQuery(previous_state.shape, dtype)


class SeededFlip(_SampleOp):
    """Horizontal flip with probability 1/2, drawn per sample."""

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        read_state = _state_reader(self.state.address)
        sample_key, flip_draw, stream = draws.sample_key, draws.flip_draw, draws.STREAM_FLIP

        def flip(images, dst, indices):
            seed, epoch = read_state()
            for i in my_range(images.shape[0]):
                copy_image(images[i], dst[i], flip_draw(sample_key(seed, epoch, indices[i], stream)))
            return dst[:images.shape[0]]

        flip.is_parallel = True
        flip.with_indices = True
        return flip


class ColorJitter(_SampleOp):
    """Brightness, contrast, saturation (and hue) in a random order per image; float32 out.

    `strengths` = (brightness, contrast, saturation, hue); 0 turns an op off (it is then neither
    applied nor counted in the order). Values stay in [0, 255] after every step, as on images.
    """

    out_dtype = np.dtype("float32")

    def __init__(self, strengths: tuple[float, float, float, float], state: EpochState):
        super().__init__(state)
        self.strengths = np.array(strengths, dtype=np.float64)
        if self.strengths.shape != (4,) or (self.strengths < 0).any():
            raise ValueError(f"strengths must be 4 values >= 0, got {strengths}")

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        read_state = _state_reader(self.state.address)
        strengths = self.strengths
        sample_key, color_steps, stream = draws.sample_key, draws.color_steps, draws.STREAM_JITTER
        max_steps = draws.MAX_STEPS

        def jitter(images, dst, indices):
            seed, epoch = read_state()
            for i in my_range(images.shape[0]):
                m = np.empty((max_steps, 3, 3))
                beta = np.empty(max_steps)
                steps = color_steps(sample_key(seed, epoch, indices[i], stream), strengths, m, beta)
                copy_image(images[i], dst[i], False)
                apply_color_steps(dst[i], m, beta, steps)
            return dst[:images.shape[0]]

        jitter.is_parallel = True
        jitter.with_indices = True
        return jitter


class PCALighting(_SampleOp):
    """AlexNet PCA lighting: add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel."""

    out_dtype = np.dtype("float32")

    def __init__(self, std: float, eigval: np.ndarray, eigvec: np.ndarray, state: EpochState):
        super().__init__(state)
        self.std = float(std)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        read_state = _state_reader(self.state.address)
        std, eigval, eigvec = self.std, self.eigval, self.eigvec
        sample_key, lighting_shift = draws.sample_key, draws.lighting_shift
        stream = draws.STREAM_LIGHTING

        def lighting(images, dst, indices):
            seed, epoch = read_state()
            for i in my_range(images.shape[0]):
                shift = lighting_shift(sample_key(seed, epoch, indices[i], stream), std, eigval, eigvec)
                apply_shift(images[i], dst[i], shift.astype(np.float32))
            return dst[:images.shape[0]]

        lighting.is_parallel = True
        lighting.with_indices = True
        return lighting


class Normalize(Operation):
    """(x - mean) / std per channel, uint8 or float32 HWC in, float32 out."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.mean = np.array(mean, dtype=np.float32)
        self.inv_std = (1.0 / np.array(std, dtype=np.float64)).astype(np.float32)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        _check_jit(self, previous_state)
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
