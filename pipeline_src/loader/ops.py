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


@njit(cache=True)
def area_taps(start, length, n_out, n_src):
    """One axis of an area (box-filter) resize, OpenCV's INTER_AREA for downscaling.

    Output j is the mean of the source over [start + j * s, start + (j + 1) * s), s = length / n_out
    (>= 1), each source pixel weighted by its overlap with that interval. Returns each output's first
    source index (int64, n_out) and its weights (float32, n_out x taps); taps = ceil(s) + 1 covers any
    interval, trailing weights are 0. `start` and `length` may be fractional.
    """
    scale = length / n_out
    taps = min(np.int64(np.ceil(scale)) + 1, n_src)
    first = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, taps), np.float32)
    for j in range(n_out):
        lo = start + j * scale
        hi = lo + scale
        k0 = min(max(np.int64(np.floor(lo)), 0), n_src - taps)
        first[j] = k0
        for t in range(taps):
            overlap = min(hi, k0 + t + 1.0) - max(lo, k0 + t + 0.0)
            if overlap > 0.0:
                weights[j, t] = overlap / scale
    return first, weights


@njit(fastmath=True, cache=True)
def area_resize(src, top, left, height, width, dst):
    """dst (uint8 HWC) = the box [top, top + height) x [left, left + width) of src (uint8 HWC), area-resized.

    The box may have fractional edges and must be at least dst's size (downscaling only). Separable:
    rows first (contiguous, vectorized), then columns; float32 sums, rounded half to even as OpenCV.
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    row0, row_w = area_taps(top, height, out_h, src.shape[0])
    col0, col_w = area_taps(left, width, out_w, src.shape[1])
    c_lo = col0[0]
    c_hi = col0[out_w - 1] + col_w.shape[1]
    span = (c_hi - c_lo) * 3
    line = np.empty(span, np.float32)
    for j in range(out_h):
        for v in range(span):
            line[v] = 0.0
        for t in range(row_w.shape[1]):
            wt = row_w[j, t]
            if wt != 0.0:
                row = src[row0[j] + t].reshape(-1)[c_lo * 3:c_hi * 3]
                for v in range(span):
                    line[v] += wt * np.float32(row[v])
        for i in range(out_w):
            base = (col0[i] - c_lo) * 3
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            for t in range(col_w.shape[1]):
                wt = col_w[i, t]
                a0 += wt * line[base + 3 * t]
                a1 += wt * line[base + 3 * t + 1]
                a2 += wt * line[base + 3 * t + 2]
            dst[j, i, 0] = np.uint8(min(max(np.rint(a0), np.float32(0.0)), np.float32(255.0)))
            dst[j, i, 1] = np.uint8(min(max(np.rint(a1), np.float32(0.0)), np.float32(255.0)))
            dst[j, i, 2] = np.uint8(min(max(np.rint(a2), np.float32(0.0)), np.float32(255.0)))


@njit(fastmath=True, cache=True)
def _load_row(src_row, row, mirror):
    """row (3 x W float32, planar) = src_row (W x 3 uint8), mirrored left-right if `mirror`."""
    w = row.shape[1]
    red, green, blue = row[0], row[1], row[2]
    if mirror:
        for x in range(w):
            red[x] = np.float32(src_row[w - 1 - x, 0])
            green[x] = np.float32(src_row[w - 1 - x, 1])
            blue[x] = np.float32(src_row[w - 1 - x, 2])
    else:
        for x in range(w):
            red[x] = np.float32(src_row[x, 0])
            green[x] = np.float32(src_row[x, 1])
            blue[x] = np.float32(src_row[x, 2])


@njit(fastmath=True, cache=True)
def _colour_step(row, mk, offset):
    """One jitter step on a planar row of float32 pixels, as `apply_color_steps` does on the image."""
    m00, m01, m02 = mk[0, 0], mk[0, 1], mk[0, 2]
    m10, m11, m12 = mk[1, 0], mk[1, 1], mk[1, 2]
    m20, m21, m22 = mk[2, 0], mk[2, 1], mk[2, 2]
    zero, top = np.float32(0.0), np.float32(255.0)
    red, green, blue = row[0], row[1], row[2]
    for p in range(row.shape[1]):
        r, g, b = red[p], green[p], blue[p]
        red[p] = min(max(m00 * r + m01 * g + m02 * b + offset, zero), top)
        green[p] = min(max(m10 * r + m11 * g + m12 * b + offset, zero), top)
        blue[p] = min(max(m20 * r + m21 * g + m22 * b + offset, zero), top)


@njit(fastmath=True, cache=True)
def fused_augment(src, dst, mirror, m, beta, steps, shift, lighting, mean, inv_std):
    """flip -> colour jitter steps -> lighting shift -> normalize, uint8 HWC in, float32 HWC out.

    The same maths, in the same float32 order, as `copy_image`, `apply_color_steps`, `apply_shift`
    and `Normalize` run one after the other, but a row at a time in a buffer that stays in cache and
    without the intermediate images: a contrast step's grey mean (of the image before that step) is
    a pass over src that redoes the earlier steps row by row, then one pass writes the output.
    m (steps x 3 x 3) and beta come from `draws.color_steps`, shift from `draws.lighting_shift`
    (used when `lighting`).
    """
    h, w = src.shape[0], src.shape[1]
    mf = m[:steps].astype(np.float32)
    offsets = np.zeros(max(steps, 1), np.float32)
    row = np.empty((3, w), np.float32)
    g0, g1, g2 = np.float32(draws.GRAY[0]), np.float32(draws.GRAY[1]), np.float32(draws.GRAY[2])
    for k in range(steps):
        if beta[k] != 0.0:  # contrast: the grey mean of the image after steps 0 .. k - 1
            total = 0.0
            for y in range(h):
                _load_row(src[y], row, False)
                for q in range(k):
                    _colour_step(row, mf[q], offsets[q])
                for p in range(w):
                    total += g0 * row[0, p] + g1 * row[1, p] + g2 * row[2, p]
            offsets[k] = np.float32(beta[k] * total / (h * w))
    s0, s1, s2 = np.float32(shift[0]), np.float32(shift[1]), np.float32(shift[2])
    mean0, mean1, mean2 = mean[0], mean[1], mean[2]
    inv0, inv1, inv2 = inv_std[0], inv_std[1], inv_std[2]
    zero, top = np.float32(0.0), np.float32(255.0)
    for y in range(h):
        _load_row(src[y], row, mirror)
        for q in range(steps):
            _colour_step(row, mf[q], offsets[q])
        out = dst[y]
        if lighting:
            for p in range(w):
                out[p, 0] = (min(max(row[0, p] + s0, zero), top) - mean0) * inv0
                out[p, 1] = (min(max(row[1, p] + s1, zero), top) - mean1) * inv1
                out[p, 2] = (min(max(row[2, p] + s2, zero), top) - mean2) * inv2
        else:
            for p in range(w):
                out[p, 0] = (row[0, p] - mean0) * inv0
                out[p, 1] = (row[1, p] - mean1) * inv1
                out[p, 2] = (row[2, p] - mean2) * inv2


# --------------------------------------------------------------------------- decoders


@njit(cache=True)
def _no_augment(src, dst, sample, seed, epoch):
    """The decoder's per-crop hook when it has no FusedAugment."""


@njit(cache=True)
def decode_scale(height, width, out_h, out_w, max_scale):
    """The largest JPEG decode scale 1/d (d in 1, 2, 4, 8; d <= max_scale) at which a crop box of
    height x width still covers out_h x out_w pixels, so the resize after it only shrinks."""
    d = 1
    while 2 * d <= max_scale and height >= 2 * d * out_h and width >= 2 * d * out_w:
        d *= 2
    return d


class SeededRandomResizedCrop(Operation):
    """ffcv's RandomResizedCropRGBImageDecoder with the crop box drawn from `draws.random_crop`.

    Decodes (JPEG or raw) and area-resizes the crop box to `output_size`. Two savings over ffcv's
    decoder, whose resize is OpenCV's INTER_AREA: `area_resize` is the same box filter, separable
    (OpenCV's is several times slower at non-integer scales); and a JPEG whose crop box is at least
    2x (4x, 8x) the output on both sides is decoded at 1/2 (1/4, 1/8) scale in libjpeg-turbo's IDCT,
    up to `max_decode_scale` (1 turns it off), with the box's (fractional) coordinates scaled alike,
    so the crop is the same region. Boxes smaller than the output (upscaling) use ffcv's resize.

    With `augment` (a FusedAugment) the decoder applies it to each crop right after the resize, in the
    same parallel loop while the crop is in cache, and outputs its float32 images.
    """

    def __init__(self, output_size: tuple[int, int], area: tuple[float, float],
                 ratio: tuple[float, float], state: EpochState, max_decode_scale: int,
                 augment: "FusedAugment | None" = None):
        super().__init__()
        if max_decode_scale not in (1, 2, 4, 8):
            raise ValueError(f"max_decode_scale must be 1, 2, 4 or 8, got {max_decode_scale}")
        self.output_size = tuple(output_size)
        self.area = (float(area[0]), float(area[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.state = state
        self.max_decode_scale = max_decode_scale
        self.augment = augment

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (*self.output_size, 3)
        u8 = np.dtype("<u1")
        temp = AllocationQuery((max_pixels * np.uint64(3),), u8)
        if self.augment is None:
            return replace(previous_state, jit_mode=True, shape=shape, dtype=u8), (AllocationQuery(shape, u8), temp)
        f32 = np.dtype("float32")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=f32),
                (AllocationQuery(shape, f32), temp, AllocationQuery(shape, u8)))

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
        out_h, out_w = self.output_size
        max_scale = self.max_decode_scale
        sample_key, random_crop, stream = draws.sample_key, draws.random_crop, draws.STREAM_CROP
        augmented = self.augment is not None
        apply = self.augment.per_image() if augmented else _no_augment

        def decode(batch_indices, my_storage, metadata, storage_state):
            if augmented:
                destination, temp_storage, crops = my_storage
            else:
                destination, temp_storage = my_storage
                crops = destination
            seed, epoch = read_state()
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                key = sample_key(seed, epoch, source_ix, stream)
                top, left, h, w = random_crop(key, height, width, area_lo, area_hi, ratio_lo, ratio_hi)
                scale = 1
                if field["mode"] == jpg:
                    scale = decode_scale(h, w, out_h, out_w, max_scale)
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, scale,
                               False, False)
                    sh = (np.int64(height) + scale - 1) // scale  # libjpeg-turbo rounds scaled sizes up
                    sw = (np.int64(width) + scale - 1) // scale
                    image = temp_buffer.reshape(-1)[:3 * sh * sw].reshape(sh, sw, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                crop = crops[dst_ix]
                if h >= out_h and w >= out_w:
                    area_resize(image, top / scale, left / scale, h / scale, w / scale, crop)
                else:
                    resize_crop_c(image, top, top + h, left, left + w, crop)
                if augmented:
                    apply(crop, destination[dst_ix], source_ix, seed, epoch)
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


class FusedAugment:
    """SeededFlip -> ColorJitter -> PCALighting -> Normalize in one pass per image; uint8 in, float32 out.

    The same draws (same streams) and the same maths as those ops in sequence (`fused_augment`),
    without the intermediate float32 images. Not a pipeline op of its own: `SeededRandomResizedCrop`
    runs it on each crop in its decode loop, while the crop is in cache. A part that is off (flip
    false, all strengths 0, lighting std 0) is skipped, as the sequential ops are left out.
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

    def per_image(self) -> Callable:
        """A compiled apply(src, dst, sample, seed, epoch): this op on one image (draws included)."""
        flip, jitter, lighting = self.flip, bool(self.strengths.any()), self.lighting_std > 0
        strengths, std, eigval, eigvec = self.strengths, self.lighting_std, self.eigval, self.eigvec
        mean, inv_std = self.mean, self.inv_std
        sample_key, flip_draw, color_steps, lighting_shift = (draws.sample_key, draws.flip_draw,
                                                              draws.color_steps, draws.lighting_shift)
        s_flip, s_jitter, s_lighting = draws.STREAM_FLIP, draws.STREAM_JITTER, draws.STREAM_LIGHTING
        max_steps = draws.MAX_STEPS

        @njit
        def apply(src, dst, sample, seed, epoch):
            mirror = flip and flip_draw(sample_key(seed, epoch, sample, s_flip))
            m = np.zeros((max_steps, 3, 3))
            beta = np.zeros(max_steps)
            steps = 0
            if jitter:
                steps = color_steps(sample_key(seed, epoch, sample, s_jitter), strengths, m, beta)
            shift = np.zeros(3)
            if lighting:
                shift = lighting_shift(sample_key(seed, epoch, sample, s_lighting), std, eigval, eigvec)
            fused_augment(src, dst, mirror, m, beta, steps, shift, lighting, mean, inv_std)

        return apply


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
