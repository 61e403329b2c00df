"""One error convention: every stage turns input and environment errors into one stderr line, exit 2."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_src import graph, plan, prepare, sanity, synthetic, teacher, train
from pipeline_src.errors import InputError, run_main
from pipeline_src.report import build
from pipeline_src.transfer import train_detection, train_segmentation

ROOT = Path(__file__).resolve().parents[1]

STAGES = [
    ("plan", plan.main, []),
    ("graph", graph.main, []),
    ("prepare", prepare.main, []),
    ("train", train.main, ["--run", "baseline"]),
    ("teacher", teacher.main, []),
    ("sanity", sanity.main, ["overfit"]),
    ("synthetic", synthetic.main, []),
    ("train_detection", train_detection.main, ["--backbone", "t5-resnet-d"]),
    ("train_segmentation", train_segmentation.main, ["--backbone", "t5-resnet-d"]),
    ("report", build.main, []),
]


@pytest.mark.parametrize("stage, main, args", STAGES, ids=[s[0] for s in STAGES])
def test_every_stage_reports_a_bad_params_file_in_one_line(stage, main, args, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main([*args, "--params", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{stage}: error: {missing}: params file not found; pass --params FILE "
                                "or run from the repo root"]


def test_a_malformed_set_value_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "pipeline_src.train", "--run", "baseline",
                           "--set", "train.epochs=[1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("train: error: --set 'train.epochs=[1': the value is not valid YAML")


def test_environment_errors_name_the_file_and_the_fix(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/last.pt")

    assert run_main("train", full) == 2
    assert capsys.readouterr().err == ("train: error: /data/runs/x/last.pt: No space left on device; free some "
                                       "space (or point paths.* at a larger disk) and re-run: the stage resumes\n")


def test_status_comes_from_the_error_and_bugs_keep_their_traceback(capsys):
    class Diverged(InputError):
        exit_status = 3

    def diverged():
        raise Diverged("loss is nan")

    assert run_main("train", diverged) == 3
    assert capsys.readouterr().err == "train: error: loss is nan\n"
    assert run_main("x", lambda: 5) == 5 and run_main("x", lambda: {"a": 1}) == 0

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main("train", bug)


def test_a_stage_process_exits_with_its_heap_frozen():
    # atexit runs handlers last-registered first: one registered before run_main sees run_main's at work,
    # however many stages the process ran. Without it the interpreter's last collection walks the heap.
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
            "from pipeline_src.errors import run_main\n"
            "run_main('a', lambda: None)\n"
            "run_main('b', lambda: None)\n"
            "print('frozen while running:', gc.get_freeze_count() > 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["frozen while running: False", "frozen at exit: True"]
