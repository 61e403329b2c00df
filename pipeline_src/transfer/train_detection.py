"""Stage: fine-tune Faster-RCNN on one backbone run and score it (paper section 6, Table 8).

    python -m pipeline_src.transfer.train_detection --backbone t5-resnet-d --seed 0 [--params FILE] [--set ...]

Trains on VOC 2007+2012 trainval, tests on VOC 2007 test (the embedded look-alike unless
`data.voc_dir` is set) and writes `<paths.runs>/transfer/detection/<backbone>/seed<k>/{model.pt,
metrics.json}`, metrics in percent; a finished fine-tune is skipped. Logged to MLflow as the run
`transfer-detection/<backbone>`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline_src import params as params_mod, synthetic
from pipeline_src.transfer import backbone as backbone_mod, detection, finetune, voc

TASK = "detection"


def voc_data(params: dict) -> tuple[list[str], list[voc.VOCRecord], list[voc.VOCRecord]]:
    """(classes, 07+12 trainval records, 07 test records) of the real VOC or the embedded data."""
    cfg = params["transfer"]["detection"]
    devkit = voc.resolve_devkit(backbone_mod.dataset_root(params, "voc_dir", "VOCdevkit"))
    if params["data"]["voc_dir"]:
        classes = list(voc.VOC_CLASSES)
    else:
        classes = synthetic.class_names(params["synthetic"]["classes"])
    train = voc.trainval_0712(devkit, classes, allow_missing_2012=cfg["allow_missing_voc2012"])
    return classes, train, voc.test_07(devkit, classes)


def build(params: dict, backbone: str, seed: int, ckpt: Path, device: torch.device) -> finetune.FineTune:
    """Faster-RCNN on the backbone, SGD with step decay per epoch, scored by VOC AP."""
    cfg = params["transfer"][TASK]
    classes, train_records, test_records = voc_data(params)
    trunk, meta = backbone_mod.load_backbone(ckpt, params_mod.resolve_run(params, backbone)["model"],
                                             stem_stride=cfg["stem_stride"])
    mean, std = backbone_mod.normalization(params, backbone)
    model = detection.build_faster_rcnn(trunk, len(classes), cfg, mean, std).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["lr_milestones"], cfg["lr_decay"])
    loader = detection.train_loader(train_records, cfg["batch_size"], cfg["train_difficult"], seed)

    def train_epoch() -> dict[str, float]:
        stats = detection.train_one_epoch(model, loader, optimizer, device)
        scheduler.step()
        return stats

    def evaluate() -> dict:
        result = detection.evaluate(model, test_records, classes, cfg["metric"], cfg["batch_size"], device)
        return {
            "map": 100 * result["map"],
            "ap": {name: None if ap is None else 100 * ap for name, ap in result["ap"].items()},
            "metric": cfg["metric"],
            "style": cfg["style"],
            "train_images": len(train_records),
            "test_images": len(test_records),
        }

    return finetune.FineTune(
        model, optimizer, train_epoch, evaluate, headline=("map",), tags={"style": cfg["style"]},
        meta={"style": cfg["style"], "model": meta["model"], "num_classes": len(classes), "wnids": classes},
    )


def run(params: dict, backbone: str, seed: int) -> dict:
    """Fine-tune (or skip when finished) and return the metrics written to metrics.json."""
    return finetune.run(params, TASK, backbone, seed, build)


def main(argv: list[str] | None = None) -> int:
    return backbone_mod.stage_main(argv, "train_detection", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
