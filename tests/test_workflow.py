"""The Snakefile and dvc.yaml describe the same stage graph; the conda envs keep the pip pins."""
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC_TO_SNAKEMAKE = {"train": "train", "distill": "train", "single": "train", "loo": "train"}


def snakemake_jobs(*targets: str) -> dict[str, tuple[str, set[str]]]:
    """output file -> (rule, input files), parsed from a dry run of the targets."""
    out = subprocess.run(
        [BIN / "snakemake", "--cores", "1", "-n", "--forceall", *targets], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    jobs: dict[str, tuple[str, set[str]]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head:
            continue
        fields = dict(re.findall(r"^    (input|output): (.*)$", block, flags=re.M))
        inputs = set(fields.get("input", "").split(", ")) - {""}
        for output in fields.get("output", "").split(", "):
            if output:
                jobs[output] = (head.group(1), inputs)
    return jobs


def dvc_stages() -> dict[str, tuple[str, set[str]]]:
    """output path -> (stage group, data deps), from DVC's own resolution of dvc.yaml."""
    from dvc.repo import Repo

    stages: dict[str, tuple[str, set[str]]] = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            group = stage.name.split("@")[0]
            deps = {str(Path(d.def_path)) for d in stage.deps if str(d.def_path).startswith("data/")}
            for out in stage.outs:
                stages[str(Path(out.def_path))] = (group, deps)
    return stages


def _covered(path: str, by: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in by)


def test_snakefile_and_dvc_yaml_agree_on_stages_inputs_and_outputs():
    smk = {k: v for k, v in snakemake_jobs("all", "ablations").items() if k.startswith(("data/", "reports/"))}
    dvc = dvc_stages()
    assert set(smk) == set(dvc), (
        f"only in the Snakefile: {sorted(set(smk) - set(dvc))}; only in dvc.yaml: {sorted(set(dvc) - set(smk))}"
    )
    for output, (rule, inputs) in smk.items():
        group, deps = dvc[output]
        assert DVC_TO_SNAKEMAKE.get(group, group) == rule, f"{output}: rule {rule} vs DVC stage {group}"
        data_inputs = {i for i in inputs if i.startswith("data/")}
        assert all(_covered(i, deps) for i in data_inputs), f"{output}: DVC misses inputs {data_inputs - deps}"
        assert all(any(_covered(i, {d}) for i in data_inputs) for d in deps), (
            f"{output}: DVC depends on {deps} but the Snakefile's inputs are {data_inputs}"
        )


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        name = re.split(r"[<>=!~ ]", req, maxsplit=1)[0].lower()
        pins[name] = req[len(name):].replace(" ", "")
    return pins


def test_conda_envs_keep_the_pip_pins():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["slurm"])
    for env_file in sorted((ROOT / "workflow" / "envs").glob("*.yaml")):
        deps = yaml.safe_load(env_file.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        assert _pins(pip) == wanted, f"{env_file} pip pins differ from pyproject.toml"
        assert "python=3.11" in deps


def test_every_rule_is_a_thin_call_of_a_stage_module():
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for shell in re.findall(r"shell:\n\s+(.+)", smk.read_text()):
            assert shell.startswith('f"{PY}.'), f"{smk.name}: rule shell is not `python -m pipeline_src.<stage>`"
