"""Ad-hoc runs (--set overrides that change a run's recipe) never land in the pipeline's run folder."""
from __future__ import annotations

import json

import pytest

from pipeline_src import params as params_mod
from pipeline_src.run_folders import adhoc_dir, is_adhoc, output_dir, run_dir, with_same_overrides
from pipeline_src.train import main


def test_a_one_epoch_try_leaves_the_pipeline_folder_alone(micro, tmp_path, capsys):
    runs = tmp_path / "runs"
    pipeline = runs / "baseline" / "seed0"
    pipeline.mkdir(parents=True)
    published = {"top1": 61.5, "recipe": "from the pipeline"}
    (pipeline / "metrics.json").write_text(json.dumps(published))
    (pipeline / "model.pt").write_bytes(b"the pipeline's weights")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in pipeline.iterdir()}

    argv = ["--params", str(micro), "--run", "baseline", "--seed", "0", "--set", f"paths.runs={runs}",
            "--set", "train.epochs=1", "--set", "train.step_milestones=[]"]
    assert main(argv) == 0
    sets = [f"paths.runs={runs}", "train.epochs=1", "train.step_milestones=[]"]
    params = params_mod.resolve_run(params_mod.load(micro, sets), "baseline")
    out = adhoc_dir(params, "baseline", 0, params_mod.recipe_hash(params))
    assert out == runs / "adhoc" / f"baseline-{params_mod.recipe_hash(params)[:12]}" / "seed0"
    assert str(out) in capsys.readouterr().out  # said at start where it goes
    assert json.loads((out / "metrics.json").read_text())["recipe"] == params_mod.recipe_hash(params)
    assert (out / "model.pt").is_file()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in pipeline.iterdir()} == before
    assert sorted(p.name for p in runs.iterdir()) == ["adhoc", "baseline"]

    assert main(argv) == 0  # the same overrides find the same folder: finished, skipped
    assert f"{out}: already finished" in capsys.readouterr().out


def test_overrides_outside_the_recipe_keep_the_pipeline_folder(micro, tmp_path):
    params = params_mod.load(micro, [f"paths.runs={tmp_path}", "tracking.experiment=other", "train.epochs=2"])
    run_params = params_mod.resolve_run(params, "baseline")  # train.epochs=2 is what the micro file already says
    assert not is_adhoc(run_params, "baseline")
    assert output_dir(run_params, "baseline", 1) == run_dir(run_params, "baseline", 1) \
        == tmp_path / "baseline" / "seed1"
    # a run's own trick, given again with --set, is still the file's recipe
    mixup = params_mod.resolve_run(params_mod.load(micro, ["train.mixup_alpha=0.2"]), "t6-mixup")
    assert not is_adhoc(mixup, "t6-mixup")


def test_out_may_not_be_the_pipeline_folder_of_an_adhoc_recipe(micro, tmp_path, capsys):
    argv = ["--params", str(micro), "--run", "baseline", "--set", f"paths.runs={tmp_path}",
            "--set", "train.base_lr=0.5", "--out", str(tmp_path / "baseline" / "seed0")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pipeline's folder of run 'baseline'" in err and "pick another --out" in err
    assert not (tmp_path / "baseline").exists()


def test_a_student_finds_the_teacher_trained_with_the_same_overrides(micro, tmp_path):
    sets = [f"paths.runs={tmp_path}", "train.epochs=1", "train.step_milestones=[]"]
    student = params_mod.resolve_run(params_mod.load(micro, sets), "t6-distill")
    teacher = with_same_overrides(student, "teacher")
    assert teacher == params_mod.resolve_run(params_mod.load(micro, sets), "teacher")
    assert output_dir(teacher, "teacher", 0).parent.parent == tmp_path / "adhoc"
    student = params_mod.resolve_run(params_mod.load(micro, [f"paths.runs={tmp_path}"]), "t6-distill")
    unchanged = with_same_overrides(student, "teacher")
    assert output_dir(unchanged, "teacher", 0) == tmp_path / "teacher" / "seed0"


@pytest.mark.parametrize("value", ["1e-30", "[1.0, 1.0]", "cosine", "null"])
def test_override_values_survive_the_round_trip(micro, value):
    key = {"1e-30": "train.base_lr", "[1.0, 1.0]": "augment.crop_area", "cosine": "train.schedule",
           "null": "teacher.checkpoint"}[value]
    params = params_mod.resolve_run(params_mod.load(micro, [f"{key}={value}"]), "baseline")
    assert with_same_overrides(params, "baseline") == params
