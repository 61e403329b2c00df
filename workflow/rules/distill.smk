# Distillation: the teacher is its own stage (trained, or imported from teacher.checkpoint and
# measured); the students' train jobs depend on its weights, so a new teacher re-runs only them.


rule teacher:
    input:
        rules.prepare.output.train,
        rules.prepare.output.val,
        rules.prepare.output.classes,
        ([config["teacher"]["checkpoint"]] if config["teacher"]["checkpoint"] else []),
    output:
        model=f"{RUNS}/{TEACHER}/seed{{seed}}/model.pt",
        history=f"{RUNS}/{TEACHER}/seed{{seed}}/history.json",
        metrics=f"{RUNS}/{TEACHER}/seed{{seed}}/metrics.json",
    params:
        settings=graph.stage_settings(config, "teacher", TEACHER),
        code=CODE["teacher"],
    log:
        "logs/teacher/seed{seed}.log",
    benchmark:
        "benchmarks/teacher/seed{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        gpu=1,
        **TRAIN_NODES,
    threads: config["loader"]["num_workers"]
    shell:
        f"{PY}.launch {LAUNCH} -- pipeline_src.teacher {ARGS} --seed {{wildcards.seed}}{LOGGED}"


ruleorder: teacher > train
