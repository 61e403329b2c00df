# Training: one job per (run, seed); students of the distillation wait for the teacher's weights.
import json


def run_recipe(run):
    """The run's fully resolved settings: a change re-runs exactly the runs it touches."""
    return json.dumps(P.recipe_of(P.resolve_run(config, run)), sort_keys=True)


def teacher_input(wildcards):
    if "distill" not in P.resolve_run(config, wildcards.run)["run"]["tricks"]:
        return []
    return [f"{RUNS}/{TEACHER}/seed{wildcards.seed}/model.pt"]


# launch.nodes > 1: the slurm plugin's `mpi` path (no srun around the job: the launcher runs one srun
# task per node itself); tasks_per_gpu=0 keeps the plugin from reading `tasks` as --ntasks-per-gpu.
TRAIN_NODES = {"nodes": config["launch"]["nodes"]}
if config["launch"]["nodes"] > 1:
    TRAIN_NODES.update(mpi="srun", tasks=config["launch"]["nodes"], tasks_per_gpu=0)
LAUNCH = "--gpus {resources.gpu} --nodes {resources.nodes}"


rule train:
    input:
        rules.prepare.output.train,
        rules.prepare.output.val,
        rules.prepare.output.classes,
        teacher_input,
    output:
        model=f"{RUNS}/{{run}}/seed{{seed}}/model.pt",
        history=f"{RUNS}/{{run}}/seed{{seed}}/history.json",
        metrics=f"{RUNS}/{{run}}/seed{{seed}}/metrics.json",
    params:
        recipe=lambda wildcards: run_recipe(wildcards.run),
    wildcard_constraints:
        run="[A-Za-z0-9_.-]+",  # no slash: transfer/... belongs to the transfer rules
        seed=r"\d+",
    resources:
        gpu=1,  # per node; pipeline_src.launch runs one process per GPU and gives local jobs their own GPUs
        **TRAIN_NODES,
    threads: config["loader"]["num_workers"]
    shell:
        f"{PY}.launch {LAUNCH} -- pipeline_src.train {ARGS} --run {{wildcards.run}} --seed {{wildcards.seed}}"
