# The stage graph. params.yaml (or --config params_file=configs/imagenet.yaml) is the config,
# validated by pipeline_src.params; each rule is a thin call of `python -m pipeline_src.<stage>`.
#
#   synthetic -> prepare -> train[run, seed] (teacher first for distill runs) -> report
#                                       \-> transfer_detection / transfer_segmentation -> report
from pipeline_src import params as P

PARAMS_FILE = config.get("params_file", "params.yaml")
config.update(P.load(PARAMS_FILE))
DATA = config["paths"]["data"]
RUNS = config["paths"]["runs"]
REPORTS = config["paths"]["reports"]
PY = "python -m pipeline_src"
ARGS = f"--params {PARAMS_FILE}"

include: "workflow/rules/data.smk"


rule all:
    default_target: True
    input:
        rules.prepare.output,
