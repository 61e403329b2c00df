"""The whole DAG at micro size through Snakemake, then what users rely on afterwards:
nothing re-runs, a changed trick re-runs only its runs, DVC agrees, and a `dvc checkout` does not
make Snakemake re-train (the mtime clash between the two tools)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_micro_params
from pipeline_src import params as P

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Snakemake trusts checksums instead of mtimes for files under 1 MB; with a 1-byte limit every file
# counts as large here, as ImageNet's betons and checkpoints would, so the tests prove something.
SNAKEMAKE = [str(BIN / "snakemake"), "--cores", "2", "--max-checksum-file-size", "1"]


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def _planned_jobs(out: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            wildcards = re.search(r"^    wildcards: (.*)$", block, flags=re.M)
            jobs.append((head.group(1), wildcards.group(1) if wildcards else ""))
    return jobs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of the workflow with the micro params.yaml, run once end to end."""
    tmp = tmp_path_factory.mktemp("e2e")
    for name in ("Snakefile", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp / name)
    shutil.copytree(ROOT / "workflow", tmp / "workflow")
    (tmp / "pipeline_src").symlink_to(ROOT / "pipeline_src")  # dvc.yaml's code dependencies
    params = write_micro_params(tmp)
    raw = yaml.safe_load(params.read_text())
    raw["paths"] = {"data": "data", "runs": "data/runs", "reports": "reports"}
    # The same DAG with fewer rows per table: every kind of job (train, teacher, distilled students,
    # both transfer tasks, report) runs, at CI's budget.
    raw["study"]["tables"] = ["baseline", "t4-large", "t5-resnet-d", "t6-label-smoothing", "t6-mixup"]
    raw["transfer"]["backbones"] = ["t6-label-smoothing"]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([str(BIN / "dvc"), "init", "--no-scm", "-q"], tmp)
    cache_type = re.search(r"type = (\S+)", (ROOT / ".dvc" / "config").read_text()).group(1)
    _run([str(BIN / "dvc"), "config", "cache.type", cache_type], tmp)  # the repo's setting
    _run(SNAKEMAKE, tmp)
    return tmp


def test_whole_dag_ends_in_the_report(workspace):
    md = (workspace / "reports" / "report.md").read_text()
    assert "micro" in md and "Table 4" in md and "Table 6" in md
    assert "Stale run seeds (other recipe than the params', never tabulated): 0." in md  # train and report agree
    assert "Machine (every finished run, from metrics.json): CPU " in md
    params = P.load(workspace / "params.yaml")
    for run in params["study"]["tables"] + params["study"]["distilled"] + [params["teacher"]["run"]]:
        assert (workspace / "data" / "runs" / run / "seed0" / "metrics.json").is_file(), run


DEFAULT_STAGES = ["synthetic", "prepare", "train", "teacher", "distill", "transfer_detection",
                  "transfer_segmentation", "report"]  # what `snakemake` (target all) runs; not the ablations


def test_dvc_status_is_clean_after_snakemake(workspace):
    out = _run([str(BIN / "dvc"), "status", *DEFAULT_STAGES], workspace)
    assert "up to date" in out, out


def test_second_run_has_nothing_to_do(workspace):
    out = _run([*SNAKEMAKE, "-n"], workspace)
    assert _planned_jobs(out) == [], out[-2000:]
    assert "Nothing to be done" in out


def test_changing_one_trick_reruns_only_the_runs_that_use_it(workspace):
    params_file = workspace / "params.yaml"
    original = params_file.read_text()
    raw = yaml.safe_load(original)
    raw["tricks"]["label_smoothing"]["train.label_smoothing"] = 0.2
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        planned = _planned_jobs(_run([*SNAKEMAKE, "-n"], workspace))
    finally:
        params_file.write_text(original)
    params = P.load(params_file)
    using = {r for r in params["study"]["tables"] + params["study"]["distilled"] + [params["teacher"]["run"]]
             if "label_smoothing" in P.resolve_run(params, r)["run"]["tricks"]}
    assert using and "baseline" not in using
    trained = {re.search(r"run=([^,]+)", w).group(1) for rule, w in planned if rule == "train"}
    trained |= {params["teacher"]["run"] for rule, _ in planned if rule == "teacher"}
    assert trained == using
    assert ("report", "") in planned


def test_dvc_checkout_of_deleted_outputs_leaves_snakemake_nothing_to_do(workspace):
    deleted = list((workspace / "data" / "runs").glob("*/seed0/model.pt")) + \
        list((workspace / "data" / "betons").glob("*.beton"))
    assert len(deleted) >= 8
    for path in deleted:
        path.unlink()
    _run([str(BIN / "dvc"), "checkout", "-q", *DEFAULT_STAGES], workspace)  # the ablations never ran
    assert all(path.is_file() for path in deleted)
    out = _run([*SNAKEMAKE, "-n"], workspace)
    assert _planned_jobs(out) == [], out[-3000:]
