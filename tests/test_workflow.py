"""One stage graph for both tools: the Snakefile's jobs and the generated dvc.yaml agree on inputs,
settings and code; every job has its conda env, log and benchmark; the env is the project's."""
import ast
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline_src import graph
from pipeline_src import params as params_mod

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV_FILE = ROOT / "workflow" / "envs" / "pipeline.yaml"
# Snakemake rule -> DVC stage group(s) running the same code.
RULE_OF_GROUP = {"distill": "train", "single": "train", "loo": "train"}


def snakemake_jobs(snakefile_dir: Path = ROOT, config: dict | None = None) -> list:
    """Every job of `snakemake all ablations --forceall`, from Snakemake's own DAG (its API)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                                    config_settings=ConfigSettings(config=config or {}),
                                    snakefile=snakefile_dir / "Snakefile", workdir=snakefile_dir)
        dag_api = workflow_api.dag(DAGSettings(targets={"all", "ablations"}, forceall=True))
        workflow = dag_api.workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return list(workflow.dag.jobs)


@pytest.fixture(scope="module")
def jobs() -> list:
    return snakemake_jobs()


def dvc_stages(root: Path = ROOT, dvc_file: str | None = None) -> dict[str, tuple[str, set[str]]]:
    """output path -> (stage group, deps), from DVC's own resolution of the dvc.yaml."""
    from dvc.repo import Repo

    stages: dict[str, tuple[str, set[str]]] = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if dvc_file and Path(stage.path).resolve() != (root / dvc_file).resolve():
                continue
            group = stage.name.split("@")[0]
            deps = {str(Path(d.fs_path).relative_to(root)) for d in stage.deps}
            for out in stage.outs:
                stages[str(Path(out.fs_path).relative_to(root))] = (group, deps)
    return stages


def test_dvc_yaml_is_what_the_graph_generates():
    assert (ROOT / "dvc.yaml").read_text() == graph.render(root=ROOT), (
        "dvc.yaml is not what `python -m pipeline_src.graph --out dvc.yaml` writes; regenerate it"
    )


def test_refresh_rewrites_a_dvc_yaml_that_another_run_matrix_generated(tmp_path):
    """The bug it fixes: with study.seeds edited to [0], `make run` trained everything, then its
    closing `dvc commit` failed on the missing seed-1 outputs the stale dvc.yaml still named."""
    (tmp_path / "pipeline_src").symlink_to(ROOT / "pipeline_src")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["study"]["seeds"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # generated for seeds 0, 1, 2

    assert graph.refresh_dvc_file(root=tmp_path)
    text = (tmp_path / "dvc.yaml").read_text()
    assert text == graph.render(root=tmp_path) != (ROOT / "dvc.yaml").read_text()
    assert yaml.safe_load(text)["stages"]["train"]["matrix"]["seed"] == [0]
    assert not graph.refresh_dvc_file(root=tmp_path)  # in step now: nothing written
    assert not graph.refresh_dvc_file("configs/imagenet.yaml", root=tmp_path)  # no dvc.yaml of its own: none made
    assert not (tmp_path / graph.dvc_file("configs/imagenet.yaml")).exists()


def _assert_one_graph(jobs: list, dvc: dict[str, tuple[str, set[str]]], params: dict) -> None:
    """Each Snakemake job is a DVC stage with the same outputs, its inputs + its stage's code as
    deps, and a plan file holding exactly the job's settings."""
    plans = graph.plan_files(params)
    smk = {out: job for job in jobs for out in job.output}
    code = {stage: set(graph.stage_code(ROOT, stage)) for stage in graph.STAGE_MODULES}
    hashes = {stage: graph.code_hash(ROOT, stage) for stage in graph.STAGE_MODULES}
    assert set(smk) == set(dvc) - set(plans), (
        f"only in the Snakefile: {sorted(set(smk) - set(dvc))}; "
        f"only in dvc.yaml: {sorted(set(dvc) - set(smk) - set(plans))}"
    )
    for output, job in smk.items():
        group, deps = dvc[output]
        rule = job.rule.name
        assert RULE_OF_GROUP.get(group, group) == rule, f"{output}: rule {rule} vs DVC stage {group}"
        [plan] = deps & set(plans)
        assert plans[plan] == job.params.settings, f"{output}: DVC's {plan} is not the job's settings"
        assert deps - {plan} == set(job.input) | code[rule], f"{output}: DVC deps differ from the job's inputs + code"
        assert job.params.code == hashes[rule]


def test_snakemake_and_dvc_run_the_same_jobs_on_the_same_inputs_settings_and_code(jobs):
    _assert_one_graph(jobs, dvc_stages(), params_mod.load(ROOT / "params.yaml"))


def test_every_job_has_the_project_env_a_log_and_training_a_benchmark(jobs):
    for job in jobs:
        rule = job.rule.name
        if rule == "all":
            continue
        assert job.conda_env_spec is not None, f"rule {rule} has no conda: env"
        assert Path(str(job.conda_env_spec.file)).resolve() == ENV_FILE
        [log] = job.log
        assert log.startswith(f"logs/{rule}/") and log.endswith(".log")
        assert job.rule.shellcmd.endswith(" > {log} 2>&1"), f"rule {rule} does not write its log"
        if rule in ("prepare", "train", "teacher", "transfer_detection", "transfer_segmentation"):
            assert str(job.benchmark).startswith(f"benchmarks/{rule}/"), f"rule {rule} has no benchmark"
    logs = [tuple(job.log) for job in jobs if job.rule.name != "all"]
    assert len(set(logs)) == len(logs), "two jobs write the same log"


def test_every_rule_is_a_thin_call_of_a_stage_module():
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for shell in re.findall(r"shell:\n\s+(.+)", smk.read_text()):
            assert shell.startswith('f"{PY}.'), f"{smk.name}: rule shell is not `python -m pipeline_src.<stage>`"


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        name = re.split(r"[<>=!~ ]", req, maxsplit=1)[0].lower()
        pins[name] = req[len(name):].replace(" ", "")
    return pins


def _env_pip() -> list[str]:
    deps = yaml.safe_load(ENV_FILE.read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)


STAGE_CLIS = ("pipeline_src.evaluate", "pipeline_src.export", "pipeline_src.sanity")  # stages outside the DAG


def test_no_stage_imports_another_stage():
    """Stages share code through library modules (engine, training, ...), never through each other,
    so editing one stage's command line never re-runs another stage's jobs."""
    stages = {m for modules in graph.STAGE_MODULES.values() for m in modules if m != graph.LAUNCHER}
    stages |= set(STAGE_CLIS)
    for module in sorted(stages):
        path = graph._module_file(ROOT, module)
        imported = graph._imports(path, module)
        others = {m for m in imported if m in stages - {module} or any(m.startswith(f"{s}.") for s in stages - {module})}
        # synthetic.py is also the embedded data's definition: the VOC reader takes its class names
        others -= {"pipeline_src.synthetic"} if module == "pipeline_src.transfer.train_detection" else set()
        assert not others, f"{path} imports the stage module(s) {sorted(others)}"


def test_conda_env_keeps_the_pins_installs_the_project_and_what_ffcv_builds_against():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = yaml.safe_load(ENV_FILE.read_text())["dependencies"]
    pip = _env_pip()
    editable = [r for r in pip if r.startswith("-e ")]
    assert editable == ["-e ../.."], "the env must install the project itself"
    # pip runs beside the env file: workflow/envs/ here, .snakemake/conda/ when Snakemake builds it
    assert (ENV_FILE.parent / "../..").resolve() == ROOT
    extras = project["optional-dependencies"]
    wanted = _pins(project["dependencies"] + extras["slurm"] + extras["export"])
    assert _pins([r for r in pip if r not in editable]) == wanted, f"{ENV_FILE} pip pins differ from pyproject.toml"
    python = re.search(r">=(3\.\d+)", project["requires-python"]).group(1)
    assert f"python={python}" in deps
    assert {"pkg-config", "libjpeg-turbo", "opencv", "compilers"} <= {d for d in deps if isinstance(d, str)}


def test_env_pip_section_alone_covers_what_the_stages_import(tmp_path):
    """The env's pip section resolves against this venv (where the e2e tests run every rule's
    command) without an index, and every third-party module pipeline_src imports comes from a
    distribution that section pulls in: no rule needs a package only this venv happens to have."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(_env_pip()) + "\n")
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                    "-q", "-r", str(requirements), "--report", str(report)],
                   cwd=ENV_FILE.parent, check=True, capture_output=True, text=True)
    [project] = json.loads(report.read_text())["install"]
    assert project["metadata"]["name"] == "tricks-pipeline"
    assert project["download_info"]["url"] == ROOT.as_uri()

    listed = [Requirement(r) for r in _env_pip() if not r.startswith("-e ")]  # the extras' pins (slurm, export)
    closure, todo = set(), [Requirement(r) for r in project["metadata"]["requires_dist"]] + listed
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in closure or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        closure.add(name)
        todo += [Requirement(r) for r in md.requires(name) or []]
    owners = md.packages_distributions()
    imported = set()
    for path in (ROOT / "pipeline_src").rglob("*.py"):
        for node in ast.walk(graph.parse_module(path)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m in owners and m != "pipeline_src"}
    missing = {m: owners[m] for m in third_party
               if not {d.lower().replace("_", "-") for d in owners[m]} & closure}
    assert third_party and not missing, f"imported but not installed by the env's pip section: {missing}"


def test_stage_code_follows_imports_and_its_hash_moves_only_with_that_code(tmp_path):
    shutil.copytree(ROOT / "pipeline_src", tmp_path / "pipeline_src", ignore=shutil.ignore_patterns("__pycache__"))
    seg = graph.stage_code(tmp_path, "transfer_segmentation")
    assert "pipeline_src/transfer/segmentation.py" in seg and "pipeline_src/models/resnet.py" in seg
    assert "pipeline_src/training.py" not in seg and "pipeline_src/report/build.py" not in seg
    assert "pipeline_src/report/paper_numbers.yaml" in graph.stage_code(tmp_path, "report")  # package data
    before = {stage: graph.code_hash(tmp_path, stage) for stage in graph.STAGE_MODULES}
    with (tmp_path / "pipeline_src" / "models" / "resnet.py").open("a") as fh:
        fh.write("\n# an edit\n")
    after = {stage: graph.code_hash(tmp_path, stage) for stage in graph.STAGE_MODULES}
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert changed == {"train", "teacher", "transfer_detection", "transfer_segmentation"}


def test_imagenet_overlay_is_selectable_in_snakemake_and_dvc_with_its_own_roots(tmp_path):
    """Also the same graph in both tools: real data (no synthetic stage), its own roots and dvc.yaml."""
    jobs = snakemake_jobs(config={"params_file": "configs/imagenet.yaml"})
    outputs = [out for job in jobs for out in job.output]
    assert outputs and all(out.startswith(("data/imagenet/", "reports/imagenet/")) for out in outputs)
    assert "synthetic" not in {job.rule.name for job in jobs}  # real data configured
    assert all("--params configs/imagenet.yaml" in job.shellcmd for job in jobs if job.rule.shellcmd)

    for name in ("params.yaml", "configs", "pipeline_src"):
        (tmp_path / name).symlink_to(ROOT / name)
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = graph.dvc_file("configs/imagenet.yaml")
    (tmp_path / out).parent.mkdir(parents=True)
    (tmp_path / out).write_text(graph.render("configs/imagenet.yaml", out, root=tmp_path))
    stages = dvc_stages(tmp_path, out)
    assert "data/imagenet/plan/runs/efficient.json" in stages
    assert "data/imagenet/runs/efficient/seed0/model.pt" in stages
    assert "configs/imagenet.yaml" in stages["data/imagenet/plan/runs/efficient.json"][1]  # overlay + base
    assert "params.yaml" in stages["data/imagenet/plan/runs/efficient.json"][1]
    assert all(path.startswith(("data/imagenet/", "reports/imagenet/")) for path in stages)
    _assert_one_graph(jobs, stages, params_mod.load(ROOT / "configs" / "imagenet.yaml"))


def test_plan_rewrites_only_the_files_of_jobs_whose_settings_changed(tmp_path):
    from pipeline_src.plan import write_plan

    params = params_mod.load(ROOT / "params.yaml", [f"paths.data={tmp_path / 'data'}"])
    assert len(write_plan(params)) == len(graph.plan_files(params))
    assert write_plan(params) == []
    params["tricks"]["mixup"]["train.mixup_alpha"] = 0.3
    using = {graph.plan_file(params, "train", run) for run in params_mod.all_run_names(params)
             if "mixup" in params_mod.resolve_run(params, run)["run"]["tricks"]}
    assert "loo-mixup" not in str(using) and graph.plan_file(params, "train", "t6-mixup") in using
    assert set(write_plan(params)) == using
