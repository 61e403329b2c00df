"""The distillation teacher and its students: a frozen teacher, checked imports, an end-to-end run."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline_src import checkpoint, params as params_mod
from pipeline_src.loader import make_val_loader
from pipeline_src.models import build_model
from pipeline_src.run_folders import output_dir
from pipeline_src.teacher import main as teacher_main
from pipeline_src.engine import betons_dir, build_optimizer, evaluate
from pipeline_src.run_folders import run_dir
from pipeline_src.train import main as train_main
from pipeline_src.training import build_batch_transform, build_criterion, load_teacher, train_one_epoch
from pipeline_src.tricks.lr_schedule import build_scheduler
from pipeline_src.tricks.mixed_precision import effective_precision, make_grad_scaler

CPU = torch.device("cpu")


class FakeLoader:
    """Two fixed batches of random images, with the `len()` train_one_epoch reads for its LR samples."""

    def __init__(self, batch: int, side: int, num_classes: int):
        gen = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(batch, 3, side, side, generator=gen),
                         torch.randint(0, num_classes, (batch,), generator=gen)) for _ in range(2)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _wnids(params: dict) -> list[str]:
    return json.loads((betons_dir(params) / "classes.json").read_text())["wnids"]


def _save(path: Path, model: torch.nn.Module, model_cfg: dict, wnids: list[str]) -> Path:
    checkpoint.save_final_model(path, model.state_dict(), {
        "run": "x", "seed": 0, "model": model_cfg, "num_classes": len(wnids), "wnids": wnids,
    })
    return path


def _teacher_params(params: dict) -> dict:
    return params_mod.resolve_run(params, params["teacher"]["run"])


def _import(micro: Path, tmp: Path, source: Path, seed: int, *extra: str) -> int:
    """The teacher stage importing `source`. Each test has its own seed: the MLflow store is shared."""
    return teacher_main(["--params", str(micro), "--set", f"paths.runs={tmp / 'runs'}", "--seed", str(seed),
                         "--set", f"teacher.checkpoint={source}", *extra])


def _student_step(run_params: dict, teacher: torch.nn.Module | None, student: torch.nn.Module, loader, tmp: Path):
    """One train_one_epoch of `student` set up as train() does (optimizer, per-step LambdaLR, scaler)."""
    train_cfg = run_params["train"]
    optimizer = build_optimizer(student, train_cfg, train_cfg["base_lr"])
    scheduler = build_scheduler(optimizer, iters_per_epoch=len(loader), epochs=train_cfg["epochs"],
                                warmup_epochs=train_cfg["warmup_epochs"], schedule=train_cfg["schedule"],
                                milestones=train_cfg["step_milestones"], gamma=train_cfg["step_gamma"])
    precision = effective_precision(CPU, train_cfg["precision"], train_cfg["cpu_amp"])
    scaler = make_grad_scaler(CPU, precision)
    batch_transform = build_batch_transform(train_cfg, len(_wnids(run_params)), torch.Generator().manual_seed(0))
    return train_one_epoch(student, loader, build_criterion(teacher, run_params["distill"]), batch_transform, optimizer,
                           scheduler, scaler, run_params, CPU, precision, 0)


# ---- the teacher stays frozen and sees what the student sees ----------------------------------


@pytest.mark.parametrize("run", ["t6-distill", "t6-distill-mixup"])
def test_distillation_step_trains_the_student_only_on_the_teachers_inputs(micro, tmp_path, run):
    params = params_mod.load(micro, [f"paths.runs={tmp_path}"])
    run_params = params_mod.resolve_run(params, run)
    assert run_params["train"]["distill"] and (run_params["train"]["mixup_alpha"] > 0) == (run == "t6-distill-mixup")
    wnids = _wnids(params)
    torch.manual_seed(0)
    teacher_model = _teacher_params(params)["model"]
    _save(run_dir(params, params["teacher"]["run"], 0) / "model.pt",
          build_model(teacher_model, len(wnids)), teacher_model, wnids)
    teacher = load_teacher(run_params, wnids, CPU)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher_before = copy.deepcopy(teacher.state_dict())

    student = build_model(run_params["model"], len(wnids)).to(memory_format=torch.channels_last)
    untrained = copy.deepcopy(student)
    student_before = copy.deepcopy(student.state_dict())
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()))
    teacher.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args[0].clone()))
    loader = FakeLoader(run_params["train"]["batch_size"], run_params["loader"]["res"], len(wnids))
    stats, _ = _student_step(run_params, teacher, student, loader, tmp_path)

    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    after = teacher.state_dict()
    assert after.keys() == teacher_before.keys()
    for key in after:  # weights and BatchNorm running statistics alike
        assert torch.equal(after[key], teacher_before[key]), key
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)

    assert len(seen["student"]) == len(seen["teacher"]) == len(loader)
    for (raw, _), s, t in zip(loader.batches, seen["student"], seen["teacher"]):
        assert torch.equal(s, t)  # the teacher scores the very batch the student trains on
        assert torch.equal(s, raw) == (run == "t6-distill")  # ... mixed, when mixup is on

    # The teacher's logits enter the loss: the same student without a teacher ends elsewhere.
    _student_step(run_params, None, untrained, loader, tmp_path)
    assert any(not torch.equal(v, untrained.state_dict()[k]) for k, v in student.state_dict().items())


# ---- the teacher stage with teacher.checkpoint --------------------------------------------------


def test_teacher_checkpoint_is_measured_and_logged_before_any_student(micro, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    torch.manual_seed(0)
    model = build_model(run_params["model"], len(wnids))
    source = _save(tmp_path / "mine.pt", model, run_params["model"], wnids)

    assert _import(micro, tmp_path, source, 1) == 0
    out = run_dir(params, params["teacher"]["run"], 1)
    metrics = json.loads((out / "metrics.json").read_text())
    # measured on the val beton: the same top-1 as evaluating the file's weights ourselves
    val = make_val_loader(betons_dir(params) / "val.beton", run_params, run_params["train"]["batch_size"], CPU)
    expected = evaluate(model, val, run_params, CPU, "fp32", len(wnids))
    assert metrics["top1"] == pytest.approx(expected["top1"]) and metrics["source"] == str(source)
    assert f"val top-1 {metrics['top1']:.2f}%" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [params["teacher"]["run"]]  # no student yet

    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    [run] = client.search_runs([exp.experiment_id], f"tags.run = 'teacher' and tags.teacher_source = '{source}'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["final_top1"] == pytest.approx(metrics["top1"])

    # what the students will distil from, whatever their seed
    frozen = load_teacher(params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}", "teacher.seed=1"]), wnids, CPU)
    for key, value in model.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], value), key


def test_teacher_stage_run_twice_keeps_the_imported_checkpoint(micro, tmp_path):
    """A re-run (by hand, after an import) must not train a teacher over the user's checkpoint."""
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    model = build_model(run_params["model"], len(wnids))
    source = _save(tmp_path / "mine.pt", model, run_params["model"], wnids)
    assert _import(micro, tmp_path, source, 2, "--set", "train.epochs=1") == 0
    assert _import(micro, tmp_path, source, 2, "--set", "train.epochs=1") == 0
    adhoc = params_mod.resolve_run(params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}", "train.epochs=1"]),
                                   run_params["run"]["name"])
    out = output_dir(adhoc, run_params["run"]["name"], 2)
    assert out.parts[-3] == "adhoc"
    assert json.loads((out / "metrics.json").read_text()).get("source") == str(source)
    kept, _ = checkpoint.load_model_weights(out / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(kept[key], value), key


def test_teacher_checkpoint_imports_after_a_crashed_teacher_training(micro, tmp_path):
    """An unfinished MLflow run of a teacher training (other params) must not block the import."""
    from mlflow.tracking import MlflowClient

    from pipeline_src import tracking

    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    # left RUNNING, as a killed job leaves it
    crashed = tracking.start_run(run_params, run_params["run"]["name"], 8, {})
    model = build_model(run_params["model"], len(wnids))
    source = _save(tmp_path / "mine.pt", model, run_params["model"], wnids)
    assert _import(micro, tmp_path, source, 8) == 0
    metrics = json.loads((run_dir(params, params["teacher"]["run"], 8) / "metrics.json").read_text())
    assert metrics["source"] == str(source)
    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    [run] = client.search_runs([exp.experiment_id], f"tags.run = 'teacher' and tags.teacher_source = '{source}'")
    assert run.info.status == "FINISHED" and run.info.run_id != crashed.run_id


@pytest.mark.parametrize("key", ["depth", "width", "variant", "stem_stride"])
def test_teacher_checkpoint_of_another_architecture_is_refused(micro, tmp_path, capsys, key):
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    options = {"depth": [26, 50], "width": [0.125, 0.25], "variant": ["A", "D"], "stem_stride": [4, 2]}[key]
    value = next(v for v in options if v != run_params["model"][key])
    other = {**run_params["model"], key: value}
    source = _save(tmp_path / "other.pt", build_model(other, len(wnids)), other, wnids)
    assert _import(micro, tmp_path, source, 3) == 2
    message = capsys.readouterr().err
    assert str(source) in message and "architecture does not match" in message
    assert f"{key}: checkpoint {value!r} vs params {run_params['model'][key]!r}" in message
    assert not (tmp_path / "runs").exists()


def test_teacher_checkpoint_whose_weights_contradict_its_meta_is_refused(micro, tmp_path, capsys):
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    smaller = build_model({**run_params["model"], "width": run_params["model"]["width"] / 2}, len(wnids))
    source = _save(tmp_path / "liar.pt", smaller, run_params["model"], wnids)  # meta claims the teacher's shape
    assert _import(micro, tmp_path, source, 4) == 2
    message = capsys.readouterr().err
    assert str(source) in message and "weights do not fit" in message
    assert not (tmp_path / "runs").exists()


def test_teacher_checkpoint_with_another_class_count_is_refused(micro, tmp_path, capsys):
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    fewer = wnids[:-1]
    source = _save(tmp_path / "fewer.pt", build_model(run_params["model"], len(fewer)), run_params["model"], fewer)
    assert _import(micro, tmp_path, source, 5) == 2
    message = capsys.readouterr().err
    assert str(source) in message and f"{len(fewer)} classes" in message and f"{len(wnids)}" in message
    assert not (tmp_path / "runs").exists()


def test_teacher_checkpoint_of_other_classes_is_refused(micro, tmp_path, capsys):
    """Same class count, other classes (or order): its logits would name the wrong classes."""
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    shuffled = wnids[1:] + wnids[:1]
    model = build_model(run_params["model"], len(wnids))
    source = _save(tmp_path / "shuffled.pt", model, run_params["model"], shuffled)
    assert _import(micro, tmp_path, source, 6) == 2
    message = capsys.readouterr().err
    assert str(source) in message and "classes" in message
    assert not (tmp_path / "runs").exists()


def test_pickled_teacher_checkpoint_is_refused(micro, tmp_path, capsys):
    params = params_mod.load(micro, [f"paths.runs={tmp_path / 'runs'}"])
    run_params, wnids = _teacher_params(params), _wnids(params)
    source = tmp_path / "pickled.pt"
    torch.save({"state_dict": build_model(run_params["model"], len(wnids)).state_dict(),
                "meta": {"model": run_params["model"], "num_classes": len(wnids), "wnids": wnids},
                "args": argparse.Namespace(lr=0.1)}, source)  # as many training scripts save them
    assert _import(micro, tmp_path, source, 7) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "pickled Python object" in err and "argparse.Namespace" in err
    assert "weights_only" in err
    assert not (tmp_path / "runs").exists()


# ---- end to end: train the teacher, then distil a student ---------------------------------------


def test_teacher_then_distilled_student_end_to_end(micro, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    sets = ["--params", str(micro), "--set", f"paths.runs={tmp_path}", "--set", "train.epochs=1"]
    params = params_mod.load(micro, [f"paths.runs={tmp_path}", "train.epochs=1"])
    assert train_main([*sets, "--run", "t6-distill"]) == 2  # a student without its teacher says what to run
    assert "run the teacher stage first" in capsys.readouterr().err

    assert teacher_main(sets) == 0
    # one epoch is not the file's recipe: both go to their ad-hoc folders, and find each other there
    teacher_dir = output_dir(params_mod.resolve_run(params, "teacher"), "teacher", 0)
    student_dir = output_dir(params_mod.resolve_run(params, "t6-distill"), "t6-distill", 0)
    assert teacher_dir.parts[-3] == student_dir.parts[-3] == "adhoc"
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert train_main([*sets, "--run", "t6-distill"]) == 0
    student = json.loads((student_dir / "metrics.json").read_text())
    assert 0 <= student["top1"] <= student["top5"] <= 100
    _, meta = checkpoint.load_model_weights(student_dir / "model.pt")
    _, teacher_meta = checkpoint.load_model_weights(teacher_dir / "model.pt")
    assert (meta["model"]["depth"], meta["model"]["width"]) != (teacher_meta["model"]["depth"],
                                                                teacher_meta["model"]["width"])

    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])

    def ours(name: str):
        [run] = [r for r in client.search_runs([exp.experiment_id], f"tags.run = '{name}'")
                 if r.data.tags.get("run_dir", "").startswith(str(tmp_path))]
        return run

    teacher_run, student_run = ours("teacher"), ours("t6-distill")
    assert teacher_run.info.status == student_run.info.status == "FINISHED"
    assert teacher_run.data.metrics["final_top1"] == pytest.approx(teacher_metrics["top1"])
    assert teacher_run.info.end_time <= student_run.info.start_time  # the teacher is known first
    assert student_run.data.params["train.distill"] == "true"
    assert float(student_run.data.params["distill.temperature"]) == params["distill"]["temperature"]
    top1 = client.get_metric_history(student_run.info.run_id, "top1")
    assert [m.step for m in top1] == [0]
    assert student_run.data.metrics["final_top1"] == pytest.approx(student["top1"])
