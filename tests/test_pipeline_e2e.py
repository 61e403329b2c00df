"""The whole DAG at micro size through Snakemake, then what users rely on afterwards:
nothing re-runs, a changed trick or a code edit re-runs the same jobs in Snakemake and DVC, logs,
benchmarks and the workflow report exist, a failure names its log, and a DVC remote round trip
leaves Snakemake nothing to do (the mtime clash between the two tools)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_micro_params
from pipeline_src import graph
from pipeline_src import params as params_mod

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Snakemake trusts checksums instead of mtimes for files under 1 MB; with a 1-byte limit every file
# counts as large here, as ImageNet's betons and checkpoints would, so the tests prove something.
SNAKEMAKE = [str(BIN / "snakemake"), "--cores", "2", "--max-checksum-file-size", "1"]


def _run(cmd: list[str], cwd: Path, path: str = "", ok: bool = True) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PATH": f"{path}{BIN}:{os.environ['PATH']}"})
    assert (result.returncode == 0) == ok, (
        f"{' '.join(cmd)}: exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
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
    shutil.copy(ROOT / "Snakefile", tmp / "Snakefile")
    shutil.copytree(ROOT / "workflow", tmp / "workflow")
    # A copy, not a link: the stages' code is a tracked input and a test edits it.
    shutil.copytree(ROOT / "pipeline_src", tmp / "pipeline_src", ignore=shutil.ignore_patterns("__pycache__"))
    params = write_micro_params(tmp)
    raw = yaml.safe_load(params.read_text())
    raw["paths"] = {"data": "data", "runs": "data/runs", "reports": "reports"}
    # The same DAG with fewer rows per table: every kind of job (train, teacher, distilled students,
    # both transfer tasks, report) runs, at CI's budget.
    raw["study"]["tables"] = ["baseline", "t4-large", "t5-resnet-d", "t6-label-smoothing", "t6-mixup"]
    raw["transfer"]["backbones"] = ["t6-label-smoothing"]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "-m", "pipeline_src.graph", "--out", "dvc.yaml"], tmp)  # this run matrix's dvc.yaml
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
    params = params_mod.load(workspace / "params.yaml")
    for run in params["study"]["tables"] + params["study"]["distilled"] + [params["teacher"]["run"]]:
        assert (workspace / "data" / "runs" / run / "seed0" / "metrics.json").is_file(), run


DEFAULT_STAGES = ["plan", "synthetic", "prepare", "train", "teacher", "distill", "transfer_detection",
                  "transfer_segmentation", "report"]  # what `snakemake` (target all) runs; not the ablations


def test_dvc_status_is_clean_after_snakemake(workspace):
    out = _run([str(BIN / "dvc"), "status", *DEFAULT_STAGES], workspace)
    assert "up to date" in out, out


def test_second_run_has_nothing_to_do(workspace):
    out = _run([*SNAKEMAKE, "-n"], workspace)
    assert _planned_jobs(out) == [], out[-2000:]
    assert "Nothing to be done" in out


def test_every_job_wrote_its_log_and_training_its_benchmark(workspace):
    log = (workspace / "logs" / "train" / "baseline-seed0.log").read_text()
    assert '"epoch"' in log  # the job's own output went to its log
    assert (workspace / "logs" / "report" / "report.log").is_file()
    for rule, name in (("train", "baseline-seed0"), ("teacher", "seed0"), ("prepare", "prepare"),
                       ("transfer_segmentation", "t6-label-smoothing-seed0")):
        header = (workspace / "benchmarks" / rule / f"{name}.tsv").read_text().split("\n")[0]
        assert header.startswith("s\th:m:s\tmax_rss"), header


def _dvc_stale(workspace: Path) -> set[tuple[str, str]]:
    """(stage group, item) of every default-target DVC stage that `dvc status` finds changed.

    One untargeted status, filtered: DVC parses dvc.lock once per target, so naming the nine groups
    costs 3 s more a call (test_dvc_status_is_clean_after_snakemake runs the targeted command)."""
    out = _run([str(BIN / "dvc"), "status", "--json"], workspace)
    names = {tuple(name.split("@", 1)) if "@" in name else (name, "") for name in json.loads(out.strip() or "{}")}
    return {name for name in names if name[0] in DEFAULT_STAGES}


def _snakemake_as_dvc(planned: list[tuple[str, str]], params: dict) -> set[tuple[str, str]]:
    """Snakemake's planned jobs named as DVC stages (train@<run>-<seed>, teacher@<seed>, ...)."""
    names = set()
    for rule, wildcards in planned:
        values = dict(re.findall(r"(\w+)=([^,]+)", wildcards))
        if rule == "train":
            names.add(("distill" if values["run"] in params["study"]["distilled"] else "train",
                       f"{values['run']}-{values['seed']}"))
        elif rule == "teacher":
            names.add(("teacher", values["seed"]))
        elif rule.startswith("transfer_"):
            names.add((rule, f"{values['backbone']}-{values['seed']}"))
        elif rule != "all":
            names.add((rule, ""))
    return names


def test_one_trick_change_reruns_the_same_jobs_in_snakemake_and_dvc(workspace):
    """Snakemake re-runs exactly the runs whose recipe uses the trick; after the cheap `plan` stage,
    DVC finds exactly those stages stale (their plan file changed), and no other."""
    params_file = workspace / "params.yaml"
    original = params_file.read_text()
    raw = yaml.safe_load(original)
    raw["tricks"]["label_smoothing"]["train.label_smoothing"] = 0.2
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        planned = _planned_jobs(_run([*SNAKEMAKE, "-n"], workspace))
        _run([str(BIN / "dvc"), "repro", "-q", "plan"], workspace)
        stale = _dvc_stale(workspace)
    finally:
        params_file.write_text(original)
        _run([str(BIN / "dvc"), "repro", "-q", "plan"], workspace)
    params = params_mod.load(params_file)
    teacher = params["teacher"]["run"]
    using = {r for r in params["study"]["tables"] + params["study"]["distilled"] + [teacher]
             if "label_smoothing" in params_mod.resolve_run(params, r)["run"]["tricks"]}
    assert using and "baseline" not in using
    trained = {re.search(r"run=([^,]+)", w).group(1) for rule, w in planned if rule == "train"}
    trained |= {teacher for rule, _ in planned if rule == "teacher"}
    assert trained == using
    assert ("report", "") in planned
    # DVC lists the stages whose own inputs changed; Snakemake also plans their downstream jobs
    own = {job for job in _snakemake_as_dvc(planned, params) if job[0] in ("train", "distill", "teacher")}
    assert stale - {("plan", "")} == own, f"DVC: {sorted(stale)}; Snakemake: {sorted(own)}"
    assert _dvc_stale(workspace) == set()


def test_a_code_edit_reruns_that_stage_in_snakemake_and_dvc(workspace):
    code = workspace / "pipeline_src" / "transfer" / "segmentation.py"
    original = code.read_text()
    code.write_text(original + "\n# an edit\n")
    try:
        planned = _planned_jobs(_run([*SNAKEMAKE, "-n"], workspace))
        stale = _dvc_stale(workspace)
    finally:
        code.write_text(original)
    params = params_mod.load(workspace / "params.yaml")
    expected = {("transfer_segmentation", f"{b}-{s}") for b in params["transfer"]["backbones"]
                for s in params["study"]["seeds"]}
    assert _snakemake_as_dvc(planned, params) == expected | {("report", "")}
    assert stale == expected
    assert _dvc_stale(workspace) == set()


def test_workflow_report_shows_the_jobs(workspace):
    _run([*SNAKEMAKE, "--report", "reports/workflow.html"], workspace)
    html = (workspace / "reports" / "workflow.html").read_text()
    assert "transfer_segmentation" in html and "train" in html


def test_a_stale_dvc_yaml_is_regenerated_before_the_jobs(workspace):
    """A dvc.yaml generated for another run matrix (one more seed) is rewritten when the run starts,
    so the closing `dvc commit` records this run's outputs instead of failing on the other's."""
    dvc_yaml = workspace / "dvc.yaml"
    current = dvc_yaml.read_text()
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["study"]["seeds"] = [*raw["study"]["seeds"], max(raw["study"]["seeds"]) + 1]
    (workspace / "more-seeds.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        dvc_yaml.write_text(graph.render("more-seeds.yaml", "dvc.yaml", root=workspace))
    finally:
        (workspace / "more-seeds.yaml").unlink()
    (workspace / "reports" / "report.md").unlink()  # some work to do: a run without jobs starts nothing
    out = _run(SNAKEMAKE, workspace)
    assert "dvc.yaml: regenerated from params.yaml" in out
    assert dvc_yaml.read_text() == current
    assert _dvc_stale(workspace) == set()


def test_dvc_remote_round_trip_leaves_snakemake_nothing_to_do(workspace, tmp_path):
    """Push to a local-directory remote; lose data/, reports/, the DVC cache and Snakemake's records
    (as on another machine); pull, then `snakemake --touch` (what `make pull` runs): the pulled files'
    new mtimes no longer look like changed inputs, and Snakemake still notices a later trick change."""
    dvc = str(BIN / "dvc")
    _run([dvc, "remote", "add", "-f", "-d", "store", str(tmp_path / "store")], workspace)
    _run([dvc, "push", "-q", *DEFAULT_STAGES], workspace)
    tracked = {"model.pt", "metrics.json", "history.json", "report.md", "classes.json", "manifest.json"}
    outputs = {p: p.read_bytes() for root in ("data", "reports") for p in (workspace / root).rglob("*")
               if p.is_file() and (p.name in tracked or p.suffix == ".beton" or "plan" in p.parts)}
    assert len([p for p in outputs if p.name == "model.pt"]) >= 8
    for name in ("data", "reports", ".dvc/cache", ".snakemake"):
        shutil.rmtree(workspace / name)
    _run([dvc, "pull", "-q", *DEFAULT_STAGES], workspace)  # the ablations never ran
    assert all(path.read_bytes() == content for path, content in outputs.items())
    assert _dvc_stale(workspace) == set()
    _run([*SNAKEMAKE, "--touch"], workspace)
    out = _run([*SNAKEMAKE, "-n"], workspace)
    assert _planned_jobs(out) == [], out[-3000:]

    params_file = workspace / "params.yaml"
    original = params_file.read_text()
    raw = yaml.safe_load(original)
    raw["tricks"]["mixup"]["train.mixup_alpha"] = 0.3
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        planned = _planned_jobs(_run([*SNAKEMAKE, "-n"], workspace))
    finally:
        params_file.write_text(original)
    assert ("train", "run=t6-mixup, seed=0") in planned and ("train", "run=baseline, seed=0") not in planned


def test_a_failed_job_names_its_log(workspace, tmp_path):
    """Keep this test last: the failed report job loses its outputs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho 'the stage failed here' >&2\nexit 3\n")
    (fake / "python").chmod(0o755)
    out = _run([*SNAKEMAKE, "--forcerun", "report"], workspace, path=f"{fake}:", ok=False)
    assert "logs/report/report.log" in out
    assert "the stage failed here" in (workspace / "logs" / "report" / "report.log").read_text()
