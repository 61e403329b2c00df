"""numba kernels of the CPU path, per image: resize, flip, the fused colour pass, the decode scale.

Kernels are cached module functions with explicit loops (`cache=True`: a second process loads them
from numba's cache instead of compiling); the ffcv ops' parallel loops only call them (array
expressions inside a numba prange body compile several times slower).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import draws


@njit(cache=True)
def copy_image(src, dst, mirror):
    """dst = src (or src mirrored left-right), converting the dtype."""
    h, w = src.shape[0], src.shape[1]
    for y in range(h):
        for x in range(w):
            sx = w - 1 - x if mirror else x
            for c in range(3):
                dst[y, x, c] = src[y, sx, c]



@njit(cache=True)
def area_taps(start, length, n_out, n_src, origin):
    """One axis of an area (box-filter) resize, OpenCV's INTER_AREA for downscaling.

    Output j is the mean of the source over [start + j * s, start + (j + 1) * s), s = length / n_out
    (>= 1), each source pixel weighted by its overlap with that interval. The source holds pixels
    origin .. origin + n_src - 1 of the image whose coordinates `start` uses (a decoded crop region;
    the weights do not depend on it). Returns each output's first source index (into the held
    pixels; int64, n_out) and its weights (float32, n_out x taps); taps = ceil(s) + 1 covers any
    interval, trailing weights are 0. `start` and `length` may be fractional.
    """
    scale = length / n_out
    taps = min(np.int64(np.ceil(scale)) + 1, n_src)
    first = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, taps), np.float32)
    for j in range(n_out):
        lo = start + j * scale
        hi = lo + scale
        k0 = min(max(np.int64(np.floor(lo)) - origin, 0), n_src - taps)
        first[j] = k0
        for t in range(taps):
            pixel = origin + k0 + t
            overlap = min(hi, pixel + 1.0) - max(lo, pixel + 0.0)
            if overlap > 0.0:
                weights[j, t] = overlap / scale
    return first, weights


@njit(fastmath=True, cache=True)
def area_resize(src, top, left, height, width, dst, origin_y, origin_x):
    """dst (uint8 HWC, C-contiguous) = the box [top, top + height) x [left, left + width) of an
    image, area-resized.

    src (uint8 HWC) holds the image's pixels from row origin_y and column origin_x on (0, 0: the
    whole image; else a decoded region that contains the box). The box may have fractional edges and
    must be at least dst's size (downscaling only). Separable: rows first (contiguous, vectorized),
    then columns; float32 sums, rounded half to even as OpenCV. Rows are read and written through
    one flat (rows x 3W) view of each image: numba reshapes a row of an array of unknown layout by a
    library call, once per row and tap before (with fused_augment's rows, 1.1-1.3 % of the loader).
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    src_rows = src.reshape(src.shape[0], src.shape[1] * 3)
    dst_rows = dst.reshape(out_h, out_w * 3)
    row0, row_w = area_taps(top, height, out_h, src.shape[0], origin_y)
    col0, col_w = area_taps(left, width, out_w, src.shape[1], origin_x)
    c_lo = col0[0]
    c_hi = col0[out_w - 1] + col_w.shape[1]
    span = (c_hi - c_lo) * 3
    line = np.empty(span, np.float32)
    taps = col_w.shape[1]
    for j in range(out_h):
        for v in range(span):
            line[v] = 0.0
        for t in range(row_w.shape[1]):
            wt = row_w[j, t]
            if wt != 0.0:
                row = src_rows[row0[j] + t, c_lo * 3:c_hi * 3]
                for v in range(span):
                    line[v] += wt * np.float32(row[v])
        # the column pass, unrolled for 2, 3 and 4 taps (a crop 1-3x the output): with the taps a
        # loop, the sums do not stay in registers and the pass takes about 1.4x as long
        out = dst_rows[j]
        for i in range(out_w):
            b = (col0[i] - c_lo) * 3
            if taps == 2:
                w0, w1 = col_w[i, 0], col_w[i, 1]
                a0 = w0 * line[b] + w1 * line[b + 3]
                a1 = w0 * line[b + 1] + w1 * line[b + 4]
                a2 = w0 * line[b + 2] + w1 * line[b + 5]
            elif taps == 3:
                w0, w1, w2 = col_w[i, 0], col_w[i, 1], col_w[i, 2]
                a0 = w0 * line[b] + w1 * line[b + 3] + w2 * line[b + 6]
                a1 = w0 * line[b + 1] + w1 * line[b + 4] + w2 * line[b + 7]
                a2 = w0 * line[b + 2] + w1 * line[b + 5] + w2 * line[b + 8]
            elif taps == 4:
                w0, w1, w2, w3 = col_w[i, 0], col_w[i, 1], col_w[i, 2], col_w[i, 3]
                a0 = w0 * line[b] + w1 * line[b + 3] + w2 * line[b + 6] + w3 * line[b + 9]
                a1 = w0 * line[b + 1] + w1 * line[b + 4] + w2 * line[b + 7] + w3 * line[b + 10]
                a2 = w0 * line[b + 2] + w1 * line[b + 5] + w2 * line[b + 8] + w3 * line[b + 11]
            else:
                a0 = a1 = a2 = np.float32(0.0)
                for t in range(taps):
                    wt = col_w[i, t]
                    a0 += wt * line[b + 3 * t]
                    a1 += wt * line[b + 3 * t + 1]
                    a2 += wt * line[b + 3 * t + 2]
            # rounded half to even and saturated, as OpenCV stores its float sums
            out[3 * i] = np.uint8(min(max(np.rint(a0), np.float32(0.0)), np.float32(255.0)))
            out[3 * i + 1] = np.uint8(min(max(np.rint(a1), np.float32(0.0)), np.float32(255.0)))
            out[3 * i + 2] = np.uint8(min(max(np.rint(a2), np.float32(0.0)), np.float32(255.0)))


@njit(fastmath=True, cache=True)
def _load_row(src_row, row, mirror):
    """row (3 x W float32, planar) = src_row (W x 3 uint8), mirrored left-right if `mirror`.

    Flat indexing, here and in `_store_row`: with 2-D indexing LLVM does not vectorize the
    (de)interleaving, and the fused pass takes about 1.7x as long.
    """
    w = row.shape[1]
    red, green, blue = row[0], row[1], row[2]
    flat = src_row.reshape(-1)
    if mirror:
        for x in range(w):
            q = 3 * (w - 1 - x)
            red[x] = np.float32(flat[q])
            green[x] = np.float32(flat[q + 1])
            blue[x] = np.float32(flat[q + 2])
    else:
        for x in range(w):
            red[x] = np.float32(flat[3 * x])
            green[x] = np.float32(flat[3 * x + 1])
            blue[x] = np.float32(flat[3 * x + 2])


@njit(fastmath=True, cache=True)
def _store_row(row, dst_row):
    """dst_row (W x 3 float32) = row (3 x W float32, planar)."""
    red, green, blue = row[0], row[1], row[2]
    flat = dst_row.reshape(-1)
    for p in range(row.shape[1]):
        flat[3 * p] = red[p]
        flat[3 * p + 1] = green[p]
        flat[3 * p + 2] = blue[p]


@njit(fastmath=True, cache=True)
def _color_step(row, mk, offset):
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
    """flip -> colour jitter steps -> lighting shift -> normalize, uint8 HWC in, float32 HWC out
    (both C-contiguous).

    The same maths, in the same float32 order, as the sequential ops (flip, jitter, lighting,
    normalize; kept as the reference in tests/loader_reference.py) run one after the other, but a
    row at a time in a buffer that stays in cache and without the intermediate images: a contrast
    step's grey mean (of the image before that step) is a pass over src that redoes the earlier
    steps row by row, then one pass writes the output.
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
                    _color_step(row, mf[q], offsets[q])
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
            _color_step(row, mf[q], offsets[q])
        red, green, blue = row[0], row[1], row[2]
        if lighting:
            for p in range(w):
                red[p] = (min(max(red[p] + s0, zero), top) - mean0) * inv0
                green[p] = (min(max(green[p] + s1, zero), top) - mean1) * inv1
                blue[p] = (min(max(blue[p] + s2, zero), top) - mean2) * inv2
        else:
            for p in range(w):
                red[p] = (red[p] - mean0) * inv0
                green[p] = (green[p] - mean1) * inv1
                blue[p] = (blue[p] - mean2) * inv2
        _store_row(row, dst[y])


@njit(cache=True)
def augment_image(src, dst, sample, seed, epoch, flip, strengths, lighting_std, eigval, eigvec, mean, inv_std):
    """`fused_augment` of one crop with its own draws (flip, jitter, lighting streams of the sample).

    A part that is off (flip false, all strengths 0, lighting_std 0) draws nothing and is skipped.
    """
    mirror = flip and draws.flip_draw(draws.sample_key(seed, epoch, sample, draws.STREAM_FLIP))
    m = np.zeros((draws.MAX_STEPS, 3, 3))
    beta = np.zeros(draws.MAX_STEPS)
    steps = 0
    if strengths.any():
        steps = draws.color_steps(draws.sample_key(seed, epoch, sample, draws.STREAM_JITTER), strengths, m, beta)
    lighting = lighting_std > 0.0
    shift = np.zeros(3)
    if lighting:
        shift = draws.lighting_shift(draws.sample_key(seed, epoch, sample, draws.STREAM_LIGHTING), lighting_std,
                                     eigval, eigvec)
    fused_augment(src, dst, mirror, m, beta, steps, shift, lighting, mean, inv_std)


@njit(cache=True)
def decode_scale(height, width, out_h, out_w, max_scale):
    """The largest JPEG decode scale 1/d (d in 1, 2, 4, 8; d <= max_scale) at which a crop box of
    height x width still covers out_h x out_w pixels, so the resize after it only shrinks."""
    d = 1
    while 2 * d <= max_scale and height >= 2 * d * out_h and width >= 2 * d * out_w:
        d *= 2
    return d

