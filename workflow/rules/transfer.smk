# Transfer (section 6): Faster-RCNN on VOC and FCN on ADE20K, fine-tuned from the classification runs.


rule transfer_detection:
    input:
        backbone=f"{RUNS}/{{backbone}}/seed{{seed}}/model.pt",
        data=voc_input,
    output:
        model=f"{RUNS}/transfer/detection/{{backbone}}/seed{{seed}}/model.pt",
        metrics=f"{RUNS}/transfer/detection/{{backbone}}/seed{{seed}}/metrics.json",
    params:
        settings=graph.stage_settings(config, "transfer_detection"),
        code=CODE["transfer_detection"],
    log:
        "logs/transfer_detection/{backbone}-seed{seed}.log",
    benchmark:
        "benchmarks/transfer_detection/{backbone}-seed{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    shell:
        f"{PY}.transfer.train_detection {ARGS} --backbone {{wildcards.backbone}} --seed {{wildcards.seed}}{LOGGED}"


rule transfer_segmentation:
    input:
        backbone=f"{RUNS}/{{backbone}}/seed{{seed}}/model.pt",
        data=ade20k_input,
    output:
        model=f"{RUNS}/transfer/segmentation/{{backbone}}/seed{{seed}}/model.pt",
        metrics=f"{RUNS}/transfer/segmentation/{{backbone}}/seed{{seed}}/metrics.json",
    params:
        settings=graph.stage_settings(config, "transfer_segmentation"),
        code=CODE["transfer_segmentation"],
    log:
        "logs/transfer_segmentation/{backbone}-seed{seed}.log",
    benchmark:
        "benchmarks/transfer_segmentation/{backbone}-seed{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    shell:
        f"{PY}.transfer.train_segmentation {ARGS} --backbone {{wildcards.backbone}} --seed {{wildcards.seed}}{LOGGED}"


ruleorder: transfer_detection > transfer_segmentation > teacher > train
