"""The training stage end to end on the micro profile: outputs, MLflow, skip, exact resume, NaN, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline_src import params as params_mod
from pipeline_src.checkpoint import load_model_weights
from pipeline_src.io import sha256
from pipeline_src.models import build_model
from pipeline_src.run_folders import run_dir
from pipeline_src.train import main
from pipeline_src.tricks.mixed_precision import hardware

BIN = Path(sys.executable).parent


def _cmd(micro: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline_src.train", "--params", str(micro), "--out", str(out), *extra]


def test_train_writes_outputs_logs_to_mlflow_and_skips_a_finished_run(micro, capsys):
    from mlflow.tracking import MlflowClient

    assert main(["--params", str(micro), "--run", "t4-amp", "--seed", "0"]) == 0
    params = params_mod.load(micro)
    out = run_dir(params, "t4-amp", 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "top5", "val_loss", "train_loss", "images_per_s", "wall_time_s"} <= set(metrics)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["precision"] in ("amp", "fp32") and metrics["machine"] == hardware(torch.device("cpu"))
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history["epochs"]] == [0, 1]
    assert history["tricks"] == ["warmup", "zero_gamma", "no_bias_decay", "amp"]
    assert len(history["logit_gaps"]) == 4 * 8 and history["lr_curve"]
    state, meta = load_model_weights(out / "model.pt")
    assert meta["num_classes"] == 4 and meta["model"]["zero_gamma"] is True
    assert not (out / "last.pt").exists()

    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    [run] = client.search_runs([exp.experiment_id], "tags.run = 't4-amp'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.precision"] == "amp" and run.data.params["model.zero_gamma"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "top1")] == [0, 1]
    manifest = json.loads((Path(params["paths"]["data"]) / "betons" / "manifest.json").read_text())
    assert run.data.tags["sha256_train.beton"] == manifest["sha256"]["train.beton"]
    assert run.data.tags["mlflow.note.content"] == params["runs"]["t4-amp"]["description"]
    assert "runs.baseline.description" not in run.data.params  # its own recipe, not the whole file
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.pt", "model/meta.json"}

    capsys.readouterr()
    assert main(["--params", str(micro), "--run", "t4-amp", "--seed", "0"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_killed_run_resumes_to_bit_identical_weights(micro, tmp_path):
    """SIGKILL mid-training, restart: the final weights equal an uninterrupted run's, bit for bit."""
    args = ("--run", "t6-mixup", "--seed", "3", "--set", "train.epochs=3")
    straight = tmp_path / "straight"
    subprocess.run(_cmd(micro, straight, *args), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    last = killed / "last.pt"
    proc = subprocess.Popen(_cmd(micro, killed, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (last.parent / "model.pt").exists()

    resumed = subprocess.run(_cmd(micro, killed, *args), check=True, capture_output=True, text=True, timeout=300)
    assert "resuming at epoch" in resumed.stdout
    a, _ = load_model_weights(straight / "model.pt")
    b, _ = load_model_weights(killed / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nan_loss_stops_the_run_naming_the_step_and_checkpoint(micro, tmp_path, capsys):
    code = main(["--params", str(micro), "--run", "baseline", "--out", str(tmp_path),
                 "--set", "train.base_lr=1e30"])
    err = capsys.readouterr().err
    assert code == 3
    assert "loss is" in err and "step" in err and "last good checkpoint" in err
    assert not (tmp_path / "metrics.json").exists()


def test_unknown_run_is_a_clear_error(micro, capsys):
    assert main(["--params", str(micro), "--run", "basline"]) == 2
    assert "did you mean 'runs.baseline'" in capsys.readouterr().err


def test_ddp_two_gloo_processes_match_one_process_on_the_same_global_batch(micro, tmp_path):
    """torchrun with 2 CPU processes (gloo, global BatchNorm) ends where 1 process does, within float noise."""
    # Deterministic data: no random crop, flip or colour; sequential order so that the two ranks'
    # shards (DistributedSampler: rank r takes samples r, r+2, ...) make up the single run's batches.
    # Two steps at a small LR: the micro model is chaotic enough that larger steps amplify fp32
    # rounding (a 1e-6 nudge of the init moves the weights by 3e-4 after one step at LR 1e-3), and
    # NCHW because oneDNN's channels_last kernels round differently at different batch sizes.
    same = ["--run", "baseline", "--set", "train.epochs=1", "--set", "train.step_milestones=[]",
            "--set", "train.batch_size=48",
            "--set", "train.base_lr=0.0001", "--set", "train.sync_bn=true",
            "--set", "loader.order=sequential", "--set", "augment.crop_area=[1.0, 1.0]",
            "--set", "augment.crop_ratio=[1.0, 1.0]", "--set", "augment.flip=false",
            "--set", "augment.brightness=0", "--set", "augment.contrast=0", "--set", "augment.saturation=0",
            "--set", "augment.lighting_std=0", "--set", "train.channels_last=false"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(_cmd(micro, single, *same), check=True, capture_output=True, timeout=300)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "pipeline_src.train", "--",
         "--params", str(micro), "--out", str(ddp), *same],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, meta = load_model_weights(single / "model.pt")
    b, _ = load_model_weights(ddp / "model.pt")
    torch.manual_seed(0)
    init = build_model(meta["model"], meta["num_classes"]).state_dict()
    weights = [k for k in a if a[k].is_floating_point() and "running" not in k]
    assert max((a[k] - init[k]).abs().max().item() for k in weights) > 1e-3  # training moved them
    for key in weights:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=key)
    for key in (k for k in a if "running" in k):  # the global batch's BN statistics
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_sanity_overfit_one_batch(micro, capsys):
    from pipeline_src.sanity import main as sanity

    assert sanity(["overfit", "--params", str(micro), "--set", "train.base_lr=0.05"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] and report["last_loss"] <= 0.05 < report["first_loss"]


def test_sanity_lr_range_saves_a_plot_and_suggests_an_lr(micro, capsys):
    from pipeline_src.sanity import main as sanity

    assert sanity(["lr-range", "--params", str(micro)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    params = params_mod.load(micro)
    low, high = params["sanity"]["lr_range"]
    assert low <= report["suggested_lr"] <= high
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    [run] = client.search_runs([exp.experiment_id], "tags.run = 'sanity-lr-range/baseline'")
    assert run.data.metrics["suggested_lr"] == report["suggested_lr"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {Path(report["plot"]).name,
                                                                        Path(report["plot"]).with_suffix(".json").name}


def _short(micro: Path, out: Path, seed: int, *extra: str) -> list[str]:
    return ["--params", str(micro), "--run", "baseline", "--seed", str(seed), "--out", str(out),
            "--set", "train.epochs=1", "--set", "train.step_milestones=[]", *extra]


def test_tracking_outage_loses_no_epoch_and_a_truncated_model_is_trained_again(micro, tmp_path, monkeypatch,
                                                                               capsys):
    from mlflow.exceptions import MlflowException

    from pipeline_src import tracking

    def locked(self, entries):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    out = tmp_path / "seed5"
    with monkeypatch.context() as patch:
        patch.setattr(tracking.Tracker, "_log_entries", locked)
        patch.setattr(tracking, "RETRY_FOR_S", 0.05)
        patch.setattr(tracking, "RETRY_FIRST_WAIT_S", 0.01)
        assert main(_short(micro, out, 5)) == 0
    assert "tracking: warning: logging metrics of step 0 failed" in capsys.readouterr().err
    load_model_weights(out / "model.pt")

    data = (out / "model.pt").read_bytes()
    (out / "model.pt").write_bytes(data[: len(data) // 2])
    assert main(_short(micro, out, 5)) == 0
    assert "already finished" not in capsys.readouterr().out
    load_model_weights(out / "model.pt")
    assert json.loads((out / "metrics.json").read_text())["model_sha256"] == sha256(out / "model.pt")


def test_second_training_of_one_run_and_seed_is_refused(micro, tmp_path, capsys):
    out = tmp_path / "seed6"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pipeline_src.locks import dir_lock\n"
         f"with dir_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_short(micro, out, 6)) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"train: error: {out} is in use by pid {holder.pid}" in capsys.readouterr().err
    assert not (out / "last.pt").exists()


def test_batch_above_the_image_count_is_one_clear_line(micro, tmp_path, capsys):
    assert main(_short(micro, tmp_path, 7, "--set", "train.batch_size=500")) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "key 'train.batch_size' (500) is above the 96 images of" in line and "train.beton" in line


def test_unreadable_metrics_file_is_named(micro, tmp_path, capsys):
    out = tmp_path / "seed8"
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"x")
    (out / "metrics.json").write_bytes(b'{"top1": "\xff\xfe"}')
    assert main(_short(micro, out, 8)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"train: error: {out / 'metrics.json'}: not valid UTF-8 JSON")


def test_corrupt_checkpoint_is_one_line_naming_it(micro, tmp_path, capsys):
    out = tmp_path / "seed9"
    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    assert main(_short(micro, out, 9)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"train: error: {out / 'last.pt'}: cannot be read, the file is truncated or corrupt")


class _Batches:
    """A loader stand-in: fixed batches, one of them poisoned with NaN, counting what was taken."""

    def __init__(self, count: int, nan_at: int | None, classes: int):
        gen = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 3, 24, 24, generator=gen), torch.arange(4) % classes) for _ in range(count)]
        if nan_at is not None:
            self.batches[nan_at][0][0, 0, 0, 0] = float("nan")
        self.taken = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def _one_epoch(tmp_path: Path, loader: _Batches, *sets: str):
    from pipeline_src.engine import build_optimizer
    from pipeline_src.training import build_batch_transform, build_criterion, train_one_epoch
    from pipeline_src.tricks.lr_schedule import build_scheduler
    from tests.conftest import write_micro_params

    params = params_mod.resolve_run(params_mod.load(write_micro_params(tmp_path), list(sets)), "baseline")
    torch.manual_seed(0)
    model = build_model(params["model"], 4)
    optimizer = build_optimizer(model, params["train"], 0.01)
    scheduler = build_scheduler(optimizer, iters_per_epoch=len(loader), epochs=1, warmup_epochs=0,
                                schedule="step", milestones=[1], gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch_transform = build_batch_transform(params["train"], 4, torch.Generator().manual_seed(0))
    return train_one_epoch(model, loader, build_criterion(None, params["distill"]), batch_transform, optimizer,
                           scheduler, scaler, params, torch.device("cpu"), "fp32", 0)


def test_nan_is_caught_within_the_check_window_and_names_its_step(tmp_path):
    """No per-step host sync: a NaN at step 2 surfaces at the next check (step 4 of every 5), named step 2."""
    from pipeline_src.training import NonFiniteLoss

    loader = _Batches(12, nan_at=2, classes=4)
    with pytest.raises(NonFiniteLoss, match=r"epoch 0 step 2 \(checked every 5 steps"):
        _one_epoch(tmp_path, loader, "monitor.finite_check_every=5")
    assert loader.taken == 5
    late = _Batches(12, nan_at=11, classes=4)  # the epoch-end check catches a NaN after the last full window
    with pytest.raises(NonFiniteLoss, match="step 11"):
        _one_epoch(tmp_path, late, "monitor.finite_check_every=5")


def test_progress_lines_every_n_steps_only_when_asked(tmp_path, capsys):
    stats, _ = _one_epoch(tmp_path, _Batches(6, None, 4), "monitor.finite_check_every=2", "monitor.progress=always")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[3] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("images/s ETA" in line for line in lines) and lines[-1].endswith("ETA 0:00")
    assert stats["train_loss"] > 0
    _one_epoch(tmp_path, _Batches(6, None, 4), "monitor.finite_check_every=2")  # auto: stderr is no TTY here
    assert capsys.readouterr().err == ""


def test_global_batchnorm_under_bf16_autocast_matches_batchnorm(tmp_path):
    """The CPU twin of SyncBatchNorm in a 1-process gloo group: fp32 statistics, output in the input's dtype."""
    import torch.distributed as dist

    from pipeline_src.distributed import GlobalBatchNorm2d

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x = (torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(torch.bfloat16)
        plain, synced = torch.nn.BatchNorm2d(4), GlobalBatchNorm2d(4)
        out_plain, out_synced = plain(x), synced(x)
    finally:
        dist.destroy_process_group()
    assert out_synced.dtype == torch.bfloat16
    torch.testing.assert_close(out_synced, out_plain)
    torch.testing.assert_close(synced.running_var, plain.running_var)


def test_sanity_geometry_shows_how_little_of_a_small_input_zero_gamma_resnet_a_sees(micro):
    """At 32 px the paper's stem leaves layer4 at 1x1, and zero gamma leaves only the strided shortcuts."""
    from pipeline_src.sanity import geometry

    reach = {}
    for variant, stride in (("A", 4), ("A", 1), ("D", 4)):
        sets = ["loader.res=32", "model.zero_gamma=true", f"model.variant={variant}", f"model.stem_stride={stride}"]
        params = params_mod.resolve_run(params_mod.load(micro, sets), "baseline")
        result = geometry(params, seed=0)
        reach[variant, stride] = result["input_reach"]
        assert result["stage_sides"]["layer4"] == {4: 1, 1: 4}[stride]
    assert reach["A", 4] < 0.1 < reach["A", 1] < 1.0 == reach["D", 4]
