"""Stage: fine-tune Faster-RCNN on one backbone run and score it (paper section 6, Table 8).

    python -m pipeline_src.transfer.train_detection --backbone t5-resnet-d --seed 0 [--params FILE] [--set ...]

Trains on VOC 2007+2012 trainval, tests on VOC 2007 test (the embedded look-alike unless
`data.voc_dir` is set) and writes `<paths.runs>/transfer/detection/<backbone>/seed<k>/{model.pt,
metrics.json}`, metrics in percent; a finished fine-tune is skipped. Logged to MLflow as the run
`transfer-detection/<backbone>`.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from pipeline_src import checkpoint, params as P, synthetic, tracking
from pipeline_src.io import write_json
from pipeline_src.transfer import backbone as bb, detection, voc

TASK = "detection"


def voc_data(params: dict) -> tuple[list[str], list[voc.VOCRecord], list[voc.VOCRecord]]:
    """(classes, 07+12 trainval records, 07 test records) of the real VOC or the embedded data."""
    cfg = params["transfer"]["detection"]
    devkit = voc.resolve_devkit(bb.dataset_root(params, "voc_dir", "VOCdevkit"))
    if params["data"]["voc_dir"]:
        classes = list(voc.VOC_CLASSES)
    else:
        classes = synthetic.class_names(params["synthetic"]["classes"])
    train = voc.trainval_0712(devkit, classes, allow_missing_2012=cfg["allow_missing_voc2012"])
    return classes, train, voc.test_07(devkit, classes)


def run(params: dict, backbone: str, seed: int) -> dict:
    """Fine-tune (or skip when finished) and return the metrics written to metrics.json."""
    out = bb.result_dir(params, TASK, backbone, seed)
    finished = bb.finished_metrics(params, TASK, backbone, seed)
    if finished is not None:
        return finished
    start = time.perf_counter()
    cfg = params["transfer"]["detection"]
    ckpt = bb.check_backbone_run(params, backbone, seed)
    classes, train_records, test_records = voc_data(params)
    bb.seed_all(seed)
    device = bb.pick_device(params)
    trunk, meta = bb.load_backbone(ckpt, P.resolve_run(params, backbone)["model"])
    mean, std = bb.normalization(params, backbone)
    model = detection.build_faster_rcnn(trunk, len(classes), cfg, mean, std).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["lr_milestones"], cfg["lr_decay"])
    loader = detection.train_loader(train_records, cfg["batch_size"], cfg["train_difficult"], seed)

    tags = {"task": TASK, "backbone": backbone, "style": cfg["style"], "backbone_checkpoint": str(ckpt)}
    with tracking.start_run(params, f"transfer-{TASK}/{backbone}", seed, tags) as tracker:
        for epoch in range(cfg["epochs"]):
            lr, epoch_start = optimizer.param_groups[0]["lr"], time.perf_counter()
            stats = detection.train_one_epoch(model, loader, optimizer, device)
            scheduler.step()
            stats.update(lr=lr, epoch_time_s=time.perf_counter() - epoch_start)
            tracker.log_metrics(stats, step=epoch)
            print(json.dumps({"task": TASK, "backbone": backbone, "seed": seed, "epoch": epoch, **stats}), flush=True)
        result = detection.evaluate(model, test_records, classes, cfg["metric"], cfg["batch_size"], device)
        metrics = {
            "map": 100 * result["map"],
            "ap": {name: None if ap is None else 100 * ap for name, ap in result["ap"].items()},
            "metric": cfg["metric"],
            "style": cfg["style"],
            "backbone": backbone,
            "backbone_top1": bb.backbone_top1(params, backbone, seed),
            "train_loss": stats["loss"],
            "train_images": len(train_records),
            "test_images": len(test_records),
            "wall_time_s": time.perf_counter() - start,
        }
        checkpoint.save_final_model(out / checkpoint.FINAL_NAME, model.state_dict(), {
            "run": f"transfer-{TASK}/{backbone}", "seed": seed, "task": TASK, "style": cfg["style"],
            "backbone": backbone, "model": meta["model"], "num_classes": len(classes), "wnids": classes,
        })
        metrics = bb.stamped(params, TASK, backbone, seed, metrics)
        write_json(out / "metrics.json", metrics)
        tracker.log_metrics({"map": metrics["map"], "wall_time_s": metrics["wall_time_s"]}, step=cfg["epochs"])
        tracker.log_artifact(out / "metrics.json")
    print(json.dumps({"task": TASK, "backbone": backbone, "seed": seed, "map": metrics["map"],
                      "wall_time_s": metrics["wall_time_s"]}), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return bb.stage_main(argv, "train_detection", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
