"""The stage graph in one place, for both tools: which settings and which code each stage depends on.

The Snakefile takes each job's settings and code hash from here as `params:` (a change re-runs just
that job); DVC gets the same settings as small plan files (`python -m pipeline_src.plan`) and the
same code as file deps, in a dvc.yaml generated from here:

    python -m pipeline_src.graph > dvc.yaml                       # the default profile
    python -m pipeline_src.graph --params configs/imagenet.yaml --out profiles/imagenet/dvc.yaml

A profile other than params.yaml gets its own dvc.yaml (and dvc.lock) in profiles/<name>/, its stages
running from the repo root (`wdir`), so `dvc repro profiles/imagenet/dvc.yaml` leaves the CPU
profile's stages and lock alone.
"""
from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline_src import params as params_mod
from pipeline_src.errors import run_main
from pipeline_src.io import write_text

# The modules each stage runs (`python -m <module>`): training goes through the GPU launcher, whose
# code is the stage's code too.
LAUNCHER = "pipeline_src.launch"
STAGE_MODULES = {
    "plan": ("pipeline_src.plan",),
    "synthetic": ("pipeline_src.synthetic",),
    "prepare": ("pipeline_src.prepare",),
    "train": (LAUNCHER, "pipeline_src.train"),
    "teacher": (LAUNCHER, "pipeline_src.teacher"),
    "transfer_detection": ("pipeline_src.transfer.train_detection",),
    "transfer_segmentation": ("pipeline_src.transfer.train_segmentation",),
    "report": ("pipeline_src.report",),
}
# DVC runs jobs one at a time on this machine: one GPU each (the rules' `gpu` resource), one node.
LAUNCH_ONE_GPU = f"python -m {LAUNCHER} --gpus 1 --"
# Files next to a stage's modules that are code too: package data and C sources.
CODE_DATA_SUFFIXES = (".yaml", ".c", ".h")
BETONS = ("train.beton", "val.beton", "classes.json")


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def parse_module(path: Path) -> ast.Module:
    """`ast.parse` with the garbage collector paused: on CPython 3.11.7 a finalizer that runs during
    the parse (numba's dispatchers have them) fails it with "AST constructor recursion depth
    mismatch" (seen in CI, in a process that had run numba code)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        if enabled:
            gc.enable()


def _imports(path: Path, module: str) -> set[str]:
    """pipeline_src modules `path` imports, anywhere in it (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(parse_module(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name.split(".")[0] == "pipeline_src"}


def stage_code(root: str | Path, stage: str) -> list[str]:
    """Repo-relative files of the code a stage runs: its modules' import closure inside
    pipeline_src, the packages' __init__.py files on the way, and their package data."""
    root = Path(root)
    todo = [name for start in STAGE_MODULES[stage] for name in (start, f"{start}.__main__")]
    seen, files = set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue
        files.add(path)
        parents = module.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]
        todo += sorted(_imports(path, module))
    for directory in {f.parent for f in files}:
        files.update(f for f in directory.iterdir() if f.suffix in CODE_DATA_SUFFIXES and f.is_file())
    return sorted(str(f.relative_to(root)) for f in files)


def code_hash(root: str | Path, stage: str) -> str:
    """One fingerprint of a stage's code: editing any file it runs re-runs its jobs in Snakemake."""
    digest = hashlib.sha256()
    for rel in stage_code(root, stage):
        digest.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stage_settings(params: dict, stage: str, run: str | None = None) -> str:
    """The settings a stage's job depends on, as canonical JSON: Snakemake's `params:` value and
    DVC's plan file are this same text, so both tools re-run the same jobs after a change."""
    if stage in ("train", "teacher"):
        settings: dict[str, Any] = params_mod.recipe_of(params_mod.resolve_run(params, run))
        if stage == "teacher":
            settings = {"recipe": settings, "teacher": params["teacher"]}
    elif stage == "synthetic":
        settings = params["synthetic"]
    elif stage == "prepare":
        settings = {"data": params["data"], "prepare": params["prepare"]}
    elif stage == "transfer_detection":
        settings = {"detection": params["transfer"]["detection"], "voc_dir": params["data"]["voc_dir"]}
    elif stage == "transfer_segmentation":
        settings = {"segmentation": params["transfer"]["segmentation"], "ade20k_dir": params["data"]["ade20k_dir"]}
    elif stage == "report":
        settings = {"profile": params["profile"], "study": params["study"]}
    else:
        raise ValueError(f"stage '{stage}' has no settings; known: {sorted(STAGE_MODULES)}")
    return json.dumps(settings, sort_keys=True)


def plan_file(params: dict, stage: str, run: str | None = None) -> str:
    """Where the plan stage writes a job's settings for DVC (one file per run for training)."""
    plan = f"{params['paths']['data']}/plan"
    return f"{plan}/runs/{run}.json" if run is not None else f"{plan}/{stage}.json"


def plan_files(params: dict) -> dict[str, str]:
    """Every plan file and its content."""
    files = {plan_file(params, s): stage_settings(params, s)
             for s in ("synthetic", "prepare", "transfer_detection", "transfer_segmentation", "report")}
    teacher = params["teacher"]["run"]
    for run in params_mod.all_run_names(params):
        stage = "teacher" if run == teacher else "train"
        files[plan_file(params, stage, run)] = stage_settings(params, stage, run)
    return files


def ablation_runs(params: dict) -> dict[str, list[str]]:
    names = params_mod.all_run_names(params)
    return {"single": [r for r in names if r.startswith("single-")],
            "loo": [r for r in names if r.startswith("loo-")]}


def _run_stage(params: dict, root: Path, args: str, runs: list[str], teacher: bool) -> dict:
    """A matrix of training jobs (run x seed); distilled students also wait for the teacher."""
    data, out = params["paths"]["data"], f"{params['paths']['runs']}/${{item.run}}/seed${{item.seed}}"
    deps = [f"{data}/betons/{b}" for b in BETONS] + [plan_file(params, "train", "${item.run}")]
    if teacher:  # trained once, with teacher.seed: every student seed distils from it
        deps.append(f"{params['paths']['runs']}/{params['teacher']['run']}/seed{params['teacher']['seed']}/model.pt")
    return {
        "matrix": {"run": runs, "seed": params["study"]["seeds"]},
        "cmd": f"{LAUNCH_ONE_GPU} pipeline_src.train {args} --run ${{item.run}} --seed ${{item.seed}}",
        "deps": deps + stage_code(root, "train"),
        "outs": [f"{out}/model.pt", f"{out}/history.json"],
        "metrics": [f"{out}/metrics.json"],
    }


def dvc_yaml(params: dict, params_file: str, root: str | Path = ".", wdir: str = ".") -> dict:
    """dvc.yaml for one profile, built from the same run matrix, paths and settings as the Snakefile.
    Every output is cached (metrics and plan files too): data/ and reports/ are not in git, so a
    `dvc pull` on another machine must bring all of them."""
    root = Path(root)
    data, runs_dir, reports = params["paths"]["data"], params["paths"]["runs"], params["paths"]["reports"]
    args = f"--params {params_file}"
    teacher, seeds, transfer_seeds = (params["teacher"]["run"], params["study"]["seeds"],
                                      params["study"]["transfer_seeds"])
    synthetic = f"{data}/synthetic"
    stages: dict[str, dict] = {
        "plan": {
            "cmd": f"python -m pipeline_src.plan {args}",
            "deps": [os.path.relpath(f, root) for f in params_mod.profile_files(root / params_file)]
                    + stage_code(root, "plan"),
            "outs": list(plan_files(params)),
        },
    }
    if not params["data"]["imagenet_dir"] or not params["data"]["voc_dir"] or not params["data"]["ade20k_dir"]:
        stages["synthetic"] = {
            "cmd": f"python -m pipeline_src.synthetic {args}",
            "deps": [plan_file(params, "synthetic")] + stage_code(root, "synthetic"),
            "outs": [f"{synthetic}/manifest.json", f"{synthetic}/imagenet", f"{synthetic}/VOCdevkit",
                     f"{synthetic}/ADEChallengeData2016"],
        }
    stages["prepare"] = {
        "cmd": f"python -m pipeline_src.prepare {args}",
        "deps": ([] if params["data"]["imagenet_dir"] else [f"{synthetic}/manifest.json"])
                + [plan_file(params, "prepare")] + stage_code(root, "prepare"),
        "outs": [f"{data}/betons/{name}" for name in (*BETONS, "manifest.json")],
    }
    stages["train"] = _run_stage(params, root, args, params["study"]["tables"], False)
    out = f"{runs_dir}/{teacher}/seed${{item}}"
    stages["teacher"] = {  # one job, named by its seed as Snakemake's wildcard names it
        "foreach": [params["teacher"]["seed"]],
        "do": {
            "cmd": f"{LAUNCH_ONE_GPU} pipeline_src.teacher {args} --seed ${{item}}",
            "deps": [f"{data}/betons/{b}" for b in BETONS] + [plan_file(params, "teacher", teacher)]
                    + ([params["teacher"]["checkpoint"]] if params["teacher"]["checkpoint"] else [])
                    + stage_code(root, "teacher"),
            "outs": [f"{out}/model.pt", f"{out}/history.json"],
            "metrics": [f"{out}/metrics.json"],
        },
    }
    stages["distill"] = _run_stage(params, root, args, params["study"]["distilled"], True)
    for group, names in ablation_runs(params).items():
        stages[group] = _run_stage(params, root, args, names, False)
    for task, data_key, folder in (("detection", "voc_dir", "VOCdevkit"),
                                   ("segmentation", "ade20k_dir", "ADEChallengeData2016")):
        stage = f"transfer_{task}"
        out = f"{runs_dir}/transfer/{task}/${{item.backbone}}/seed${{item.seed}}"
        stages[stage] = {
            "matrix": {"backbone": params["transfer"]["backbones"], "seed": transfer_seeds},
            "cmd": f"python -m pipeline_src.transfer.train_{task} {args} "
                   "--backbone ${item.backbone} --seed ${item.seed}",
            "deps": [f"{runs_dir}/${{item.backbone}}/seed${{item.seed}}/model.pt"]
                    + ([] if params["data"][data_key] else [f"{synthetic}/manifest.json"])
                    + [plan_file(params, stage)] + stage_code(root, stage),
            "outs": [f"{out}/model.pt"],
            "metrics": [f"{out}/metrics.json"],
        }
    report_runs = params["study"]["tables"] + params["study"]["distilled"]
    stages["report"] = {
        "cmd": f"python -m pipeline_src.report {args}",
        "deps": [f"{runs_dir}/{run}/seed{seed}/metrics.json" for run in report_runs for seed in seeds]
                + [f"{runs_dir}/{teacher}/seed{params['teacher']['seed']}/metrics.json"]
                + [f"{runs_dir}/transfer/{task}/{backbone}/seed{seed}/metrics.json"
                   for task in ("detection", "segmentation") for backbone in params["transfer"]["backbones"]
                   for seed in transfer_seeds]
                + [plan_file(params, "report")] + stage_code(root, "report"),
        "outs": [f"{reports}/report.md", f"{reports}/report.html"],
    }
    if wdir != ".":
        for stage in stages.values():
            (stage["do"] if "do" in stage else stage)["wdir"] = wdir
    return {"stages": stages}


HEADER = """\
# Generated by `python -m pipeline_src.graph{args}` from the run matrix, paths and stage code
# that the Snakefile uses (tests/test_workflow.py checks that this file is what it generates): edit
# params.yaml or pipeline_src/graph.py, then regenerate. Each job depends on its own settings (a plan
# file written by the `plan` stage) and on the code it runs, so one trick change re-runs the same
# jobs as in Snakemake. After `snakemake` the Snakefile records its outputs here with `dvc commit`.
"""


def dvc_file(params_file: str) -> str:
    """The dvc.yaml of a profile: the repo's own for params.yaml, profiles/<name>/dvc.yaml otherwise."""
    if Path(params_file) == Path(params_mod.DEFAULT_PARAMS):
        return "dvc.yaml"
    return f"profiles/{Path(params_file).stem}/dvc.yaml"


def render(params_file: str = params_mod.DEFAULT_PARAMS, out: str = "dvc.yaml", root: str | Path = ".") -> str:
    """The text of a generated dvc.yaml at `out` (relative to root) for one profile."""
    params = params_mod.load(Path(root) / params_file)
    wdir = os.path.relpath(".", os.path.dirname(out) or ".")
    args = "" if params_file == params_mod.DEFAULT_PARAMS else f" --params {params_file}"
    args += "" if out == "dvc.yaml" else f" --out {out}"
    body = yaml.safe_dump(dvc_yaml(params, params_file, root, wdir), sort_keys=False, width=120)
    return HEADER.format(args=args) + body


def refresh_dvc_file(params_file: str = params_mod.DEFAULT_PARAMS, root: str | Path = ".") -> bool:
    """Rewrite the profile's dvc.yaml when it no longer is what its params generate; True if it did.

    A changed run matrix (study.seeds, the tables, a new run) or stage code changes the graph: the
    Snakefile calls this before its jobs, so its closing `dvc commit` and `dvc repro` see the stages
    Snakemake runs. A profile without a dvc.yaml is left without one (DVC is opt-in there).
    """
    out = dvc_file(params_file)
    path = Path(root) / out
    if not path.is_file():
        return False
    text = render(params_file, out, root)
    if path.read_text() == text:
        return False
    write_text(path, text)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=params_mod.DEFAULT_PARAMS, help="the profile (default: params.yaml)")
    parser.add_argument("--out", help="write this dvc.yaml (profiles/<name>/dvc.yaml for a profile "
                        "other than params.yaml, where the Snakefile looks for it) instead of stdout")
    args = parser.parse_args(argv)

    def body() -> None:
        text = render(args.params, args.out or dvc_file(args.params))
        if args.out:
            write_text(args.out, text)
        else:
            sys.stdout.write(text)

    return run_main("graph", body)


if __name__ == "__main__":
    sys.exit(main())
