"""Checkpoints resume training exactly, load weights_only, refuse pickles and survive failed saves."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_src import checkpoint as ckpt
from pipeline_src.checkpoint import CheckpointError
from pipeline_src.io import DiskFullError


class Evil:
    """A custom object: unpickling a file holding one could run arbitrary code."""


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    mix = torch.Generator().manual_seed(123)
    return model, opt, sched, scaler, mix


def _step(model, opt, sched, scaler, mix) -> list[float]:
    """One training step drawing from every RNG stream; returns the numbers it drew."""
    x = torch.randn(2, 3, 6, 6)
    y = torch.randint(0, 3, (2,))
    lam = torch.rand(1, generator=mix).item()
    jitter = float(np.random.rand()) + random.random()
    loss = nn.functional.cross_entropy(model(x * lam + jitter), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return [x.sum().item(), float(y.sum()), lam, jitter, loss.item()]


def _state(model, opt, sched, scaler, mix, epoch: int, step: int) -> dict:
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
        "scheduler": sched.state_dict(), "epoch": epoch, "global_step": step,
        "rng": ckpt.capture_rng_state({"mixup": mix}),
    }


def test_round_trip_resumes_exactly(tmp_path):
    parts = _setup()
    for _ in range(3):
        _step(*parts)
    path = tmp_path / "run" / ckpt.LAST_NAME
    ckpt.save_checkpoint(path, _state(*parts, epoch=2, step=3))
    expected_draws = [_step(*parts) for _ in range(3)]
    expected_params = [p.detach().clone() for p in parts[0].parameters()]

    # A fresh process-like start: different init, different RNG positions.
    model, opt, sched, scaler, mix = _setup(seed=99)
    torch.rand(7)
    np.random.rand(7)
    random.random()
    state = ckpt.load_checkpoint(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"], {"mixup": mix})
    assert (state["epoch"], state["global_step"]) == (2, 3)
    assert sched.last_epoch == 3
    saved_momentum = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(buf is not None and buf.abs().sum() > 0 for buf in saved_momentum)

    draws = [_step(model, opt, sched, scaler, mix) for _ in range(3)]
    assert draws == expected_draws
    for got, want in zip(model.parameters(), expected_params):
        assert torch.equal(got, want)


def test_rng_streams_each_restored(tmp_path):
    mix = torch.Generator().manual_seed(5)
    state = ckpt.capture_rng_state({"mixup": mix})
    path = tmp_path / "rng.pt"
    ckpt.save_checkpoint(path, {"model": {}, "optimizer": {}, "scaler": {}, "scheduler": {},
                                "epoch": 0, "global_step": 0, "rng": state})
    after_save = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
                  torch.rand(4, generator=mix), np.random.randn(3), random.gauss(0, 1))
    ckpt.restore_rng_state(ckpt.load_checkpoint(path)["rng"], {"mixup": mix})
    after_restore = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
                     torch.rand(4, generator=mix), np.random.randn(3), random.gauss(0, 1))
    assert torch.equal(after_save[0], after_restore[0])
    assert np.array_equal(after_save[1], after_restore[1])
    assert after_save[2] == after_restore[2]
    assert torch.equal(after_save[3], after_restore[3])
    assert np.array_equal(after_save[4], after_restore[4])
    assert after_save[5] == after_restore[5]


def test_checkpoint_loads_with_plain_weights_only(tmp_path):
    path = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(path, _state(*_setup(), epoch=0, step=0))
    raw = torch.load(path, weights_only=True)
    assert set(ckpt.STATE_KEYS) <= set(raw)
    assert isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)
    assert isinstance(raw["rng"]["python"]["internal"], list)


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "Evil" in msg
    assert "weights_only=True" in msg and "convert" in msg


def test_truncated_and_empty_files_are_reported(tmp_path):
    path = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(path, _state(*_setup(), epoch=0, step=0))
    data = path.read_bytes()
    for size in (0, 10, len(data) // 2, len(data) - 8):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            ckpt.load_checkpoint(path)
        assert str(path) in str(err.value)


def test_unsavable_state_is_refused_before_writing(tmp_path):
    path = tmp_path / ckpt.LAST_NAME
    state = _state(*_setup(), epoch=0, step=0)
    state["extra"] = {"stats": np.zeros(3)}
    with pytest.raises(CheckpointError, match=r"\['extra'\]\['stats'\].*numpy.ndarray"):
        ckpt.save_checkpoint(path, state)
    assert not path.exists()
    with pytest.raises(CheckpointError, match="lacks key.*'rng'"):
        ckpt.save_checkpoint(path, {k: v for k, v in state.items() if k != "rng"})


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(path, _state(*_setup(), epoch=1, step=10))
    before = path.read_bytes()

    def half_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _state(*_setup(), epoch=2, step=20))
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.LAST_NAME]


def test_latest_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    ckpt.save_checkpoint(tmp_path / ckpt.LAST_NAME, _state(*_setup(), epoch=0, step=0))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.LAST_NAME


def test_final_model_round_trip_and_validation(tmp_path):
    model = _setup()[0]
    meta = {"model": {"arch": "resnet", "depth": 26, "variant": "D", "width": 0.25},
            "num_classes": 3, "wnids": ["n01", "n02", "n03"], "run": "baseline", "seed": 0}
    path = tmp_path / ckpt.FINAL_NAME
    ckpt.save_final_model(path, model.state_dict(), meta)
    state_dict, got_meta = ckpt.load_model_weights(path)
    assert got_meta == meta
    fresh = _setup(seed=7)[0]
    fresh.load_state_dict(state_dict)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(CheckpointError, match="num_classes.*3.*2 classes"):
        ckpt.save_final_model(path, model.state_dict(), {**meta, "wnids": ["n01", "n02"]})
    with pytest.raises(CheckpointError, match=r"lacks key\(s\) \['wnids'\]"):
        ckpt.save_final_model(path, model.state_dict(), {"model": {}, "num_classes": 3})

    last = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(last, _state(*_setup(), epoch=0, step=0))
    with pytest.raises(CheckpointError, match="not a final model.*load_checkpoint"):
        ckpt.load_model_weights(last)
    with pytest.raises(CheckpointError, match="not a training checkpoint.*load_model_weights"):
        ckpt.load_checkpoint(path)

    torch.save({"state_dict": model.state_dict(), "meta": {"model": {}, "num_classes": 3}}, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*lacks key\(s\) \['wnids'\]"):
        ckpt.load_model_weights(path)


def test_missing_file_and_generator_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    state = ckpt.capture_rng_state({"mixup": torch.Generator()})
    with pytest.raises(CheckpointError, match=r"\['mixup'\].*\[\]"):
        ckpt.restore_rng_state(state, {})


def _big_state(megabytes: float) -> dict:
    model, opt, sched, scaler, mix = _setup()
    state = _state(model, opt, sched, scaler, mix, epoch=0, step=0)
    state["model"] = {"w": torch.zeros(int(megabytes * 2**20) // 4)}
    return state


def test_disk_full_save_names_the_file_and_the_space_it_needs(small_disk):
    """A 2 MB disk holds one 1.2 MB checkpoint, not a second beside it: refused before writing."""
    path = small_disk / ckpt.LAST_NAME
    ckpt.save_checkpoint(path, _big_state(1.2))
    before = path.read_bytes()
    with pytest.raises(DiskFullError) as err:
        ckpt.save_checkpoint(path, _big_state(1.2))
    msg = str(err.value)
    assert f"no space left on {small_disk}" in msg and str(path) in msg
    assert "needs about 1.2 MB" in msg and "twice its size" in msg
    assert path.read_bytes() == before
    assert [p.name for p in small_disk.iterdir()] == [ckpt.LAST_NAME]


def test_disk_full_during_write_is_named_not_an_iostream_error(tmp_path, monkeypatch):
    """torch reports ENOSPC mid-write as `basic_ios::clear: iostream error`, naming no file."""
    import shutil

    def fails(obj, f, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    real = shutil.disk_usage
    usage = {"free": 10 * 2**20}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=usage["free"]))
    monkeypatch.setattr(torch, "save", fails)
    path = tmp_path / ckpt.LAST_NAME
    usage["free"] = int(1.5 * 2**20)  # passes the estimate (1.2 MB of tensors), too little for the file
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path}.*{ckpt.LAST_NAME}"):
        ckpt.save_checkpoint(path, _big_state(1.2))
    usage["free"] = 100 * 2**20  # a different failure keeps its own message
    with pytest.raises(RuntimeError, match="iostream error"):
        ckpt.save_checkpoint(path, _big_state(1.2))
    assert list(tmp_path.iterdir()) == []


def test_code_in_a_checkpoint_is_refused_as_code_not_as_corruption(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path)
    msg = str(err.value)
    assert "truncated or corrupt" not in msg
    assert "system" in msg and "refuses to run" in msg and "weights_only=True" in msg
