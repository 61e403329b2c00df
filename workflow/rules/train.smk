# Training: one job per (run, seed); students of the distillation wait for the teacher's weights.
# A job's `settings` are its run's fully resolved recipe: a change re-runs exactly the runs it touches.


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
        settings=lambda wildcards: G.stage_settings(config, "train", wildcards.run),
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
        gpu=1,
    threads: config["loader"]["num_workers"]
    shell:
        f"{PY}.train {ARGS} --run {{wildcards.run}} --seed {{wildcards.seed}}{LOGGED}"
