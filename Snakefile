# The stage graph. params.yaml (or `--config params_file=configs/imagenet.yaml`) is the config,
# validated by pipeline_src.params; each rule is a thin call of `python -m pipeline_src.<stage>`.
#
#   synthetic -> prepare -> train[run, seed] ----------------------------------> report
#                              teacher[teacher.seed] -> train[distilled student, seed] -/
#   train[backbone, transfer seed] -> transfer_detection (VOC), transfer_segmentation (ADE20K) -/
#   `snakemake ablations` adds the single-trick and leave-one-out runs (and re-renders the report).
import sys
from pathlib import Path

from pipeline_src import graph
from pipeline_src import params as params_mod

PARAMS_FILE = config.get("params_file", "params.yaml")
config.update(params_mod.load(PARAMS_FILE))
DATA, RUNS, REPORTS = config["paths"]["data"], config["paths"]["runs"], config["paths"]["reports"]
PY = "python -m pipeline_src"
ARGS = f"--params {PARAMS_FILE}"
SEEDS = config["study"]["seeds"]
TRANSFER_SEEDS = config["study"]["transfer_seeds"]
TEACHER, TEACHER_SEED = config["teacher"]["run"], config["teacher"]["seed"]
TABLE_RUNS = config["study"]["tables"]
DISTILLED = config["study"]["distilled"]
ABLATION_RUNS = [r for r in params_mod.all_run_names(config) if r.startswith(("single-", "loo-"))]
BACKBONES = config["transfer"]["backbones"]
# Each job's code is a tracked input: the hash of the files its stage imports (pipeline_src.graph,
# which also lists them as DVC deps), so editing pipeline_src/training.py re-runs the training jobs.
CODE = {stage: graph.code_hash(workflow.basedir, stage) for stage in graph.STAGE_MODULES}
# Every job's stdout and stderr go to its log (`log:`), which Snakemake names when the job fails.
LOGGED = " > {log} 2>&1"


include: "workflow/rules/common.smk"
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
    log:
        "logs/ablations/report.log",
    conda:
        "workflow/envs/pipeline.yaml"
    shell:
        f"{PY}.report {ARGS}{LOGGED}"


onstart:
    # dvc.yaml is generated from the params (pipeline_src.graph): after an edit of the run matrix
    # (study.seeds, the tables) it is rewritten here, before the jobs, not found stale at the end.
    if graph.refresh_dvc_file(PARAMS_FILE):
        print(f"{graph.dvc_file(PARAMS_FILE)}: regenerated from {PARAMS_FILE} (its stages changed)", file=sys.stderr)


onsuccess:
    # Record what this run produced in dvc.lock (and the DVC cache), so `dvc status` agrees afterwards.
    # The plan files are DVC's copy of the settings each job ran with (Snakemake's `params:`).
    # Only the dvc.yaml generated for this profile (`python -m pipeline_src.graph`) records its outputs.
    # The report with its upstream stages is one DVC target (dvc.lock is parsed and written once per
    # target: nine named groups took 57 s on the default run, this one 16 s, the same dvc.lock).
    dvc_file = graph.dvc_file(PARAMS_FILE)
    targets = [f"{dvc_file}:report"]
    if all(Path(p).exists() for p in run_metrics(ABLATION_RUNS)):
        targets += [f"{dvc_file}:single", f"{dvc_file}:loo"]
    if Path(dvc_file).exists():
        shell(f"{PY}.plan {ARGS} > /dev/null && dvc commit --force --quiet --with-deps {' '.join(targets)}")
