"""ffcv decoders of the train loader: the seeded random-resized crop, and the sample indices.

The crop decoder reads only what its box needs: a JPEG is decoded at the smallest scale 1/2, 1/4
or 1/8 that still covers the output (`decode_scale`) and, where the C library `_jpegcrop.so` is
built (`make setup` compiles jpegcrop.c against the system libjpeg-turbo), only the rows and
columns of the box (`crop_decode`); in a JPEG with restart markers (as prepare writes them), only
the restart intervals that hold the box. Without the library, or when it reports an error, it falls
back to ffcv's full-image decode at the same scale: the crop's pixels are the same either way.
"""
from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from numba import njit

from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import draws
from .kernels import area_resize, augment_image, decode_scale
from .state import EpochState, read_state
from .transforms import FusedAugment

CROP_LIBRARY = Path(__file__).with_name("_jpegcrop.so")
# the augment arguments of a decoder without FusedAugment: typed as real ones, never used
NO_AUGMENT = FusedAugment(False, (0.0, 0.0, 0.0, 0.0), 0.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _load_crop_library() -> ctypes.CDLL | None:
    """jpegcrop.c's library with its argument types, or None when it is not built."""
    if not CROP_LIBRARY.is_file():
        return None
    library = ctypes.CDLL(str(CROP_LIBRARY))
    library.crop_decode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, *[ctypes.c_int32] * 5,
                                    ctypes.c_void_p]
    library.crop_decode.restype = ctypes.c_int
    library.crop_decode_count.restype = ctypes.c_uint64
    library.crop_decode_interval_count.restype = ctypes.c_uint64
    return library


_library = _load_crop_library()
HAS_CROP_DECODE = _library is not None
_crop_decode_c = _library.crop_decode if HAS_CROP_DECODE else None


def decoded_regions() -> int:
    """How many crop regions this process decoded through the library (0 without it)."""
    return int(_library.crop_decode_count()) if HAS_CROP_DECODE else 0


def decoded_interval_regions() -> int:
    """How many of those were cut from a JPEG's restart intervals (`prepare.jpeg_restart_interval`)."""
    return int(_library.crop_decode_interval_count()) if HAS_CROP_DECODE else 0


def crop_decode(data: np.ndarray, dst: np.ndarray, scale: int, top: int, left: int, height: int, width: int,
                region: np.ndarray) -> int:
    """Rows [top, top + height), columns from region[0] for region[1] (>= the asked [left, left +
    width)) of the JPEG `data` decoded at 1/scale, into dst (flat uint8); 0, or -1 on an error."""
    return _crop_decode_c(data.ctypes.data, data.size, dst.ctypes.data, scale, top, left, height, width,
                          region.ctypes.data)


@njit(cache=True)
def _no_crop_decode(data, dst, scale, top, left, height, width, region):
    """The stand-in for `crop_decode` when the library is not built: always the full decode."""
    return -1


@njit(cache=True)
def region_rows(top, height, scale, n):
    """Rows [first, end) of an image of n rows, scaled by 1/scale, that a box [top, top + height) touches."""
    first = np.int64(np.floor(top / scale))
    return first, min(np.int64(np.ceil((top + height) / scale)), n)


class SeededRandomResizedCrop(Operation):
    """ffcv's RandomResizedCropRGBImageDecoder with the crop box drawn from `draws.random_crop`.

    Decodes (JPEG or raw) and area-resizes the crop box to `output_size`. Savings over ffcv's
    decoder, whose resize is OpenCV's INTER_AREA: `area_resize` is the same box filter, separable
    (OpenCV's is several times slower at non-integer scales); a JPEG whose crop box is at least
    2x (4x, 8x) the output on both sides is decoded at 1/2 (1/4, 1/8) scale in libjpeg-turbo's IDCT,
    up to `max_decode_scale` (1 turns it off), with the box's (fractional) coordinates scaled alike,
    so the crop is the same region; and with the crop library only the box's region is decoded
    (one column more on each side: libjpeg's fancy upsampling differs at a region's edge columns).
    Boxes smaller than the output (upscaling) use ffcv's resize.

    With `augment` (a FusedAugment) the decoder applies it to each crop right after the resize, in the
    same parallel loop while the crop is in cache, and outputs its float32 images.
    """

    def __init__(self, output_size: tuple[int, int], area: tuple[float, float],
                 ratio: tuple[float, float], state: EpochState, max_decode_scale: int,
                 augment: FusedAugment | None = None, region_decode: bool = True):
        super().__init__()
        if max_decode_scale not in (1, 2, 4, 8):
            raise ValueError(f"max_decode_scale must be 1, 2, 4 or 8, got {max_decode_scale}")
        self.output_size = tuple(output_size)
        self.area = (float(area[0]), float(area[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.state = state
        self.max_decode_scale = max_decode_scale
        self.augment = augment
        self.region_decode = region_decode and HAS_CROP_DECODE

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (*self.output_size, 3)
        u8, i8 = np.dtype("<u1"), np.dtype("<i8")
        temp = AllocationQuery((max_pixels * np.uint64(3),), u8)
        region = AllocationQuery((2,), i8)
        if self.augment is None:
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                    (AllocationQuery(shape, u8), temp, region))
        f32 = np.dtype("float32")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=f32),
                (AllocationQuery(shape, f32), temp, region, AllocationQuery(shape, u8)))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # compiled per loader as ffcv does: numba loses the overloads of a dispatcher shared by
        # two loaders' pipelines once the first is garbage-collected
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_decode_c = Compiler.compile(crop_decode) if self.region_decode else _no_crop_decode
        address = self.state.address
        area_lo, area_hi = self.area
        ratio_lo, ratio_hi = self.ratio
        out_h, out_w = self.output_size
        max_scale = self.max_decode_scale
        sample_key, random_crop, stream = draws.sample_key, draws.random_crop, draws.STREAM_CROP
        augmented = self.augment is not None
        flip, strengths, std, eigval, eigvec, mean, inv_std = (self.augment or NO_AUGMENT).kernel_args()

        def decode(batch_indices, my_storage, metadata, storage_state):
            if augmented:
                destination, temp_storage, regions, crops = my_storage
            else:
                destination, temp_storage, regions = my_storage
                crops = destination
            seed, epoch = read_state(np.int64(address))
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                key = sample_key(seed, epoch, source_ix, stream)
                top, left, h, w = random_crop(key, height, width, area_lo, area_hi, ratio_lo, ratio_hi)
                scale, row0, col0 = 1, 0, 0
                if field["mode"] == jpg:
                    scale = decode_scale(h, w, out_h, out_w, max_scale)
                    temp_buffer = temp_storage[dst_ix]
                    sh = (np.int64(height) + scale - 1) // scale  # libjpeg-turbo rounds scaled sizes up
                    sw = (np.int64(width) + scale - 1) // scale
                    row0, row_end = region_rows(top, h, scale, sh)
                    col_lo, col_end = region_rows(left, w, scale, sw)
                    col_lo, col_end = max(col_lo - 1, 0), min(col_end + 1, sw)
                    region = regions[dst_ix]
                    if crop_decode_c(image_data, temp_buffer, scale, row0, col_lo, row_end - row0,
                                     col_end - col_lo, region) == 0:
                        col0 = region[0]
                        image = temp_buffer[:3 * (row_end - row0) * region[1]].reshape(row_end - row0, region[1], 3)
                    else:
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, scale,
                                   False, False)
                        row0 = 0
                        image = temp_buffer[:3 * sh * sw].reshape(sh, sw, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                crop = crops[dst_ix]
                if h >= out_h and w >= out_w:
                    area_resize(image, top / scale, left / scale, h / scale, w / scale, crop, row0, col0)
                else:
                    resize_crop_c(image, top - row0, top - row0 + h, left - col0, left - col0 + w, crop)
                if augmented:
                    augment_image(crop, destination[dst_ix], source_ix, seed, epoch, flip, strengths, std, eigval,
                                  eigvec, mean, inv_std)
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
