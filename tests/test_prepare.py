"""prepare: ILSVRC2012 folders -> betons. Round trip through an ffcv Loader, awkward and broken files,
both val layouts, layout errors, byte-identical output, skip on re-run, and a SIGKILL mid-write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_src import params as params_mod
from pipeline_src import prepare as prep

ROOT = Path(__file__).resolve().parents[1]
SIDE = 32  # every test image is SIDE x SIDE, below max_resolution, so SimpleRGBImageDecoder reads it whole
WNIDS = ["n00000001", "n00000002", "n00000003"]
RED, GREY, GREEN, BLUE = (255, 0, 0), (128, 128, 128), (0, 200, 0), (0, 0, 255)


# ---------------------------------------------------------------- building folders


def _color(label: int, k: int) -> tuple[int, int, int]:
    """A colour per (class, image) far enough from the others to identify each image after JPEG."""
    return 30 + 70 * label, 40 + 40 * k, 220 - 40 * k


def _save(path: Path, color, mode: str = "RGB", fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (SIDE, SIDE), color).save(path, format=fmt, quality=95)


def _noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _junk(path: Path, size: int = 300) -> None:
    """Bytes no decoder accepts: read by mistake, they would fail validation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())


def _truncated(path: Path) -> None:
    _noise(path, 7)
    path.write_bytes(path.read_bytes()[:-200])


def _plain(root: Path, train: int, val: int, wnids=WNIDS[:2]) -> Path:
    """Class folders of uniformly coloured JPEGs."""
    for label, wnid in enumerate(wnids):
        for k in range(train):
            _save(root / "train" / wnid / f"img{k}.JPEG", _color(label, k))
        for k in range(val):
            _save(root / "val" / wnid / f"img{k}.JPEG", _color(label, k))
    return root


def _awkward_tree(root: Path) -> dict[str, list[tuple[int, tuple]]]:
    """Class folders with CMYK, grey, PNG-as-JPEG and RGBA images, dotfiles and non-images.

    Returns split -> [(label, color)] in the order prepare must write them.
    """
    expected: dict[str, list] = {"train": [], "val": []}
    for label, wnid in enumerate(WNIDS):
        files = {f"img{k}.JPEG": _color(label, k) for k in range(3)}
        for name, color in files.items():
            _save(root / "train" / wnid / name, color)
        if label == 1:
            folder = root / "train" / wnid
            _save(folder / "cmyk.JPEG", (0, 255, 255, 0), mode="CMYK")
            _save(folder / "grey.JPEG", 128, mode="L")
            _save(folder / "png_inside.JPEG", GREEN, fmt="PNG")
            _save(folder / "rgba.png", (0, 0, 255, 128), mode="RGBA", fmt="PNG")
            files.update({"cmyk.JPEG": RED, "grey.JPEG": GREY, "png_inside.JPEG": GREEN, "rgba.png": BLUE})
            _junk(folder / ".DS_Store")
            (folder / "notes.txt").write_text("not an image\n")
        expected["train"] += [(label, files[name]) for name in sorted(files)]
        if label != 1:  # val need not hold every class
            for k in range(2):
                _save(root / "val" / wnid / f"img{k}.JPEG", _color(label, k))
                expected["val"].append((label, _color(label, k)))
    _junk(root / "train" / WNIDS[2] / "._img0.JPEG")  # macOS resource fork
    _junk(root / "train" / ".cache" / "x.JPEG")  # hidden folder, not a class
    _junk(root / "val" / ".DS_Store")
    (root / "train" / "README.txt").write_text("ignored\n")
    return expected


# ---------------------------------------------------------------- running the stage


def _params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def _sets(data: Path, source: Path | None, *extra: str) -> list[str]:
    return [f"paths.data={data}", f"data.imagenet_dir={'null' if source is None else source}", *extra]


def _load(tmp_path: Path, data: Path, source: Path | None, *extra: str) -> dict:
    return params_mod.load(_params_file(tmp_path), _sets(data, source, *extra))


def _argv(tmp_path: Path, data: Path, source: Path | None, *extra: str) -> list[str]:
    argv = ["--params", str(_params_file(tmp_path))]
    for assignment in _sets(data, source, *extra):
        argv += ["--set", assignment]
    return argv


def _fails(capsys, argv: list[str]) -> str:
    """Run `main`, require a non-zero exit, return its error message."""
    assert prep.main(argv) != 0
    return capsys.readouterr().err


def _manifest(betons: Path) -> dict:
    return json.loads((betons / "manifest.json").read_text())


def _labels(beton: Path) -> list[int]:
    from ffcv.reader import Reader

    return Reader(str(beton)).metadata["f1"].tolist()


def _read_back(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of a beton, in file order, through ffcv's Loader on the CPU."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(
        str(beton), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    batches = [(images.numpy(), labels.numpy().reshape(-1)) for images, labels in loader]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """The awkward tree prepared with the default settings (proportion, 2 workers), read back once."""
    tmp = tmp_path_factory.mktemp("awkward")
    expected = _awkward_tree(tmp / "imagenet")
    betons = prep.prepare(_load(tmp, tmp / "data", tmp / "imagenet"))
    decoded = {split: _read_back(betons / f"{split}.beton") for split in prep.SPLITS}
    return betons, expected, decoded


@pytest.fixture(scope="module")
def noise_source(tmp_path_factory) -> Path:
    """Enough noisy images for two ffcv chunks (>100) in train, so worker races would show."""
    root = tmp_path_factory.mktemp("noise") / "imagenet"
    for label, wnid in enumerate(WNIDS[:2]):
        for k in range(60):
            _noise(root / "train" / wnid / f"{wnid}_{k}.JPEG", 1000 * label + k)
        _noise(root / "val" / wnid / "v0.JPEG", 99 + label)
    return root


# ---------------------------------------------------------------- round trip and awkward files


def test_round_trip_labels_pixels_and_order(awkward):
    _, expected, decoded = awkward
    for split in prep.SPLITS:
        images, labels = decoded[split]
        assert labels.tolist() == [label for label, _ in expected[split]]
        assert images.shape == (len(expected[split]), SIDE, SIDE, 3) and images.dtype == np.uint8
        means = images.reshape(len(images), -1, 3).mean(axis=1)
        np.testing.assert_allclose(means, [color for _, color in expected[split]], atol=8)


def test_awkward_images_become_rgb_with_their_color(awkward):
    _, expected, decoded = awkward
    images, _ = decoded["train"]
    means = images.reshape(len(images), -1, 3).mean(axis=1)
    for color in (RED, GREY, GREEN, BLUE):  # CMYK, L, PNG named .JPEG, RGBA
        index = [c for _, c in expected["train"]].index(color)
        assert np.abs(means[index] - color).max() < 8, (color, means[index])


def test_classes_json_and_manifest(awkward):
    betons, expected, _ = awkward
    assert json.loads((betons / "classes.json").read_text()) == {"wnids": WNIDS, "names": [None] * 3}
    manifest = _manifest(betons)
    # the dotfiles, hidden folder and .txt files were not counted (nor read: they are junk bytes)
    assert manifest["splits"]["train"]["images"] == len(expected["train"]) == 13
    assert manifest["splits"]["train"]["per_class"] == {WNIDS[0]: 3, WNIDS[1]: 7, WNIDS[2]: 3}
    assert manifest["splits"]["val"]["per_class"] == {WNIDS[0]: 2, WNIDS[1]: 0, WNIDS[2]: 2}
    assert manifest["sha256"] == {name: prep.sha256(betons / name) for name in prep.OUTPUTS}
    defaults = params_mod.load(ROOT / "params.yaml")
    assert manifest["settings"] == {**defaults["prepare"], "on_corrupt": "error"}
    assert manifest["skipped"] == []
    assert 0 < manifest["splits"]["train"]["jpeg_encoded"] < 13  # proportion mode mixes both
    assert sorted(p.name for p in betons.iterdir()) == sorted(prep.OUTPUTS + (prep.MANIFEST,))


# ---------------------------------------------------------------- layouts


def test_flat_val_labelled_by_loc_val_solution(tmp_path):
    root = tmp_path / "imagenet"
    for label, wnid in enumerate(WNIDS[:2]):
        _save(root / "train" / wnid / "a.JPEG", _color(label, 0))
    val = {"ILSVRC2012_val_00000003": WNIDS[0], "ILSVRC2012_val_00000001": WNIDS[1],
           "ILSVRC2012_val_00000002": WNIDS[0]}
    for image_id in val:
        _save(root / "val" / f"{image_id}.JPEG", GREY)
    rows = [f"{i},{w} 1 2 30 40 {w} 5 6 20 20" for i, w in val.items()]
    rows.append(f"ILSVRC2012_val_00000009,{WNIDS[1]} 1 2 3 4")  # listed but absent: fine
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")

    betons = prep.prepare(_load(tmp_path, tmp_path / "data", root))
    # ordered as if sorted into val/<wnid>/ folders: class, then name (_02, _03 | _01)
    assert _labels(betons / "val.beton") == [0, 0, 1]
    assert _manifest(betons)["splits"]["val"]["per_class"] == {WNIDS[0]: 2, WNIDS[1]: 1}


def test_kaggle_layout_finds_csv_and_names_above_cls_loc(tmp_path):
    kaggle = tmp_path / "kaggle"
    root = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    _save(root / "train" / WNIDS[1] / "a.JPEG", GREY)
    _save(root / "train" / WNIDS[0] / "a.JPEG", GREY)
    _save(root / "val" / "ILSVRC2012_val_00000001.JPEG", GREY)
    (kaggle / "LOC_val_solution.csv").write_text(
        f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[1]} 1 1 9 9\n")
    (kaggle / "LOC_synset_mapping.txt").write_text(f"{WNIDS[0]} tench, Tinca tinca\n{WNIDS[1]} goldfish\n")
    scan = prep.scan_imagenet(root)
    assert scan.wnids == WNIDS[:2] and scan.names == ["tench, Tinca tinca", "goldfish"]
    assert [(i.path.name, i.label) for i in scan.val] == [("ILSVRC2012_val_00000001.JPEG", 1)]
    assert scan.label_files == [kaggle.resolve() / "LOC_val_solution.csv"]


def test_embedded_dataset_is_the_default_source(tmp_path):
    data = tmp_path / "data"
    _plain(data / "synthetic" / "imagenet", train=2, val=1)
    betons = prep.prepare(_load(tmp_path, data, None))
    assert betons == data / "betons"
    assert _manifest(betons)["source"] == str(data / "synthetic" / "imagenet")
    assert _labels(betons / "train.beton") == [0, 0, 1, 1]


def _empty_class(root: Path) -> str:
    _plain(root, train=1, val=1)
    (root / "train" / "n00000009").mkdir()
    _junk(root / "train" / "n00000009" / ".DS_Store")
    return str(root / "train" / "n00000009")


def _missing_train(root: Path) -> str:
    _save(root / "val" / WNIDS[0] / "a.JPEG", GREY)
    return str(root / "train")


def _missing_val(root: Path) -> str:
    _save(root / "train" / WNIDS[0] / "a.JPEG", GREY)
    return str(root / "val")


def _val_class_not_in_train(root: Path) -> str:
    _plain(root, train=1, val=1)
    _save(root / "val" / "n00000042" / "a.JPEG", GREY)
    return "n00000042"


def _flat_val_without_csv(root: Path) -> str:
    _save(root / "train" / WNIDS[0] / "a.JPEG", GREY)
    _save(root / "val" / "ILSVRC2012_val_00000001.JPEG", GREY)
    return "LOC_val_solution.csv"


def _flat_val_image_not_in_csv(root: Path) -> str:
    _save(root / "train" / WNIDS[0] / "a.JPEG", GREY)
    _save(root / "val" / "ILSVRC2012_val_00000001.JPEG", GREY)
    _save(root / "val" / "ILSVRC2012_val_00000002.JPEG", GREY)
    (root / "LOC_val_solution.csv").write_text(
        f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[0]} 1 1 2 2\n")
    return str(root / "val" / "ILSVRC2012_val_00000002.JPEG")


@pytest.mark.parametrize("make, advice", [
    (_empty_class, "add the images or remove the folder"),
    (_missing_train, "missing train/ folder"),
    (_missing_val, "missing val/ folder"),
    (_val_class_not_in_train, "have no folder in"),
    (_flat_val_without_csv, "sort the images into val/<wnid>/"),
    (_flat_val_image_not_in_csv, "add their rows or remove the images"),
])
def test_layout_errors_name_the_path_and_the_fix(tmp_path, capsys, make, advice):
    root = tmp_path / "imagenet"
    root.mkdir()
    named = make(root)
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", root))
    assert named in err and advice in err
    assert not (tmp_path / "data" / "betons").exists()


def test_missing_source_folder_says_what_to_do(tmp_path, capsys):
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", None))
    assert str(tmp_path / "data" / "synthetic" / "imagenet") in err
    assert "python -m pipeline_src.synthetic" in err
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", tmp_path / "nowhere"))
    assert f"data.imagenet_dir = {tmp_path / 'nowhere'}: no such folder" in err


# ---------------------------------------------------------------- broken files


def _broken_tree(root: Path) -> dict[str, str]:
    """Good images plus three broken ones; returns path -> a word of the expected reason."""
    _plain(root, train=2, val=1)
    bad = {root / "train" / WNIDS[0] / "trunc.JPEG": "truncated",
           root / "train" / WNIDS[1] / "zero.JPEG": "0 bytes",
           root / "val" / WNIDS[1] / "junk.JPEG": "cannot identify"}
    _truncated(next(iter(bad)))
    list(bad)[1].write_bytes(b"")
    _junk(list(bad)[2])
    return {str(p): why for p, why in bad.items()}


def test_every_broken_file_is_listed_in_one_error(tmp_path, capsys):
    bad = _broken_tree(tmp_path / "imagenet")
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", tmp_path / "imagenet"))
    assert "3 unreadable image file(s)" in err and "data.on_corrupt=skip" in err
    lines = err.splitlines()
    for path, why in bad.items():
        assert any(path in line and why in line for line in lines), (path, why, err)
    assert not (tmp_path / "data" / "betons").exists()  # validated before anything was written


def test_on_corrupt_skip_leaves_them_out_and_lists_them(tmp_path):
    root = tmp_path / "imagenet"
    bad = _broken_tree(root)
    betons = prep.prepare(_load(tmp_path, tmp_path / "data", root, "data.on_corrupt=skip"))
    manifest = _manifest(betons)
    listed = {str(root / s["file"]): s["reason"] for s in manifest["skipped"]}
    assert listed.keys() == bad.keys()
    assert all(why in listed[path] for path, why in bad.items())
    assert _labels(betons / "train.beton") == [0, 0, 1, 1]
    assert _labels(betons / "val.beton") == [0, 1]


def test_skip_that_empties_a_class_is_an_error(tmp_path, capsys):
    root = _plain(tmp_path / "imagenet", train=1, val=1)
    (root / "train" / WNIDS[1] / "img0.JPEG").write_bytes(b"")
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", root, "data.on_corrupt=skip"))
    assert WNIDS[1] in err and "no readable images left" in err


@pytest.mark.timeout(120)
def test_failure_while_writing_is_an_error_not_a_hang(tmp_path):
    """ffcv's writer waits forever if its worker dies; a file broken after validation must not do that."""
    good, bad = tmp_path / "good.JPEG", tmp_path / "bad.JPEG"
    _save(good, GREY)
    _junk(bad)
    settings = params_mod.load(ROOT / "params.yaml")["prepare"]
    with pytest.raises(prep.PrepareError, match="bad.JPEG: writing failed"):
        items = [prep.Item(good, 0), prep.Item(bad, 1), prep.Item(good, 0)]
        prep.write_beton(tmp_path / "x.beton", items, settings)


# ---------------------------------------------------------------- reproducibility and re-runs


def _beton_digests(betons: Path) -> dict[str, str]:
    return {name: prep.sha256(betons / name) for name in ("train.beton", "val.beton")}


def _encode(field, image: np.ndarray) -> tuple[int, bytes]:
    """(ffcv's image mode, stored bytes) of one image through `field.encode`, as ffcv's writer calls it."""
    destination = np.zeros(1, field.metadata_type)[0]
    stored = []

    def malloc(size: int):
        stored.append(np.zeros(size, np.uint8))
        return 0, stored[-1]

    field.encode(destination, image, malloc)
    return int(destination["mode"]), stored[0].tobytes()


def _restart_interval(jpeg: bytes) -> int:
    """The DRI segment's interval in MCUs (0: none), read from the markers before the scan."""
    i = 2
    while jpeg[i + 1] != 0xDA:
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if jpeg[i + 1] == 0xDD:
            return int.from_bytes(jpeg[i + 4:i + 6], "big")
        i += 2 + length
    return 0


def test_jpegs_carry_restart_markers_and_the_same_pixels_and_draws():
    """prepare.jpeg_restart_interval: the JPEGs say it (0: none, ffcv's own encoder) and decode to the
    same pixels; raw images, and the JPEG-or-raw draw of 'proportion', are ffcv's."""
    import cv2

    settings = {**params_mod.load(ROOT / "params.yaml")["prepare"], "max_resolution": 64}
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)
    jpegs = {}
    for interval in (0, 1, 3):
        field = prep.image_field({**settings, "write_mode": "jpg", "jpeg_restart_interval": interval})
        mode, jpegs[interval] = _encode(field, image)
        assert mode == 0 and _restart_interval(jpegs[interval]) == interval
    assert len(jpegs[1]) > len(jpegs[3]) > len(jpegs[0])  # two bytes or so a marker
    pixels = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs.values()]
    assert all(np.array_equal(p, pixels[0]) for p in pixels)
    raw = [_encode(prep.image_field({**settings, "write_mode": "raw", "jpeg_restart_interval": i}), image)
           for i in (0, 1)]
    assert raw[0] == raw[1] and raw[0][0] == 1 and len(raw[0][1]) == 45 * 64 * 3  # resized to max_resolution
    draws = {}
    for interval in (0, 1):
        field = prep.image_field({**settings, "write_mode": "proportion", "compress_probability": 0.5,
                                  "jpeg_restart_interval": interval})
        np.random.seed(7)
        draws[interval] = [_encode(field, image)[0] for _ in range(20)]
    assert draws[0] == draws[1] and 0 < sum(draws[0]) < 20


@pytest.mark.parametrize("mode", ["raw", "jpg", "proportion"])
def test_two_prepares_are_byte_identical(tmp_path, noise_source, mode):
    def run(folder: str, workers: int = 2, seed: int = 0) -> Path:
        return prep.prepare(_load(tmp_path, tmp_path / folder, noise_source, f"prepare.write_mode={mode}",
                                  "prepare.compress_probability=0.5", f"prepare.num_workers={workers}",
                                  f"prepare.seed={seed}"))

    first, second = run("a"), run("b")
    assert _beton_digests(first) == _beton_digests(second)
    # data in sample order: the layout does not depend on which process wrote what first
    from ffcv.reader import Reader

    assert np.all(np.diff(Reader(str(first / "train.beton")).metadata["f0"]["data_ptr"].astype(np.int64)) > 0)
    jpeg = _manifest(first)["splits"]["train"]["jpeg_encoded"]
    if mode != "proportion":
        assert jpeg == (120 if mode == "jpg" else 0)
        return
    assert 30 < jpeg < 90
    assert _beton_digests(run("one-worker", workers=1)) == _beton_digests(first)
    assert _beton_digests(run("seed-1", seed=1))["train.beton"] != _beton_digests(first)["train.beton"]


def test_rerun_is_skipped_unless_settings_or_outputs_changed(tmp_path, capsys):
    root = _plain(tmp_path / "imagenet", train=2, val=1)
    params = _load(tmp_path, tmp_path / "data", root)
    betons = prep.prepare(params)
    stamps = {p.name: p.stat().st_mtime_ns for p in betons.iterdir()}
    capsys.readouterr()

    assert prep.prepare(params) == betons
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in betons.iterdir()} == stamps

    with open(betons / "val.beton", "ab") as fh:  # damaged output: written again
        fh.write(b"\0")
    prep.prepare(params)
    assert "up to date" not in capsys.readouterr().out
    assert _manifest(betons)["sha256"]["val.beton"] == prep.sha256(betons / "val.beton")

    prep.prepare(_load(tmp_path, tmp_path / "data", root, "prepare.jpeg_quality=50"))
    assert "up to date" not in capsys.readouterr().out
    assert _manifest(betons)["settings"]["jpeg_quality"] == 50


def _shared_memory_of(pid: int) -> list[Path]:
    """The POSIX shared memory a process maps (ffcv's writer metadata); SIGKILL leaves it behind."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({Path(line.split()[-1]) for line in maps if line.split()[-1].startswith("/dev/shm/psm_")})


def test_killed_prepare_leaves_nothing_done_and_rerun_completes(tmp_path, noise_source):
    data = tmp_path / "data"
    betons = data / "betons"
    argv = _argv(tmp_path, data, noise_source)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_src.prepare", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(p.stat().st_size > 0 for p in betons.glob(".train.beton.*.tmp")):
            assert proc.poll() is None, "prepare ended before it was killed"
            assert time.monotonic() < deadline, "prepare never started writing train.beton"
            time.sleep(0.01)
        leaked = _shared_memory_of(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and the writer processes it started
        proc.wait()
    assert leaked, "ffcv's writer was not running when prepare was killed"
    for segment in leaked:
        segment.unlink()
    assert not (betons / "manifest.json").exists()
    assert not any((betons / name).exists() for name in prep.OUTPUTS)

    prep.prepare(_load(tmp_path, data, noise_source))
    manifest = _manifest(betons)
    assert manifest["splits"]["train"]["images"] == len(_labels(betons / "train.beton")) == 120
    assert sorted(p.name for p in betons.iterdir()) == sorted(prep.OUTPUTS + (prep.MANIFEST,))


# ---------------------------------------------------------------- faults: disk full, locks, swaps


def _no_temp_files(betons: Path) -> bool:
    return not betons.exists() or not [p.name for p in betons.iterdir() if p.name.endswith(".tmp")]


def test_disk_too_small_is_refused_before_writing(tmp_path, capsys, small_disk):
    """2 MB cannot hold a beton (ffcv writes whole 8 MB pages): a clear error, and nothing left behind."""
    root = _plain(tmp_path / "imagenet", train=2, val=1)
    err = _fails(capsys, _argv(tmp_path, small_disk, root))
    assert f"no space left on {small_disk / 'betons'}" in err and "needs about 16.0 MB, have" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (small_disk / "betons").iterdir()) == []


@pytest.mark.timeout(60)
def test_disk_full_while_writing_fails_fast_not_a_hang(tmp_path, monkeypatch):
    """ENOSPC in ffcv's writer process used to leave prepare waiting forever."""
    from ffcv.memory_allocator import MemoryAllocator

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "flush_page", full)  # inherited by the forked writer
    monkeypatch.setattr(prep, "free_bytes", lambda folder: 3 * 2**20)
    root = _plain(tmp_path / "imagenet", train=2, val=1)
    start = time.monotonic()
    with pytest.raises(prep.DiskFullError, match=r"no space left on .*betons: writing train.beton stopped"):
        prep.prepare(_load(tmp_path, tmp_path / "data", root))
    assert time.monotonic() - start < 30
    assert _no_temp_files(tmp_path / "data" / "betons")
    assert not (tmp_path / "data" / "betons" / "manifest.json").exists()


def test_failed_re_prepare_keeps_the_previous_set(tmp_path, monkeypatch):
    from ffcv.memory_allocator import MemoryAllocator

    root = _plain(tmp_path / "imagenet", train=2, val=1)
    params = _load(tmp_path, tmp_path / "data", root)
    betons = prep.prepare(params)
    before = {name: prep.sha256(betons / name) for name in prep.OUTPUTS}

    def crash(self):
        raise RuntimeError("writer crashed")

    monkeypatch.setattr(MemoryAllocator, "flush_page", crash)
    with pytest.raises(prep.PrepareError, match="writer process exited with status 1"):
        prep.prepare(_load(tmp_path, tmp_path / "data", root, "prepare.jpeg_quality=50"))
    assert {name: prep.sha256(betons / name) for name in prep.OUTPUTS} == before
    assert prep.is_prepared(betons, {k: _manifest(betons)[k] for k in ("source", "inputs", "settings")})
    assert _manifest(betons)["settings"]["jpeg_quality"] != 50
    assert _no_temp_files(betons)


def test_second_prepare_into_one_data_dir_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    root = _plain(tmp_path / "imagenet", train=2, val=1)
    betons = tmp_path / "data" / "betons"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline_src.locks import dir_lock\n"
         f"with dir_lock({str(betons)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _fails(capsys, _argv(tmp_path, tmp_path / "data", root))
        assert f"{betons} is in use by pid {holder.pid}" in err
        assert prep.main(_argv(tmp_path, tmp_path / "data", root)) == 2
    finally:
        holder.kill()
        holder.wait()
    assert (betons / ".lock").read_text().split()[0] == str(holder.pid)  # SIGKILL left it behind
    assert prep.main(_argv(tmp_path, tmp_path / "data", root)) == 0
    assert not (betons / ".lock").exists()


# ---------------------------------------------------------------- image modes and odd entries


@pytest.mark.parametrize("mode, fill, fmt, expected", [
    ("1", 1, "PNG", (255, 255, 255)),
    ("L", 100, "PNG", (100, 100, 100)),
    ("LA", (100, 7), "PNG", (100, 100, 100)),
    ("P", 3, "PNG", None),  # palette entry 3 of PIL's default palette
    ("PA", (3, 7), "TIFF", None),
    ("RGB", (10, 20, 30), "PNG", (10, 20, 30)),
    ("RGBA", (10, 20, 30, 40), "PNG", (10, 20, 30)),
    ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
    ("I;16", 40000, "PNG", (156, 156, 156)),  # 40000 / 65535 of white, not clipped to 255
])
def test_every_pil_mode_becomes_the_right_8_bit_rgb(tmp_path, mode, fill, fmt, expected):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (SIDE, SIDE), fill).save(path, format=fmt)
    assert prep.inspect_image(path, 64) == (None, (SIDE, SIDE))
    if expected is None:  # palette modes: PIL's own palette lookup, alpha dropped
        expected = Image.new(mode, (1, 1), fill).convert("RGB").getpixel((0, 0))
    rgb = prep.load_rgb(path, 64)
    assert rgb.dtype == np.uint8 and rgb.shape == (SIDE, SIDE, 3)
    assert np.all(rgb == np.array(expected, np.uint8))


def test_sixteen_bit_gradient_keeps_its_range(tmp_path):
    path = tmp_path / "grad.png"
    Image.fromarray(np.linspace(0, 65535, SIDE * SIDE).astype(np.uint16).reshape(SIDE, SIDE)).save(path)
    assert Image.open(path).mode == "I;16"
    grey = prep.load_rgb(path, 64)[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255 and 120 < grey.mean() < 135


@pytest.mark.parametrize("mode, fill, name", [("I", 40000, "32-bit integer"), ("F", 0.5, "32-bit float")])
def test_32_bit_modes_are_refused_by_name(tmp_path, mode, fill, name):
    path = tmp_path / "img.tif"
    Image.new(mode, (SIDE, SIDE), fill).save(path, format="TIFF")
    why, _ = prep.inspect_image(path, 64)
    assert f"unsupported image mode {mode} ({name})" in why


def test_broken_links_and_folders_named_like_images_are_listed(tmp_path, capsys):
    root = _plain(tmp_path / "imagenet", train=2, val=1)
    folder = root / "train" / WNIDS[0]
    (folder / "broken.JPEG").symlink_to(folder / "nowhere.JPEG")
    (folder / "loop.JPEG").symlink_to(folder / "loop.JPEG")
    _save(folder / "album.JPEG" / "inside.JPEG", GREY)
    err = _fails(capsys, _argv(tmp_path, tmp_path / "data", root))
    assert "2 unreadable image file(s)" in err and "broken symlink" in err and "symlink loop" in err

    betons = prep.prepare(_load(tmp_path, tmp_path / "data", root, "data.on_corrupt=skip"))
    skipped = {s["file"]: s["reason"] for s in _manifest(betons)["skipped"]}
    prefix = f"train/{WNIDS[0]}/"
    assert skipped[prefix + "broken.JPEG"].startswith("broken symlink")
    assert skipped[prefix + "loop.JPEG"] == "symlink loop"
    assert skipped[prefix + "album.JPEG"].startswith("a folder, not an image file")
    assert _labels(betons / "train.beton") == [0, 0, 0, 1, 1]  # album.JPEG/inside.JPEG is an image of class 0


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    progress = prep.Progress("train.beton", 100, every_s=0.0, stream=log)
    progress.update(50)
    progress.update(100, final=True)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("prepare: train.beton: 50/100 images,") and "images/s, ETA" in lines[0]
    assert lines[1].startswith("prepare: train.beton: 100 images in") and lines[1].endswith("images/s")
    tty = Terminal()
    bar = prep.Progress("val.beton", 10, stream=tty)
    bar.update(10, final=True)
    assert tty.getvalue().startswith("\r[########################] prepare: val.beton: 10 images")
