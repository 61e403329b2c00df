# Training: one job per (run, seed); students of the distillation wait for the teacher's weights.
# A job's `settings` are its run's fully resolved recipe: a change re-runs exactly the runs it touches.


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
        settings=lambda wildcards: graph.stage_settings(config, "train", wildcards.run),
        code=CODE["train"],
    wildcard_constraints:
        run="[A-Za-z0-9_.-]+",  # no slash: transfer/... belongs to the transfer rules
        seed=r"\d+",
    log:
        "logs/train/{run}-seed{seed}.log",
    benchmark:
        "benchmarks/train/{run}-seed{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        gpu=1,  # per node; pipeline_src.launch runs one process per GPU and gives local jobs their own GPUs
        **TRAIN_NODES,
    threads: config["loader"]["num_workers"]
    shell:
        f"{PY}.launch {LAUNCH} -- pipeline_src.train {ARGS} --run {{wildcards.run}} --seed {{wildcards.seed}}{LOGGED}"
