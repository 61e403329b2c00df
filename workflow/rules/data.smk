# Data: the embedded synthetic datasets (only when no real data is configured), then FFCV betons.


rule synthetic:
    output:
        manifest=f"{DATA}/synthetic/manifest.json",
        imagenet=directory(f"{DATA}/synthetic/imagenet"),
        voc=directory(f"{DATA}/synthetic/VOCdevkit"),
        ade20k=directory(f"{DATA}/synthetic/ADEChallengeData2016"),
    params:
        settings=graph.stage_settings(config, "synthetic"),
        code=CODE["synthetic"],
    log:
        "logs/synthetic/synthetic.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        f"{PY}.synthetic {ARGS}{LOGGED}"


rule prepare:
    input:
        imagenet_input,
    output:
        train=f"{DATA}/betons/train.beton",
        val=f"{DATA}/betons/val.beton",
        classes=f"{DATA}/betons/classes.json",
        manifest=f"{DATA}/betons/manifest.json",
    params:
        settings=graph.stage_settings(config, "prepare"),
        code=CODE["prepare"],
    log:
        "logs/prepare/prepare.log",
    benchmark:
        "benchmarks/prepare/prepare.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        f"{PY}.prepare {ARGS}{LOGGED}"
