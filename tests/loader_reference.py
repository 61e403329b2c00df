"""The sequential CPU augmentation, one numba op per step: the reference the fused pass must equal.

The loader runs flip, colour jitter, PCA lighting and normalize as one fused pass per crop
(`kernels.fused_augment`); these ops compute the same maths one image-sized step at a time, in
the order a reader expects, and the tests compare the two (kernel by kernel and whole loaders).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numba import njit

from ffcv.pipeline.compiler import Compiler

from pipeline_src.loader import draws
from pipeline_src.loader.decoders import SeededRandomResizedCrop
from pipeline_src.loader.kernels import copy_image
from pipeline_src.loader.pipelines import (Augment, FastLoader, _ffcv_loader, _label_pipeline, _order_seed,
                                           image_pipeline)
from pipeline_src.loader.state import EpochState, read_state
from pipeline_src.loader.transforms import Normalize, SampleOp, SeededFlip


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


class ColorJitter(SampleOp):
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
        address = self.state.address
        strengths = self.strengths
        sample_key, color_steps, stream = draws.sample_key, draws.color_steps, draws.STREAM_JITTER
        max_steps = draws.MAX_STEPS

        def jitter(images, dst, indices):
            seed, epoch = read_state(np.int64(address))
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


class PCALighting(SampleOp):
    """AlexNet PCA lighting: add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel."""

    out_dtype = np.dtype("float32")

    def __init__(self, std: float, eigval: np.ndarray, eigvec: np.ndarray, state: EpochState):
        super().__init__(state)
        self.std = float(std)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        address = self.state.address
        std, eigval, eigvec = self.std, self.eigval, self.eigvec
        sample_key, lighting_shift = draws.sample_key, draws.lighting_shift
        stream = draws.STREAM_LIGHTING

        def lighting(images, dst, indices):
            seed, epoch = read_state(np.int64(address))
            for i in my_range(images.shape[0]):
                shift = lighting_shift(sample_key(seed, epoch, indices[i], stream), std, eigval, eigvec)
                apply_shift(images[i], dst[i], shift.astype(np.float32))
            return dst[:images.shape[0]]

        lighting.is_parallel = True
        lighting.with_indices = True
        return lighting



def reference_train_loader(beton: Path, params: dict, batch_size: int, seed: int,
                           region_decode: bool = True) -> FastLoader:
    """`make_train_loader` on the CPU with the sequential ops instead of the fused pass."""
    cfg, aug = params["loader"], Augment.from_params(params)
    state = EpochState(seed)
    ops = [SeededFlip(state)] if aug.flip else []
    if any(aug.strengths):
        ops.append(ColorJitter(aug.strengths, state))
    if aug.lighting_std > 0:
        ops.append(PCALighting(aug.lighting_std, draws.PCA_EIGVAL, draws.PCA_EIGVEC, state))
    ops.append(Normalize(aug.mean, aug.std))
    res, device = cfg["res"], torch.device("cpu")
    decoder = SeededRandomResizedCrop((res, res), aug.area, aug.ratio, state, cfg["max_decode_scale"],
                                      region_decode=region_decode)
    pipelines = {"image": image_pipeline(decoder, ops, device, params["train"]["channels_last"]),
                 "label": _label_pipeline(device)}
    loader = _ffcv_loader(beton, params, batch_size, pipelines, cfg["order"], _order_seed(seed),
                          cfg["drop_last"], False)
    return FastLoader(loader, state, None, device)
