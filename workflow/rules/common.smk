# Input functions of the rules (kept apart from the rules, as `snakemake --lint` asks).


def run_metrics(runs):
    return expand(f"{RUNS}/{{run}}/seed{{seed}}/metrics.json", run=runs, seed=SEEDS)


def transfer_metrics():
    return expand(f"{RUNS}/transfer/{{task}}/{{backbone}}/seed{{seed}}/metrics.json",
                  task=["detection", "segmentation"], backbone=BACKBONES, seed=TRANSFER_SEEDS)


def imagenet_input(wildcards):
    """The embedded data is an input only when data.imagenet_dir is null."""
    return [] if config["data"]["imagenet_dir"] else [rules.synthetic.output.manifest]


def teacher_input(wildcards):
    if "distill" not in params_mod.resolve_run(config, wildcards.run)["run"]["tricks"]:
        return []
    return [f"{RUNS}/{TEACHER}/seed{TEACHER_SEED}/model.pt"]  # one teacher for every student seed


# The synthetic manifest stands for its folders: a folder's mtime moves whenever `dvc commit`
# relinks the files inside it, a file's does not.
def voc_input(wildcards):
    return [] if config["data"]["voc_dir"] else [rules.synthetic.output.manifest]


def ade20k_input(wildcards):
    return [] if config["data"]["ade20k_dir"] else [rules.synthetic.output.manifest]
