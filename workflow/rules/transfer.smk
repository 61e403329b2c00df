# Transfer (section 6): Faster-RCNN on VOC and FCN on ADE20K, fine-tuned from the classification runs.


# The synthetic manifest stands for its folders: a folder's mtime moves whenever `dvc commit`
# relinks the files inside it, a file's does not.
def voc_input(wildcards):
    return [] if config["data"]["voc_dir"] else [rules.synthetic.output.manifest]


def ade20k_input(wildcards):
    return [] if config["data"]["ade20k_dir"] else [rules.synthetic.output.manifest]


rule transfer_detection:
    input:
        backbone=f"{RUNS}/{{backbone}}/seed{{seed}}/model.pt",
        data=voc_input,
    output:
        model=f"{RUNS}/transfer/detection/{{backbone}}/seed{{seed}}/model.pt",
        metrics=f"{RUNS}/transfer/detection/{{backbone}}/seed{{seed}}/metrics.json",
    params:
        detection=config["transfer"]["detection"],
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    shell:
        f"{PY}.transfer.train_detection {ARGS} --backbone {{wildcards.backbone}} --seed {{wildcards.seed}}"


rule transfer_segmentation:
    input:
        backbone=f"{RUNS}/{{backbone}}/seed{{seed}}/model.pt",
        data=ade20k_input,
    output:
        model=f"{RUNS}/transfer/segmentation/{{backbone}}/seed{{seed}}/model.pt",
        metrics=f"{RUNS}/transfer/segmentation/{{backbone}}/seed{{seed}}/metrics.json",
    params:
        segmentation=config["transfer"]["segmentation"],
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    shell:
        f"{PY}.transfer.train_segmentation {ARGS} --backbone {{wildcards.backbone}} --seed {{wildcards.seed}}"


ruleorder: transfer_detection > transfer_segmentation > teacher > train
