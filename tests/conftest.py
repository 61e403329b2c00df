"""Shared fixtures: a micro profile of params.yaml and tiny prepared data, made once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The micro profile: the default params.yaml shrunk so that a whole run takes seconds on 2 cores.
MICRO = {
    "synthetic": {"classes": 4, "train_per_class": 24, "val_per_class": 8, "min_size": 32, "max_size": 48,
                  "voc_trainval": 8, "voc_test": 4, "ade_train": 8, "ade_val": 4, "scene_size": [64, 80]},
    "prepare": {"max_resolution": 48, "num_workers": 1},
    "loader": {"num_workers": 1, "res": 24, "val_res": 24},
    "model": {"width": 0.125, "stem_stride": 4},  # the paper's stem: fast, and every code path the same
    "train": {"epochs": 2, "batch_size": 16, "base_batch": 16, "step_milestones": [1], "cpu_amp": "bf16",
              "eval_every": 1},
    "tricks": {"large_batch": {"train.batch_size": 32, "train.linear_scaling": True},
               "warmup": {"train.warmup_epochs": 0.5}, "mixup": {"train.mixup_alpha": 0.2, "train.epochs": 3}},
    "sanity": {"overfit_steps": 60, "lr_range_steps": 12},
    "study": {"seeds": [0], "transfer_seeds": [0]},
}


def write_micro_params(tmp: Path, extra: dict | None = None) -> Path:
    """A complete params file for the micro profile with every path inside `tmp`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    changes = {
        **MICRO,
        "profile": {"name": "micro", "description": "test micro profile"},
        "paths": {"data": str(tmp / "data"), "runs": str(tmp / "data" / "runs"), "reports": str(tmp / "reports")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **(extra or {}),
    }
    for section, values in changes.items():
        raw[section].update(values)
    raw["runs"]["teacher"]["set"] = {"model.width": 0.25}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    """Micro params with the synthetic data generated and prepared into betons (shared, read-only)."""
    from pipeline_src import params as params_mod
    from pipeline_src.prepare import prepare
    from pipeline_src.synthetic import generate_imagenet

    tmp = tmp_path_factory.mktemp("micro")
    path = write_micro_params(tmp)
    params = params_mod.load(path)
    generate_imagenet(Path(params["paths"]["data"]) / "synthetic", params["synthetic"])
    prepare(params)
    return path


# Test files that take minutes, run first: under `make test`'s workers (pytest-xdist, a file per
# worker) they then overlap the many short files instead of running alone at the end.
LONGEST_FIRST = ("test_pipeline_e2e.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


SMALL_DISK_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path, monkeypatch) -> Path:
    """A 2 MB folder: a real tmpfs where this process may mount one (root), else a folder whose
    `shutil.disk_usage` reports 2 MB minus what it holds, so the disk-full checks run either way."""
    import shutil
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        real = shutil.disk_usage

        def fake(path):
            if not Path(path).resolve().is_relative_to(folder.resolve()):
                return real(path)
            used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            return shutil._ntuple_diskusage(SMALL_DISK_BYTES, used, max(SMALL_DISK_BYTES - used, 0))

        monkeypatch.setattr(shutil, "disk_usage", fake)
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
