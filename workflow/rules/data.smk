# Data: the embedded synthetic datasets (only when no real data is configured), then FFCV betons.


rule synthetic:
    output:
        manifest=f"{DATA}/synthetic/manifest.json",
        imagenet=directory(f"{DATA}/synthetic/imagenet"),
        voc=directory(f"{DATA}/synthetic/VOCdevkit"),
        ade20k=directory(f"{DATA}/synthetic/ADEChallengeData2016"),
    params:
        synthetic=config["synthetic"],
    shell:
        f"{PY}.synthetic {ARGS}"


def imagenet_input(wildcards):
    """The embedded data is an input only when data.imagenet_dir is null."""
    return [] if config["data"]["imagenet_dir"] else [rules.synthetic.output.manifest]


rule prepare:
    input:
        imagenet_input,
    output:
        train=f"{DATA}/betons/train.beton",
        val=f"{DATA}/betons/val.beton",
        classes=f"{DATA}/betons/classes.json",
        manifest=f"{DATA}/betons/manifest.json",
    params:
        data=config["data"],
        prepare=config["prepare"],
    shell:
        f"{PY}.prepare {ARGS}"
