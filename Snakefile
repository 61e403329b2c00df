# The stage graph. params.yaml (or `--config params_file=configs/imagenet.yaml`) is the config,
# validated by pipeline_src.params; each rule is a thin call of `python -m pipeline_src.<stage>`.
#
#   synthetic -> prepare -> train[run, seed] ----------------------------------> report
#                              teacher -> train[distilled student, seed] ------/
#   train[backbone] -> transfer_detection (VOC), transfer_segmentation (ADE20K) -/
#   `snakemake ablations` adds the single-trick and leave-one-out runs (and re-renders the report).
from pathlib import Path

from pipeline_src import params as P

PARAMS_FILE = config.get("params_file", "params.yaml")
config.update(P.load(PARAMS_FILE))
DATA, RUNS, REPORTS = config["paths"]["data"], config["paths"]["runs"], config["paths"]["reports"]
PY = "python -m pipeline_src"
ARGS = f"--params {PARAMS_FILE}"
SEEDS = config["study"]["seeds"]
TEACHER = config["teacher"]["run"]
TABLE_RUNS = config["study"]["tables"]
DISTILLED = config["study"]["distilled"]
ABLATION_RUNS = [r for r in P.all_run_names(config) if r.startswith(("single-", "loo-"))]
BACKBONES = config["transfer"]["backbones"]


def run_metrics(runs):
    return expand(f"{RUNS}/{{run}}/seed{{seed}}/metrics.json", run=runs, seed=SEEDS)


def transfer_metrics():
    return expand(f"{RUNS}/transfer/{{task}}/{{backbone}}/seed{{seed}}/metrics.json",
                  task=["detection", "segmentation"], backbone=BACKBONES, seed=SEEDS)


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{REPORTS}/report.md",


rule ablations:
    input:
        run_metrics(ABLATION_RUNS),
        f"{REPORTS}/report.md",
    shell:
        f"{PY}.report {ARGS}"


onsuccess:
    # Record what this run produced in dvc.lock (and the DVC cache), so `dvc status` agrees afterwards.
    stages = ["prepare", "train", "teacher", "distill", "transfer_detection", "transfer_segmentation", "report"]
    if Path(rules.synthetic.output.manifest).exists():
        stages.insert(0, "synthetic")
    if all(Path(p).exists() for p in run_metrics(ABLATION_RUNS)):
        stages += ["single", "loo"]
    shell(f"dvc commit --force --quiet {' '.join(stages)}")
