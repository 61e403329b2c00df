"""Stage: fine-tune an FCN on one backbone run and score it (paper section 6, Table 9).

    python -m pipeline_src.transfer.train_segmentation --backbone t5-resnet-d --seed 0 [--params FILE] [--set ...]

Trains on ADE20K training, tests on ADE20K validation (the embedded look-alike unless
`data.ade20k_dir` is set) and writes `<paths.runs>/transfer/segmentation/<backbone>/seed<k>/
{model.pt, metrics.json}`, pixel accuracy and mIoU (over all classes; `miou_present` over those that
appear, see `metrics.py`) in percent; a finished fine-tune is skipped.
Logged to MLflow as the run `transfer-segmentation/<backbone>`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline_src import params as params_mod
from pipeline_src.transfer import ade20k, backbone as backbone_mod, finetune, segmentation

TASK = "segmentation"


def ade_data(params: dict) -> tuple[int, list[ade20k.ADERecord], list[ade20k.ADERecord]]:
    """(num_classes, training records, validation records): 150 classes for ADE20K, else the embedded."""
    root = ade20k.resolve_root(backbone_mod.dataset_root(params, "ade20k_dir", "ADEChallengeData2016"))
    num_classes = ade20k.ADE20K_NUM_CLASSES if params["data"]["ade20k_dir"] else params["synthetic"]["classes"]
    return num_classes, ade20k.read_split(root, "training"), ade20k.read_split(root, "validation")


def build(params: dict, backbone: str, seed: int, ckpt: Path, device: torch.device) -> finetune.FineTune:
    """An FCN on the dilated backbone, SGD with the poly schedule per iteration, scored by mIoU."""
    cfg = params["transfer"][TASK]
    num_classes, train_records, val_records = ade_data(params)
    trunk, meta = backbone_mod.load_backbone(ckpt, params_mod.resolve_run(params, backbone)["model"],
                                             replace_stride_with_dilation=backbone_mod.DILATION[cfg["output_stride"]],
                                             stem_stride=cfg["stem_stride"])
    mean, std = backbone_mod.normalization(params, backbone)
    model = segmentation.build_fcn(trunk, num_classes, cfg["aux_loss"]).to(device)
    loader = segmentation.train_loader(train_records, num_classes, cfg["batch_size"], cfg["base_size"],
                                       cfg["crop_size"], cfg["scale_range"], mean, std, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = segmentation.poly_scheduler(optimizer, cfg["epochs"] * len(loader), cfg["poly_power"])

    def train_epoch() -> dict[str, float]:
        return segmentation.train_one_epoch(model, loader, optimizer, scheduler, cfg["aux_weight"], device)

    def evaluate() -> dict:
        result = segmentation.evaluate(model, val_records, num_classes, cfg["base_size"], mean, std, device)
        return {
            "pixel_accuracy": 100 * result["pixel_accuracy"],
            "miou": 100 * result["miou"],
            "miou_present": 100 * result["miou_present"],
            "iou": [None if v is None else 100 * v for v in result["iou"]],
            "num_classes": num_classes,
            "output_stride": cfg["output_stride"],
            "train_images": len(train_records),
            "val_images": len(val_records),
        }

    return finetune.FineTune(
        model, optimizer, train_epoch, evaluate, headline=("pixel_accuracy", "miou"), tags={},
        meta={"output_stride": cfg["output_stride"], "model": meta["model"], "num_classes": num_classes,
              "wnids": [str(c + 1) for c in range(num_classes)]},  # the raw ADE label of each channel
    )


def run(params: dict, backbone: str, seed: int) -> dict:
    """Fine-tune (or skip when finished) and return the metrics written to metrics.json."""
    return finetune.run(params, TASK, backbone, seed, build)


def main(argv: list[str] | None = None) -> int:
    return backbone_mod.stage_main(argv, "train_segmentation", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
