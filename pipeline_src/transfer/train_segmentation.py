"""Stage: fine-tune an FCN on one backbone run and score it (paper section 6, Table 9).

    python -m pipeline_src.transfer.train_segmentation --backbone t5-resnet-d --seed 0 [--params FILE] [--set ...]

Trains on ADE20K training, tests on ADE20K validation (the embedded look-alike unless
`data.ade20k_dir` is set) and writes `<paths.runs>/transfer/segmentation/<backbone>/seed<k>/
{model.pt, metrics.json}`, pixel accuracy and mIoU in percent; a finished fine-tune is skipped.
Logged to MLflow as the run `transfer-segmentation/<backbone>`.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from pipeline_src import checkpoint, params as P, tracking
from pipeline_src.io import write_json
from pipeline_src.transfer import ade20k, backbone as bb, segmentation

TASK = "segmentation"


def ade_data(params: dict) -> tuple[int, list[ade20k.ADERecord], list[ade20k.ADERecord]]:
    """(num_classes, training records, validation records): 150 classes for ADE20K, else the embedded."""
    root = ade20k.resolve_root(bb.dataset_root(params, "ade20k_dir", "ADEChallengeData2016"))
    num_classes = ade20k.ADE20K_NUM_CLASSES if params["data"]["ade20k_dir"] else params["synthetic"]["classes"]
    return num_classes, ade20k.read_split(root, "training"), ade20k.read_split(root, "validation")


def run(params: dict, backbone: str, seed: int) -> dict:
    """Fine-tune (or skip when finished) and return the metrics written to metrics.json."""
    out = bb.result_dir(params, TASK, backbone, seed)
    finished = bb.finished_metrics(params, TASK, backbone, seed)
    if finished is not None:
        return finished
    start = time.perf_counter()
    cfg = params["transfer"]["segmentation"]
    ckpt = bb.check_backbone_run(params, backbone, seed)
    num_classes, train_records, val_records = ade_data(params)
    bb.seed_all(seed)
    device = bb.pick_device(params)
    trunk, meta = bb.load_backbone(ckpt, P.resolve_run(params, backbone)["model"],
                                   replace_stride_with_dilation=bb.DILATION[cfg["output_stride"]])
    mean, std = bb.normalization(params, backbone)
    model = segmentation.build_fcn(trunk, num_classes, cfg["aux_loss"]).to(device)
    loader = segmentation.train_loader(train_records, num_classes, cfg["batch_size"], cfg["base_size"],
                                       cfg["crop_size"], cfg["scale_range"], mean, std, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = segmentation.poly_scheduler(optimizer, cfg["epochs"] * len(loader), cfg["poly_power"])

    tags = {"task": TASK, "backbone": backbone, "backbone_checkpoint": str(ckpt)}
    with tracking.start_run(params, f"transfer-{TASK}/{backbone}", seed, tags) as tracker:
        for epoch in range(cfg["epochs"]):
            lr, epoch_start = optimizer.param_groups[0]["lr"], time.perf_counter()
            stats = segmentation.train_one_epoch(model, loader, optimizer, scheduler, cfg["aux_weight"], device)
            stats.update(lr=lr, epoch_time_s=time.perf_counter() - epoch_start)
            tracker.log_metrics(stats, step=epoch)
            print(json.dumps({"task": TASK, "backbone": backbone, "seed": seed, "epoch": epoch, **stats}), flush=True)
        result = segmentation.evaluate(model, val_records, num_classes, cfg["base_size"], mean, std, device)
        metrics = {
            "pixel_accuracy": 100 * result["pixel_accuracy"],
            "miou": 100 * result["miou"],
            "iou": [None if v is None else 100 * v for v in result["iou"]],
            "num_classes": num_classes,
            "output_stride": cfg["output_stride"],
            "backbone": backbone,
            "backbone_top1": bb.backbone_top1(params, backbone, seed),
            "train_loss": stats["loss"],
            "train_images": len(train_records),
            "val_images": len(val_records),
            "wall_time_s": time.perf_counter() - start,
        }
        checkpoint.save_final_model(out / checkpoint.FINAL_NAME, model.state_dict(), {
            "run": f"transfer-{TASK}/{backbone}", "seed": seed, "task": TASK, "backbone": backbone,
            "output_stride": cfg["output_stride"], "model": meta["model"], "num_classes": num_classes,
            "wnids": [str(c + 1) for c in range(num_classes)],  # the raw ADE label of each channel
        })
        metrics = bb.stamped(params, TASK, backbone, seed, metrics)
        write_json(out / "metrics.json", metrics)
        tracker.log_metrics({k: metrics[k] for k in ("pixel_accuracy", "miou", "wall_time_s")}, step=cfg["epochs"])
        tracker.log_artifact(out / "metrics.json")
    print(json.dumps({"task": TASK, "backbone": backbone, "seed": seed, "pixel_accuracy": metrics["pixel_accuracy"],
                      "miou": metrics["miou"], "wall_time_s": metrics["wall_time_s"]}), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return bb.stage_main(argv, "train_segmentation", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
