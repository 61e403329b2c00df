"""Per-sample random draws: the one definition both augmentation paths use.

Every random number of an augmentation is a pure function of (seed, epoch, sample index, stream):
a counter-based generator (splitmix64 finaliser over the key). So an epoch's augmentations do not
depend on what ran before it in the process, on the worker count or on thread scheduling, and the
device (torch) path draws the very same crops, flips and factors as the worker (numba) path.
ffcv 1.0.2 itself never seeds the numba RNG its own random ops use, which is why we draw here.

All functions are numba-compiled and also callable from Python (the tests sample them directly).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Independent streams, one per random decision.
STREAM_CROP = 1
STREAM_FLIP = 2
STREAM_JITTER = 3
STREAM_LIGHTING = 4
STREAM_ORDER = 5  # the seed handed to ffcv's sample order

# Colour-jitter op codes, in the order of the `strengths` vector.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
MAX_STEPS = 4

# ITU-R 601 luma weights (as in MXNet/GluonCV and torchvision): the grey of contrast / saturation.
GRAY = np.array([0.299, 0.587, 0.114])

# AlexNet's PCA of ImageNet RGB pixels on the 0-255 scale (paper_tables.md "Constants"): eigenvalues
# and the eigenvector matrix as printed (rows listed). The eigenvectors are its COLUMNS: column 0,
# (-0.5675, -0.5808, -0.5836), is the grey axis and carries the largest eigenvalue, as it must for
# natural images; the reference code (AlexNet, fb.resnet.torch, MXNet/GluonCV) computes the shift
# as `eigvec @ (alpha * eigval)`, i.e. rgb_c = sum_k eigvec[c, k] * alpha_k * eigval_k.
PCA_EIGVAL = np.array([55.46, 4.794, 1.148])
PCA_EIGVEC = np.array([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])

# Hue rotation in YIQ space (MXNet's HueJitterAug): M = YIQ^-1 @ R(theta) @ YIQ.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_INV = np.linalg.inv(_YIQ)


@njit(cache=True)
def _mix(z):
    """splitmix64: a bijective 64-bit mixer; consecutive inputs give independent outputs."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def sample_key(seed, epoch, sample, stream):
    """The key of one sample's random stream in one epoch."""
    z = _mix(np.uint64(seed))
    z = _mix(z ^ np.uint64(epoch))
    z = _mix(z ^ np.uint64(sample))
    return _mix(z ^ np.uint64(stream))


@njit(cache=True)
def uniform(key, j):
    """The j-th U[0, 1) number of a key (53 random bits)."""
    return np.float64(_mix(key + np.uint64(j)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def normal(key, j):
    """The j-th N(0, 1) number of a key (Box-Muller on uniforms 2j, 2j + 1)."""
    u1 = uniform(key, 2 * j)
    u2 = uniform(key, 2 * j + 1)
    return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)


@njit(cache=True)
def random_crop(key, height, width, area_lo, area_hi, ratio_lo, ratio_hi):
    """Inception-style crop box (top, left, h, w): area fraction ~ U[area], log aspect ~ U[log ratio].

    Ten tries as torchvision's RandomResizedCrop; if none fits, the largest centred box whose aspect
    is clamped into [ratio_lo, ratio_hi].
    """
    height = np.int64(height)
    width = np.int64(width)
    area = height * width
    log_lo, log_hi = np.log(ratio_lo), np.log(ratio_hi)
    for attempt in range(10):
        target = area * (area_lo + (area_hi - area_lo) * uniform(key, 4 * attempt))
        aspect = np.exp(log_lo + (log_hi - log_lo) * uniform(key, 4 * attempt + 1))
        w = np.int64(np.round(np.sqrt(target * aspect)))
        h = np.int64(np.round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = np.int64(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w = width
        h = np.int64(np.round(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = height
        w = np.int64(np.round(h * ratio_hi))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def flip_draw(key):
    """Mirror the sample with probability 1/2."""
    return uniform(key, 0) < 0.5


@njit(cache=True)
def jitter_factors(key, strengths):
    """(brightness, contrast, saturation) factors ~ U[1 - s, 1 + s] and the hue angle ~ U[-s, s] * pi.

    A disabled op (strength 0) gets the identity value (1, or angle 0).
    """
    out = np.empty(4)
    for op in range(3):
        out[op] = 1.0 + strengths[op] * (2.0 * uniform(key, 4 + op) - 1.0)
    out[HUE] = np.pi * strengths[HUE] * (2.0 * uniform(key, 4 + HUE) - 1.0)
    return out


@njit(cache=True)
def jitter_order(key, strengths):
    """The enabled ops (strength > 0) in a random order, as MXNet's RandomColorJitter applies them."""
    ops = np.empty(MAX_STEPS, np.int64)
    n = 0
    for op in range(MAX_STEPS):
        if strengths[op] > 0.0:
            ops[n] = op
            n += 1
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = np.int64(uniform(key, i) * (i + 1))
        ops[i], ops[j] = ops[j], ops[i]
    return ops[:n]


@njit(cache=True)
def step_matrix(op, factor, m):
    """Write the op as `out = m @ rgb + beta * mean_grey(image)`; return beta.

    brightness: f * rgb; contrast: f * rgb + (1 - f) * image grey mean; saturation:
    f * rgb + (1 - f) * pixel grey; hue: rotation of the chroma plane in YIQ.
    """
    m[:, :] = 0.0
    if op == HUE:
        c, s = np.cos(factor), np.sin(factor)
        for i in range(3):
            for j in range(3):
                m[i, j] = (_YIQ_INV[i, 0] * _YIQ[0, j]
                           + c * (_YIQ_INV[i, 1] * _YIQ[1, j] + _YIQ_INV[i, 2] * _YIQ[2, j])
                           + s * (_YIQ_INV[i, 2] * _YIQ[1, j] - _YIQ_INV[i, 1] * _YIQ[2, j]))
        return 0.0
    for i in range(3):
        m[i, i] = factor
    if op == SATURATION:
        for i in range(3):
            for j in range(3):
                m[i, j] += (1.0 - factor) * GRAY[j]
    if op == CONTRAST:
        return 1.0 - factor
    return 0.0


@njit(cache=True)
def color_steps(key, strengths, m, beta):
    """Fill m[k] (3x3) and beta[k] for the image's jitter steps in order; return the step count."""
    factors = jitter_factors(key, strengths)
    order = jitter_order(key, strengths)
    for k in range(order.shape[0]):
        beta[k] = step_matrix(order[k], factors[order[k]], m[k])
    return order.shape[0]


@njit(cache=True)
def lighting_shift(key, std, eigval, eigvec):
    """AlexNet PCA lighting: alpha ~ N(0, std) per component; RGB shift = eigvec @ (alpha * eigval)."""
    shift = np.zeros(3)
    for k in range(3):
        weight = std * normal(key, k) * eigval[k]
        for c in range(3):
            shift[c] += eigvec[c, k] * weight
    return shift


@njit(cache=True)
def batch_color_draws(seed, epoch, samples, strengths, lighting_std, eigval, eigvec):
    """The device path's draws for a batch: (m (N, K, 3, 3), beta (N, K), shift (N, 3))."""
    n = samples.shape[0]
    k_max = 0
    for op in range(MAX_STEPS):
        if strengths[op] > 0.0:
            k_max += 1
    m = np.zeros((n, k_max, 3, 3))
    beta = np.zeros((n, k_max))
    shift = np.zeros((n, 3))
    for i in range(n):
        if k_max > 0:
            color_steps(sample_key(seed, epoch, samples[i], STREAM_JITTER), strengths, m[i], beta[i])
        if lighting_std > 0.0:
            key = sample_key(seed, epoch, samples[i], STREAM_LIGHTING)
            shift[i] = lighting_shift(key, lighting_std, eigval, eigvec)
    return m, beta, shift
