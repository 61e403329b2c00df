"""The fast loader: augmentation statistics, the two device paths, determinism across resume, hangs.

The random draws are tested on many samples through the pure functions; the loaders are built a
few times on tiny betons (numba compiles each loader, ~5 s) and checked against those draws.
"""
from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.writer import DatasetWriter
from PIL import Image

from pipeline_src import params as params_mod
from pipeline_src.loader import LoaderError, draws, gpu, make_train_loader, make_val_loader, measure_throughput
from pipeline_src.loader import decoders, kernels
from pipeline_src.engine import EngineInputError, pick_device
from pipeline_src.loader.pipelines import Augment, _drain, train_ops
from pipeline_src.loader.state import EpochState
from pipeline_src.loader.transforms import Normalize
from pipeline_src.prepare import image_field

import loader_reference as reference

REPO = Path(__file__).resolve().parents[1]
BASE_SETS = ["loader.res=32", "loader.val_res=32", "loader.num_workers=2", "train.channels_last=true"]
BATCH = 32
N_FLAT, N_GRADIENT, N_TEXTURED = 64, 32, 128
STRENGTHS = np.array([0.4, 0.4, 0.4, 0.0])


def load_params(*sets: str) -> dict:
    return params_mod.load(REPO / "params.yaml", [*BASE_SETS, *sets])


def flat_color(i: int) -> np.ndarray:
    """Constant image colours, away from 0 and 255 so the lighting shift never clips."""
    rng = np.random.default_rng(1000 + i)
    return rng.integers(60, 190, 3).astype(np.uint8)


def gradient(h: int, w: int) -> np.ndarray:
    """A smooth image: red rises left to right, green top to bottom, blue a slow wave."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 170 * x / (w - 1), 40 + 170 * y / (h - 1),
                    120 + 60 * np.sin(2 * np.pi * (x + y) / (h + w))], axis=-1)
    return np.round(img).astype(np.uint8)


class Images:
    """A dataset for ffcv's writer: (uint8 HWC image, label = sample index)."""

    def __init__(self, images: list[np.ndarray]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def write_beton(path: Path, images: list[np.ndarray], mode: str) -> Path:
    fields = {"image": RGBImageField(write_mode=mode, compress_probability=0.5), "label": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Images(images))
    return path


@pytest.fixture(scope="module")
def plain_images() -> list[np.ndarray]:
    """N_FLAT constant images of varied sizes, then N_GRADIENT smooth landscape / portrait images."""
    flat = [np.broadcast_to(flat_color(i), (40 + i % 17, 36 + i % 29, 3)).copy() for i in range(N_FLAT)]
    grad = [gradient(48, 64) if i % 2 else gradient(64, 48) for i in range(N_GRADIENT)]
    return flat + grad


@pytest.fixture(scope="module")
def plain_beton(tmp_path_factory, plain_images) -> Path:
    return write_beton(tmp_path_factory.mktemp("betons") / "plain.beton", plain_images, "raw")


@pytest.fixture(scope="module")
def textured_beton(tmp_path_factory) -> Path:
    """Noisy images of varied sizes, about half stored as JPEG (both decode paths)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(N_TEXTURED):
        h, w = 40 + (7 * i) % 33, 40 + (11 * i) % 41
        base = rng.integers(0, 256, (1, 1, 3))
        images.append(np.clip(base + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8))
    return write_beton(tmp_path_factory.mktemp("betons") / "textured.beton", images, "proportion")


def take_epoch(loader, epoch: int, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if limit is not None and len(out) >= limit:
            break
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# --------------------------------------------------------------------------- pure draws


def key(seed: int, epoch: int, sample: int, stream: int) -> np.uint64:
    """A sample key as numba's uint64 (a plain Python int above 2**63 would not convert back)."""
    return np.uint64(draws.sample_key(seed, epoch, sample, stream))


def keys(n: int, stream: int, seed: int = 0, epoch: int = 0) -> list[np.uint64]:
    return [key(seed, epoch, i, stream) for i in range(n)]


def test_keys_depend_on_every_input():
    base = key(0, 0, 0, draws.STREAM_CROP)
    assert base == key(0, 0, 0, draws.STREAM_CROP)
    others = {key(1, 0, 0, 1), key(0, 1, 0, 1), key(0, 0, 1, 1),
              key(0, 0, 0, 2)}
    assert base not in others and len(others) == 4
    u = np.array([draws.uniform(k, 0) for k in keys(20000, 9)])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    z = np.array([draws.normal(k, 1) for k in keys(20000, 9)])
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.03


@pytest.mark.parametrize("height, width", [(1000, 1000), (600, 900), (900, 500)])
def test_crop_areas_and_ratios_inside_ranges_and_cover_them(height, width):
    boxes = np.array([draws.random_crop(k, height, width, 0.08, 1.0, 0.75, 4 / 3) for k in keys(6000, 1)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    ratio = w / h
    # rounding to whole pixels moves a box by < 0.5 px per side: below 1 % at these sizes
    assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.99 and ratio.max() <= 4 / 3 * 1.01
    best = np.clip(width / height, 0.75, 4 / 3)  # the largest box of an allowed aspect
    largest = min(width, height * best) * min(height, width / best) / (height * width)
    assert area.min() < 0.09 and area.max() > 0.97 * largest
    assert ratio.min() < 0.76 and ratio.max() > 1.31
    # positions uniform over the free range, not stuck at a corner or the centre
    for pos, free in ((top, height - h), (left, width - w)):
        rel = pos[free > 100] / free[free > 100]
        assert len(rel) > 1000 and abs(rel.mean() - 0.5) < 0.03 and rel.min() < 0.02 and rel.max() > 0.98


def test_crop_falls_back_to_a_centred_clamped_box():
    # 20 x 400: no box of area >= 8 % and aspect <= 4/3 fits the height, so every try fails
    assert draws.random_crop(key(0, 0, 0, 1), 20, 400, 0.08, 1.0, 0.75, 4 / 3) == (0, 186, 20, 27)
    assert draws.random_crop(key(0, 0, 0, 1), 64, 64, 1.0, 1.0, 1.0, 1.0) == (0, 0, 64, 64)


def test_flip_rate_is_one_half():
    rate = np.mean([draws.flip_draw(k) for k in keys(20000, draws.STREAM_FLIP)])
    assert abs(rate - 0.5) < 0.015


def test_jitter_factors_inside_range_and_order_random():
    ks = keys(20000, draws.STREAM_JITTER)
    f = np.array([draws.jitter_factors(k, STRENGTHS) for k in ks])
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4
    assert f[:, :3].min() < 0.61 and f[:, :3].max() > 1.39
    assert np.abs(f[:, :3].mean(axis=0) - 1.0).max() < 0.01
    assert (f[:, 3] == 0.0).all()  # hue off
    orders = [tuple(draws.jitter_order(k, STRENGTHS)) for k in ks]
    assert {len(o) for o in orders} == {3} and all(sorted(o) == [0, 1, 2] for o in orders)
    counts = np.array([orders.count(p) for p in set(orders)])
    assert len(counts) == 6 and np.abs(counts / len(orders) - 1 / 6).max() < 0.02
    only_contrast = {tuple(draws.jitter_order(k, np.array([0.0, 0.4, 0.0, 0.0]))) for k in ks[:100]}
    assert only_contrast == {(draws.CONTRAST,)}


def test_hue_angle_range():
    f = np.array([draws.jitter_factors(k, np.array([0.0, 0.0, 0.0, 0.1])) for k in keys(5000, 3)])
    assert np.abs(f[:, 3]).max() <= 0.1 * np.pi and np.abs(f[:, 3]).max() > 0.099 * np.pi
    assert (f[:, :3] == 1.0).all()


def test_lighting_shift_follows_the_pca_columns_with_alpha_std():
    shifts = np.array([draws.lighting_shift(k, 0.1, draws.PCA_EIGVAL, draws.PCA_EIGVEC)
                       for k in keys(20000, draws.STREAM_LIGHTING)])
    # the eigenvectors are the columns (orthonormal): alpha_k = (eigvec.T @ shift)_k / eigval_k
    assert np.allclose(draws.PCA_EIGVEC.T @ draws.PCA_EIGVEC, np.eye(3), atol=1e-3)
    alpha = shifts @ draws.PCA_EIGVEC / draws.PCA_EIGVAL
    assert np.abs(alpha.std(axis=0) / 0.1 - 1).max() < 0.03
    assert np.abs(alpha.mean(axis=0)).max() < 0.003
    assert np.abs(np.corrcoef(alpha.T) - np.eye(3)).max() < 0.03
    # most of the noise is a change of brightness: along the grey axis, column 0
    grey = np.ones(3) / np.sqrt(3)
    assert (shifts @ grey).std() > 5 * np.linalg.norm(shifts - np.outer(shifts @ grey, grey), axis=1).std()


# --------------------------------------------------------------------------- kernels


def random_images(n: int, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)


def numba_color(images: np.ndarray, op: int, factor: float) -> np.ndarray:
    out = images.copy()
    m, beta = np.zeros((1, 3, 3)), np.zeros(1)
    beta[0] = draws.step_matrix(op, factor, m[0])
    for img in out:
        reference.apply_color_steps(img, m, beta, 1)
    return out


def test_color_steps_are_the_named_adjustments():
    x = random_images(4)
    gray = x @ draws.GRAY
    assert np.allclose(numba_color(x, draws.BRIGHTNESS, 1.3), np.clip(1.3 * x, 0, 255), atol=1e-3)
    mean_gray = gray.mean(axis=(1, 2))[:, None, None, None]
    assert np.allclose(numba_color(x, draws.CONTRAST, 0.7), np.clip(0.7 * x + 0.3 * mean_gray, 0, 255), atol=1e-3)
    assert np.allclose(numba_color(x, draws.SATURATION, 1.2), np.clip(1.2 * x - 0.2 * gray[..., None], 0, 255),
                       atol=1e-3)
    assert np.allclose(numba_color(x, draws.HUE, 0.0), x, atol=1e-3)
    rotated = numba_color(np.full((1, 4, 4, 3), [150, 100, 110], np.float32), draws.HUE, 0.5)
    assert np.allclose(rotated @ draws.GRAY, 150 * 0.299 + 100 * 0.587 + 110 * 0.114, atol=1e-2)  # luma kept
    assert np.abs(rotated - [150, 100, 110]).max() > 5  # but the colour turns


def test_torch_ops_match_the_numba_ops():
    x = random_images(16)
    samples = np.arange(16, dtype=np.int64)
    strengths = np.array([0.4, 0.4, 0.4, 0.1])
    m, beta, shift = draws.batch_color_draws(5, 2, samples, strengths, 0.1, draws.PCA_EIGVAL, draws.PCA_EIGVEC)
    expected = np.empty_like(x)
    for i in range(16):
        mi, bi = np.zeros((4, 3, 3)), np.zeros(4)
        steps = draws.color_steps(key(5, 2, i, draws.STREAM_JITTER), strengths, mi, bi)
        assert steps == 4 and np.array_equal(mi, m[i]) and np.array_equal(bi, beta[i])
        img = x[i].copy()
        reference.apply_color_steps(img, mi, bi, steps)
        reference.apply_shift(img, expected[i], shift[i].astype(np.float32))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    out = gpu.apply_shift(gpu.apply_color_steps(t, torch.from_numpy(m).float(), torch.from_numpy(beta).float()),
                          torch.from_numpy(shift).float())
    assert torch.allclose(out.permute(0, 2, 3, 1), torch.from_numpy(expected), atol=2e-3)


def sequential_augment(src: np.ndarray, mirror: bool, m, beta, steps: int, shift, lighting: bool,
                       mean: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
    """What SeededFlip -> ColorJitter -> PCALighting -> Normalize compute, kernel by kernel."""
    flipped = np.empty_like(src)
    kernels.copy_image(src, flipped, mirror)
    x = flipped.astype(np.float32)
    if steps:
        reference.apply_color_steps(x, m, beta, steps)
    if lighting:
        lit = np.empty_like(x)
        reference.apply_shift(x, lit, shift.astype(np.float32))
        x = lit
    return (x - mean) * inv_std


@pytest.mark.parametrize("strengths, lighting_std, h, w", [
    ((0.4, 0.4, 0.4, 0.0), 0.1, 12, 10), ((0.4, 0.4, 0.4, 0.1), 0.1, 9, 16), ((0.0, 0.5, 0.0, 0.0), 0.0, 16, 16),
    ((0.0, 0.0, 0.0, 0.0), 0.1, 7, 5), ((0.0, 0.0, 0.0, 0.0), 0.0, 8, 8), ((0.9, 0.9, 0.9, 0.2), 0.5, 11, 13)])
def test_fused_augment_equals_the_sequential_ops(strengths, lighting_std, h, w):
    """One fused pass gives what the four ops give in sequence, for every draw (hue, strong factors that clip)."""
    rng = np.random.default_rng(7)
    strengths = np.array(strengths)
    mean, inv_std = np.array([123.68, 116.779, 103.939], np.float32), (1 / np.array([58.4, 57.1, 57.4])).astype(np.float32)
    for sample in range(40):
        src = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        if sample % 3 == 0:  # mostly dark or bright images, so that the steps clip
            src = np.clip(src.astype(int) // 4 + (0 if sample % 2 else 190), 0, 255).astype(np.uint8)
        mirror = bool(sample % 2)
        m, beta = np.zeros((4, 3, 3)), np.zeros(4)
        steps = draws.color_steps(key(1, 0, sample, draws.STREAM_JITTER), strengths, m, beta) if strengths.any() else 0
        shift = draws.lighting_shift(key(1, 0, sample, draws.STREAM_LIGHTING), lighting_std, draws.PCA_EIGVAL,
                                     draws.PCA_EIGVEC)
        lighting = lighting_std > 0
        expected = sequential_augment(src, mirror, m, beta, steps, shift, lighting, mean, inv_std)
        got = np.empty((h, w, 3), np.float32)
        kernels.fused_augment(src, got, mirror, m, beta, steps, shift, lighting, mean, inv_std)
        assert np.abs(got - expected).max() < 2e-4  # float32 rounding; one grey level is ~0.017
    assert steps == np.count_nonzero(strengths)


def opencv_area(src: np.ndarray, top: int, left: int, h: int, w: int, out: tuple[int, int]) -> np.ndarray:
    """ffcv's crop resize (OpenCV INTER_AREA), which `area_resize` replaces."""
    dst = np.empty((*out, 3), np.uint8)
    resize_crop(src, top, top + h, left, left + w, dst)
    return dst


@pytest.mark.parametrize("shape, out", [((300, 400), (128, 128)), ((97, 61), (32, 32)), ((64, 64), (32, 32)),
                                        ((50, 80), (50, 40)), ((33, 200), (16, 31))])
def test_area_resize_is_opencv_inter_area(shape, out):
    """Our separable box filter against OpenCV's INTER_AREA (ffcv's resize) on crop boxes, noisy and blocky."""
    rng = np.random.default_rng(3)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3)), 8, 0), 8, 1)
    images = [rng.integers(0, 256, (*shape, 3)).astype(np.uint8), smooth[:shape[0], :shape[1]].astype(np.uint8)]
    for img in images:
        for k in range(20):
            top, left, h, w = draws.random_crop(key(0, 0, k, 1), shape[0], shape[1], 0.3, 1.0, 0.75, 4 / 3)
            h, w = max(h, out[0]), max(w, out[1])
            top, left = min(top, shape[0] - h), min(left, shape[1] - w)
            got = np.empty((*out, 3), np.uint8)
            kernels.area_resize(img, float(top), float(left), float(h), float(w), got, 0, 0)
            diff = np.abs(got.astype(int) - opencv_area(img, top, left, h, w, out).astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.05  # rounding of the float sums only


def test_area_resize_takes_fractional_boxes():
    """A box at half coordinates on an image equals the whole-pixel box on its 2x pixel-repeated copy."""
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (45, 70, 3)).astype(np.uint8)
    big = np.repeat(np.repeat(small, 2, 0), 2, 1)
    for k in range(30):
        top, left, h, w = draws.random_crop(key(0, 0, k, 1), 90, 140, 0.3, 1.0, 0.75, 4 / 3)
        a, b = np.empty((24, 24, 3), np.uint8), np.empty((24, 24, 3), np.uint8)
        kernels.area_resize(small, top / 2, left / 2, h / 2, w / 2, a, 0, 0)
        kernels.area_resize(big, float(top), float(left), float(h), float(w), b, 0, 0)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_area_resize_of_a_region_is_that_of_the_whole_image():
    """The box read from a decoded region (any region holding it, origin given) gives the same bytes."""
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (90, 140, 3)).astype(np.uint8)
    for k in range(40):
        top, left, h, w = draws.random_crop(key(0, 0, k, 1), 90, 140, 0.2, 1.0, 0.75, 4 / 3)
        top, left, h, w = top / 2 + 20, left / 2 + 30, h / 2, w / 2  # fractional, inside the image
        whole, part = np.empty((16, 16, 3), np.uint8), np.empty((16, 16, 3), np.uint8)
        kernels.area_resize(img, top, left, h, w, whole, 0, 0)
        y0, x0 = int(top) - k % 3, int(left) - k % 2
        y1, x1 = min(int(np.ceil(top + h)) + k % 2, 90), min(int(np.ceil(left + w)) + k % 3, 140)
        kernels.area_resize(np.ascontiguousarray(img[y0:y1, x0:x1]), top, left, h, w, part, y0, x0)
        assert np.array_equal(whole, part)


def test_decode_scale_keeps_the_crop_at_least_the_output_size():
    assert kernels.decode_scale(255, 400, 128, 128, 8) == 1
    assert kernels.decode_scale(256, 400, 128, 128, 8) == 2
    assert kernels.decode_scale(400, 256, 128, 128, 2) == 2
    assert kernels.decode_scale(300, 300, 32, 32, 8) == 8
    assert kernels.decode_scale(300, 300, 32, 32, 4) == 4
    assert kernels.decode_scale(300, 300, 32, 32, 1) == 1
    assert kernels.decode_scale(127, 1000, 32, 32, 8) == 2


# --------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def train_epochs(textured_beton):
    """Epochs 0, 1 of a seed-0 CPU loader (full augmentation), then epoch 1 again after a break."""
    loader = make_train_loader(textured_beton, load_params(), BATCH, 0, torch.device("cpu"))
    first = take_epoch(loader, 0)
    second = [(x.clone(), y.clone()) for x, y in loader]  # iter() advanced to epoch 1
    take_epoch(loader, 2, limit=1)  # stop mid-epoch: the pipeline thread must stop cleanly
    again = take_epoch(loader, 1)
    yield len(loader), first, second, again
    del loader  # freed here, not at the end of the session
    gc.collect()


@pytest.mark.timeout(120)
def test_train_batches_shape_dtype_and_coverage(train_epochs):
    n_batches, first, second, _ = train_epochs
    assert n_batches == N_TEXTURED // BATCH == len(first) == len(second)
    for images, labels in first:
        assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (BATCH,) and labels.dtype == torch.int64
        assert torch.isfinite(images).all()
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == list(range(N_TEXTURED))  # each sample once per epoch
    assert not torch.equal(labels, torch.cat([y for _, y in second]))  # reshuffled


@pytest.mark.timeout(120)
def test_epoch_is_the_same_after_an_aborted_epoch(train_epochs):
    _, _, second, again = train_epochs
    assert same_batches(second, again)


@pytest.mark.timeout(120)
def test_epochs_share_one_set_of_batch_buffers(plain_beton):
    """ffcv allocates (and the kernel zero-fills) new batch buffers every epoch; ours keeps the first set."""
    loader = make_train_loader(plain_beton, load_params(), BATCH, 0, torch.device("cpu"))
    buffers = [[images.data_ptr() for images, _ in loader] for _ in range(2)]
    assert len(buffers[0]) == len(loader) and buffers[0] == buffers[1]


@pytest.mark.timeout(180)
def test_resume_in_a_fresh_process_gives_the_same_epoch(train_epochs, textured_beton, tmp_path):
    """A new process that starts at epoch 1 gets epoch 1's batches; another seed does not (and no hang)."""
    _, _, second, _ = train_epochs
    out = tmp_path / "epoch1.npz"
    script = (
        "import sys, json, numpy as np, torch\n"
        "from pipeline_src import params as params_mod\n"
        "from pipeline_src.loader import make_train_loader\n"
        "p = params_mod.load(sys.argv[3], json.loads(sys.argv[4]))\n"
        "arrays = {}\n"
        "for seed in (0, 1):\n"
        f"    loader = make_train_loader(sys.argv[1], p, {BATCH}, seed, torch.device('cpu'))\n"
        "    loader.set_epoch(1)\n"
        "    for b, (x, y) in enumerate(loader):\n"
        "        arrays[f's{seed}x{b}'] = x.numpy().copy()\n"
        "        arrays[f's{seed}y{b}'] = y.numpy().copy()\n"
        "np.savez(sys.argv[2], **arrays)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(textured_beton), str(out), str(REPO / "params.yaml"),
                    json.dumps(BASE_SETS)], cwd=REPO, check=True, timeout=170)
    data = np.load(out)
    fresh = [(torch.from_numpy(data[f"s0x{b}"]), torch.from_numpy(data[f"s0y{b}"])) for b in range(len(second))]
    assert same_batches(fresh, second)
    other = [(torch.from_numpy(data[f"s1x{b}"]), torch.from_numpy(data[f"s1y{b}"])) for b in range(len(second))]
    assert not any(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(other, second))
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in second]))


@pytest.mark.timeout(120)
def test_a_second_process_loads_the_decoders_kernels_from_the_cache(train_epochs, textured_beton):
    """After this process compiled them (train_epochs), a fresh one compiles none of the kernels
    the decoder calls: only ffcv's generated closures are compiled per process."""
    script = (
        "import sys, json, torch\n"
        "from pipeline_src import params as params_mod\n"
        "from pipeline_src.loader import draws, kernels, make_train_loader, state\n"
        "p = params_mod.load(sys.argv[2], json.loads(sys.argv[3]))\n"
        f"next(iter(make_train_loader(sys.argv[1], p, {BATCH}, 0, torch.device('cpu'))))\n"
        "used = (state.read_state, kernels.augment_image, kernels.area_resize, kernels.decode_scale,\n"
        "        draws.random_crop)\n"
        "print(json.dumps({f.py_func.__name__: [len(f.stats.cache_hits), len(f.stats.cache_misses)] for f in used}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(textured_beton), str(REPO / "params.yaml"),
                           json.dumps(BASE_SETS)], cwd=REPO, check=True, timeout=110, capture_output=True, text=True)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(hits >= 1 and misses == 0 for hits, misses in stats.values()), stats


@pytest.mark.timeout(120)
def test_device_path_gives_the_worker_path_batches(train_epochs, textured_beton):
    """The torch ops (gpu.py, here on CPU tensors) draw and compute what the numba workers do."""
    _, first, _, _ = train_epochs
    loader = make_train_loader(textured_beton, load_params(), BATCH, 0, torch.device("cpu"), color_on_device=True)
    assert loader.device_ops is not None
    device_path = take_epoch(loader, 0)
    for (x1, y1), (x2, y2) in zip(first, device_path):
        assert torch.equal(y1, y2)
        assert x2.dtype == torch.float32 and x2.is_contiguous(memory_format=torch.channels_last)
        assert (x1 - x2).abs().max() < 1e-3  # normalized units: 1 grey level is ~0.017
    stats = measure_throughput(loader, batches=3)
    assert stats["batches"] == 3 and stats["images"] == 2 * BATCH and stats["images_per_s"] > 0


@pytest.mark.timeout(120)
def test_fused_loader_gives_the_sequential_ops_batches(textured_beton):
    """The default (fused) worker path against the four ops one by one, whole epochs, hue on too."""
    params = load_params("augment.hue=0.1")
    fused = take_epoch(make_train_loader(textured_beton, params, BATCH, 4, torch.device("cpu")), 1)
    plain = take_epoch(reference.reference_train_loader(textured_beton, params, BATCH, 4), 1)
    assert len(fused) == len(plain) == N_TEXTURED // BATCH
    for (x1, y1), (x2, y2) in zip(fused, plain):
        assert torch.equal(y1, y2)
        assert (x1 - x2).abs().max() < 2e-4


@pytest.fixture(scope="module")
def large_images() -> list[np.ndarray]:
    """Photo-like images (smooth shapes, edges, mild noise) big enough for reduced-scale decoding at 32 px."""
    rng = np.random.default_rng(5)
    images = []
    for i in range(24):
        h, w = (192, 256) if i % 2 else (256, 208)
        img = gradient(h, w).astype(np.float64)
        y, x = np.mgrid[0:h, 0:w]
        for _ in range(4):  # discs of flat colour: sharp edges
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(15, 60)
            img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        images.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def large_jpeg_beton(tmp_path_factory, large_images) -> Path:
    """The large images as ffcv's own JPEG field writes them (no restart markers)."""
    path = tmp_path_factory.mktemp("betons") / "large.beton"
    fields = {"image": RGBImageField(write_mode="jpg"), "label": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Images(large_images))
    return path


@pytest.fixture(scope="module")
def restart_marked_beton(tmp_path_factory, large_images) -> Path:
    """The same images as prepare writes JPEGs: a restart marker after every MCU."""
    settings = {"write_mode": "jpg", "max_resolution": None, "jpeg_quality": 90, "compress_probability": 0.5,
                "jpeg_restart_interval": 1}
    path = tmp_path_factory.mktemp("betons") / "restart.beton"
    fields = {"image": image_field(settings), "label": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Images(large_images))
    return path


@pytest.mark.timeout(120)
def test_reduced_scale_decode_gives_the_full_decode_crops(large_jpeg_beton):
    """JPEGs decoded at 1/2 .. 1/8 scale (crop box >= 2x .. 8x the output) against the full decode."""
    params = load_params("augment.crop_area=[0.3,1.0]", "augment.flip=false", "augment.brightness=0",
                         "augment.contrast=0", "augment.saturation=0", "augment.lighting_std=0")
    aug = Augment.from_params(params)
    meta = Reader(str(large_jpeg_beton)).metadata["f0"]
    scales = [kernels.decode_scale(*draws.random_crop(key(2, 0, i, draws.STREAM_CROP), meta["height"][i],
                                                        meta["width"][i], 0.3, 1.0, *aug.ratio)[2:], 32, 32, 8)
              for i in range(len(meta))]
    assert {2, 4}.issubset(scales)  # the test covers several scales
    batches = {s: take_epoch(make_train_loader(large_jpeg_beton, {**params, "loader": {**params["loader"],
                             "max_decode_scale": s}}, 8, 2, torch.device("cpu")), 0) for s in (1, 2, 8)}
    std = torch.tensor(aug.std)[None, :, None, None]
    # grey levels; measured: mean 0.6 (default, 1/2) and 1.2 (up to 1/8; its reduced IDCTs are coarser)
    for scale, mean_bound in ((2, 1.0), (8, 2.0)):
        levels = []
        for (full, y1), (scaled, y2) in zip(batches[1], batches[scale]):
            assert torch.equal(y1, y2)
            levels.append(((full - scaled) * std).abs())
        levels = torch.cat(levels)
        assert levels.mean() < mean_bound and levels.max() < 40  # edges blur a little differently, no shift
        assert levels.mean(dim=(1, 2, 3)).max() < 2 * mean_bound  # no image is off (a shifted box would be)


def jpeg_bytes(img: np.ndarray, subsampling: int, restart_mcus: int = 0, restart_rows: int = 0) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=90, subsampling=subsampling,
                              restart_marker_blocks=restart_mcus, restart_marker_rows=restart_rows)
    return np.frombuffer(buffer.getvalue(), np.uint8)


# restart markers: none; every MCU (as prepare writes them); every 2 MCUs (a row of 4:2:x MCUs is 19 of
# them here, so only 4:4:4's rows of 38 are cut in intervals, the others take the plain path); every MCU row
@pytest.mark.parametrize("restart", [(0, 0), (1, 0), (2, 0), (0, 1)], ids=["none", "mcu", "2mcu", "row"])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0 (ffcv's writer: OpenCV's 4:2:0)
def test_crop_decode_equals_the_full_decode_then_crop(subsampling, restart):
    """The library's region at each scale, as the decoder asks for it, against ffcv's full decode:
    pixel for pixel, also where it decodes only the restart intervals that hold the box."""
    assert decoders.HAS_CROP_DECODE, f"{decoders.CROP_LIBRARY} is not built: run `make setup`"
    rng = np.random.default_rng(subsampling)
    img = gradient(203, 301).astype(np.float64)
    data = jpeg_bytes(np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8), subsampling, *restart)
    mcus_per_row = -(-301 // (8 if subsampling == 0 else 16))
    cut = restart[1] > 0 or (restart[0] > 0 and mcus_per_row % restart[0] == 0)
    before = decoders.decoded_interval_regions()
    for scale in (1, 2, 4, 8):
        sh, sw = -(-203 // scale), -(-301 // scale)
        full = np.empty((sh, sw, 3), np.uint8)
        imdecode(data, full, 203, 301, 203, 301, 0, 0, 1, scale, False, False)
        for k in range(30):
            top, left, h, w = draws.random_crop(key(0, scale, k, 1), 203, 301, 0.05, 1.0, 0.5, 2.0)
            row0, row_end = decoders.region_rows(top, h, scale, sh)
            col_lo, col_end = decoders.region_rows(left, w, scale, sw)
            col_lo, col_end = max(col_lo - 1, 0), min(col_end + 1, sw)  # one column more, as the decoder
            out, region = np.zeros(full.size, np.uint8), np.zeros(2, np.int64)
            assert decoders.crop_decode(data, out, scale, row0, col_lo, row_end - row0, col_end - col_lo, region) == 0
            x0, width = region
            assert x0 <= col_lo and x0 + width >= col_end
            got = out[:3 * (row_end - row0) * width].reshape(row_end - row0, width, 3)
            a, b = decoders.region_rows(left, w, scale, sw)
            assert np.array_equal(got[:, a - x0:b - x0], full[row0:row_end, a:b])
    intervals = decoders.decoded_interval_regions() - before
    # of 120 boxes, all but those that span the image with their margin (measured: 108-117, rows of 4:2:0: 92)
    assert intervals >= 90 if cut else intervals == 0
    assert decoders.crop_decode(data[:100], out, 2, 0, 0, 10, 10, region) == -1  # truncated: an error, no crash
    assert decoders.crop_decode(data, out, 16, 0, 0, 4, 4, region) in (0, -1)  # not 1/2/4/8: libjpeg's say, no crash
    assert decoders.crop_decode(data, out, 2, 0, 0, 200, 10, region) == -1  # box outside the scaled image


@pytest.mark.timeout(120)
def test_restart_marked_jpegs_give_the_same_batches(large_jpeg_beton, restart_marked_beton):
    """Prepare's JPEGs (a restart marker every MCU) hold the same pixels as ffcv's own; the loader
    cuts each crop from their restart intervals, and its batches are those of ffcv's JPEGs."""
    params = load_params("loader.max_decode_scale=8", "augment.crop_area=[0.08,1.0]")
    before = decoders.decoded_interval_regions()
    marked = take_epoch(reference.reference_train_loader(restart_marked_beton, params, 8, 1), 0)
    cut = decoders.decoded_interval_regions() - before
    assert 20 <= cut <= 24  # every image of the epoch but a crop that spans its whole image
    plain = take_epoch(reference.reference_train_loader(large_jpeg_beton, params, 8, 1), 0)
    assert decoders.decoded_interval_regions() - before == cut
    assert same_batches(marked, plain)


@pytest.mark.timeout(120)
def test_the_loader_decodes_crop_regions_through_the_library(large_jpeg_beton):
    """With the library built every JPEG crop is a region decode, and the batches are the full decode's."""
    params = load_params("loader.max_decode_scale=8", "augment.crop_area=[0.08,1.0]")
    before = decoders.decoded_regions()
    region = take_epoch(reference.reference_train_loader(large_jpeg_beton, params, 8, 1), 0)
    assert decoders.decoded_regions() - before == 24  # every image of the epoch
    full = take_epoch(reference.reference_train_loader(large_jpeg_beton, params, 8, 1, region_decode=False), 0)
    assert decoders.decoded_regions() - before == 24
    assert same_batches(region, full)


@pytest.mark.timeout(120)
def test_flip_and_lighting_follow_the_draws_and_jitter_is_left_out(plain_beton, plain_images):
    """Full-image crops of constant and gradient images: flips and shifts are exactly the drawn ones."""
    params = load_params("augment.crop_area=[1.0,1.0]", "augment.crop_ratio=[1.0,1.0]", "augment.brightness=0",
                         "augment.contrast=0", "augment.saturation=0", "loader.drop_last=false",
                         "loader.order=quasi_random", "loader.os_cache=false")
    aug = Augment.from_params(params)
    fused, ops = train_ops(aug, EpochState(0), True)
    assert fused.parts == ("flip", "lighting", "normalize") and ops == []
    mean, std = np.array(aug.mean), np.array(aug.std)
    loader = make_train_loader(plain_beton, params, BATCH, 3, torch.device("cpu"))
    flips, alphas = [], []
    for epoch in (0, 1):
        batches = take_epoch(loader, epoch)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(N_FLAT + N_GRADIENT))
        for images, labels in batches:
            pixels = images.permute(0, 2, 3, 1).numpy().astype(np.float64) * std + mean  # back to 0-255
            for img, i in zip(pixels, labels.tolist()):
                shift = draws.lighting_shift(key(3, epoch, i, draws.STREAM_LIGHTING), 0.1,
                                             draws.PCA_EIGVAL, draws.PCA_EIGVEC)
                if i < N_FLAT:
                    measured = img - plain_images[i][0, 0]
                    assert np.ptp(measured.reshape(-1, 3), axis=0).max() < 1e-3  # same shift on every pixel
                    assert np.allclose(measured[0, 0], shift, atol=1e-3)
                    alphas.append(shift @ draws.PCA_EIGVEC / draws.PCA_EIGVAL)
                else:
                    red = img[..., 0].mean(axis=0)
                    flipped = red[0] > red[-1]
                    assert flipped == draws.flip_draw(key(3, epoch, i, draws.STREAM_FLIP))
                    flips.append(flipped)
    assert len(flips) == 2 * N_GRADIENT and 0.2 < np.mean(flips) < 0.8
    assert 0.07 < np.std(alphas, axis=0).min() and np.std(alphas, axis=0).max() < 0.13


@pytest.mark.timeout(120)
def test_val_is_normalized_centre_crop_and_deterministic(plain_beton, plain_images):
    params = load_params()
    aug = Augment.from_params(params)
    loader = make_val_loader(plain_beton, params, 40, torch.device("cpu"))
    passes = [take_epoch(loader, 0), take_epoch(loader, 5)]
    assert same_batches(*passes)
    assert [len(y) for _, y in passes[0]] == [40, 40, 16]  # the last, partial batch is kept
    images = torch.cat([x for x, _ in passes[0]]).permute(0, 2, 3, 1).numpy()
    assert torch.equal(torch.cat([y for _, y in passes[0]]), torch.arange(N_FLAT + N_GRADIENT))  # in order, all
    for i in range(N_FLAT):
        expected = (plain_images[i][0, 0] - np.array(aug.mean)) / np.array(aug.std)
        assert np.allclose(images[i], expected, atol=1e-5)
    # the gradients against "shorter side to val_res / ratio, then centre crop val_res", done by PIL
    # in continuous coordinates: the centred square of side ratio * shorter side, resized to val_res
    res, ratio = params["loader"]["val_res"], params["loader"]["val_crop_ratio"]
    for i in range(N_FLAT, N_FLAT + N_GRADIENT):
        src = Image.fromarray(plain_images[i])
        side = ratio * min(src.size)
        x0, y0 = (src.width - side) / 2, (src.height - side) / 2
        ref = np.asarray(src.resize((res, res), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side)), np.float64)
        got = images[i] * np.array(aug.std) + np.array(aug.mean)
        err = np.abs(got - ref)
        assert err.mean() < 0.5 and err.max() < 1.5  # a box off by one source pixel errs by ~2.7 levels


# --------------------------------------------------------------------------- failures


class _Boom(Operation):
    """A torch-side op that fails inside ffcv's pipeline thread."""

    def generate_code(self):
        def boom(labels, _):
            raise RuntimeError("boom (expected by the test)")

        return boom

    def declare_state_and_memory(self, previous_state):
        return previous_state, None


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_pipeline_thread_raises_instead_of_hanging(plain_beton):
    loader = Loader(str(plain_beton), batch_size=8, num_workers=1,
                    pipelines={"image": None, "label": [IntDecoder(), ToTensor(), _Boom()]})
    with pytest.raises(LoaderError, match="pipeline thread stopped"):
        for _ in _drain(iter(loader)):
            pass


@pytest.mark.timeout(60)
def test_numba_op_after_totensor_is_an_error_not_a_hang(plain_beton):
    # ffcv 1.0.2's graph loops forever when a numba op follows a torch op; ours refuse first
    pipeline = [CenterCropRGBImageDecoder((16, 16), ratio=1.0), ToTensor(), Normalize((0, 0, 0), (1, 1, 1))]
    with pytest.raises(ValueError, match="before ToTensor"):
        Loader(str(plain_beton), batch_size=8, num_workers=1, pipelines={"image": pipeline})


def test_ops_are_left_out_when_switched_off():
    params = load_params("augment.flip=false", "augment.brightness=0", "augment.contrast=0",
                         "augment.saturation=0", "augment.lighting_std=0")
    state = EpochState(0)
    fused, ops = train_ops(Augment.from_params(params), state, True)
    assert fused.parts == ("normalize",) and ops == []
    assert train_ops(Augment.from_params(params), state, False) == (None, [])
    full = Augment.from_params(load_params("augment.hue=0.1"))
    fused, ops = train_ops(full, state, True)
    assert type(fused).__name__ == "FusedAugment" and fused.parts == ("flip", "jitter", "lighting", "normalize")
    assert ops == []
    fused, ops = train_ops(full, state, False)
    assert fused is None and [type(op).__name__ for op in ops] == ["SeededFlip"]


def test_bad_inputs_give_clear_errors(tmp_path, plain_beton, monkeypatch):
    params = load_params()
    with pytest.raises(LoaderError, match="missing.beton: beton not found"):
        make_train_loader(tmp_path / "missing.beton", params, 8, 0, torch.device("cpu"))
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton")
    with pytest.raises(LoaderError, match="not a readable ffcv beton"):
        make_val_loader(junk, params, 8, torch.device("cpu"))
    no_label = tmp_path / "nolabel.beton"
    DatasetWriter(str(no_label), {"image": RGBImageField(), "y": IntField()}, num_workers=1).from_indexed_dataset(
        Images([np.zeros((8, 8, 3), np.uint8)] * 2))
    with pytest.raises(LoaderError, match="needs field 'label'"):
        make_val_loader(no_label, params, 8, torch.device("cpu"))
    with pytest.raises(LoaderError, match="give no batch of 512"):
        make_train_loader(plain_beton, params, 512, 0, torch.device("cpu"))
    with pytest.raises(LoaderError, match="quasi_random"):
        make_train_loader(plain_beton, load_params("loader.order=quasi_random"), 8, 0, torch.device("cpu"),
                          distributed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoaderError, match="no CUDA device"):
        make_train_loader(plain_beton, params, 8, 0, torch.device("cuda"))
    with pytest.raises(EngineInputError, match="loader.device"):
        pick_device(load_params("loader.device=cuda"))
    assert pick_device(load_params("loader.device=auto")) == torch.device("cpu")


def test_ffcv_import_skips_the_typed_dict_compile():
    # a fresh process: importing the loader must leave ffcv's IMAGE_MODES a plain dict (no numba
    # compile at import) while numba.typed.Dict stays the real typed dict for everyone else
    code = ("import pipeline_src.loader, numba.typed, ffcv.fields.rgb_image as r; "
            "assert type(r.IMAGE_MODES) is dict and r.IMAGE_MODES == {'jpg': 0, 'raw': 1}; "
            "assert numba.typed.Dict is not dict")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
