"""Faster-RCNN (torchvision's implementation) on our ResNet backbones, with its train and test loops.

Two styles:
  c4   the paper's detector (Ren et al. 2015 on ResNet, as GluonCV's `faster_rcnn_resnet50_v1b_voc`):
       stages up to layer3 (stride 16) give the one feature map for the RPN and the RoI pooling
       (RoIAlign 14 x 14); stage 5 (layer4, which strides the RoIs to 7 x 7) plus a global average
       pool is the box head.
  fpn  torchvision's `BackboneWithFPN` over layer1..layer4 with its default box head and RoI pooling.

BN is frozen (the batches hold a few images) and `transfer.detection.frozen_stages` are not trained;
anchors, RPN and RoI sampling are `transfer.detection` keys too (the profiles say where each value
comes from).
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from pipeline_src.models.resnet import ResNet
from pipeline_src.transfer import voc
from pipeline_src.transfer.backbone import freeze_batchnorm, freeze_stages
from pipeline_src.transfer.metrics import Detection, GroundTruth, evaluate_detections

STYLES = ("c4", "fpn")
FPN_CHANNELS = 256  # torchvision's default for every FPN level
# transfer.detection keys passed to torchvision's FasterRCNN under the same name
FASTER_RCNN_KEYS = (
    "min_size", "max_size",
    "rpn_batch_size_per_image", "rpn_positive_fraction",
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "box_batch_size_per_image", "box_positive_fraction",
    "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
    "box_fg_iou_thresh", "box_bg_iou_thresh", "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
)


class C5BoxHead(nn.Module):
    """Stage 5 of the backbone over each pooled RoI, then global average pooling: (R, C5) features."""

    def __init__(self, layer4: nn.Module) -> None:
        super().__init__()
        self.layer4 = layer4
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layer4(rois)), 1)


def build_faster_rcnn(
    backbone: ResNet,
    num_classes: int,
    cfg: dict,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> FasterRCNN:
    """Faster-RCNN on a loaded backbone (BN frozen, `frozen_stages` fixed) as the `transfer.detection`
    section `cfg` describes; `num_classes` excludes the background, which torchvision adds as label 0."""
    style = cfg["style"]
    if style not in STYLES:
        raise ValueError(f"transfer.detection.style must be one of {list(STYLES)}, got {style!r}")
    freeze_batchnorm(backbone)
    freeze_stages(backbone, tuple(cfg["frozen_stages"]))
    sizes, ratios = tuple(cfg["anchor_sizes"]), tuple(cfg["aspect_ratios"])
    common = dict(image_mean=list(image_mean), image_std=list(image_std),
                  **{key: cfg[key] for key in FASTER_RCNN_KEYS})
    if style == "c4":
        trunk = IntermediateLayerGetter(backbone, return_layers={"layer3": "0"})
        trunk.out_channels = backbone.stage_channels["layer3"]
        return FasterRCNN(
            trunk,
            rpn_anchor_generator=AnchorGenerator((sizes,), (ratios,)),
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
            box_head=C5BoxHead(backbone.layer4),
            box_predictor=FastRCNNPredictor(backbone.stage_channels["layer4"], num_classes + 1),
            **common,
        )
    stages = ("layer1", "layer2", "layer3", "layer4")
    fpn = BackboneWithFPN(
        backbone,
        return_layers={name: str(i) for i, name in enumerate(stages)},
        in_channels_list=[backbone.stage_channels[name] for name in stages],
        out_channels=FPN_CHANNELS,
    )
    # one size per level: the four stages and the extra max-pooled level
    anchors = AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes))
    return FasterRCNN(fpn, num_classes=num_classes + 1, rpn_anchor_generator=anchors, **common)


class TrainTransform:
    """Training targets and augmentation: drop difficult objects unless kept, flip half the images."""

    def __init__(self, keep_difficult: bool, generator: torch.Generator) -> None:
        self.keep_difficult = keep_difficult
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if not self.keep_difficult:
            keep = ~target["difficult"]
            target = {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep],
                      "difficult": target["difficult"][keep]}
        if torch.rand(1, generator=self.generator).item() < 0.5:
            width = image.shape[-1]
            boxes = target["boxes"]
            image = image.flip(-1)
            target = {**target, "boxes": torch.stack([width - boxes[:, 2], boxes[:, 1],
                                                      width - boxes[:, 0], boxes[:, 3]], dim=1)}
        return image, target


def train_loader(records: Sequence[voc.VOCRecord], batch_size: int, keep_difficult: bool,
                 seed: int) -> DataLoader:
    """Shuffled batches of (images, targets) tuples; the order and flips follow `seed`."""
    dataset = voc.VOCDetection(records, TrainTransform(keep_difficult, torch.Generator().manual_seed(seed)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=voc.detection_collate,
                      generator=torch.Generator().manual_seed(seed))


def train_one_epoch(model: FasterRCNN, loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> dict[str, float]:
    """One pass; returns the mean of each torchvision loss term, their sum and images per second."""
    model.train()
    sums: dict[str, float] = {}
    images_seen, batches, start = 0, 0, time.perf_counter()
    for images, targets in loader:
        images = [img.to(device) for img in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} }); "
                                     "lower transfer.detection.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in {**losses, "loss": loss}.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        images_seen += len(images)
        batches += 1
    stats = {key: value / batches for key, value in sums.items()}
    stats["images_per_s"] = images_seen / (time.perf_counter() - start)
    return stats


@torch.no_grad()
def predict(model: FasterRCNN, records: Sequence[voc.VOCRecord], batch_size: int,
            device: torch.device) -> list[Detection]:
    """Detections on the original image coordinates, labels 0-based into the class list."""
    model.eval()
    loader = DataLoader(voc.VOCDetection(records), batch_size=batch_size, collate_fn=voc.detection_collate)
    detections = []
    for images, targets in loader:
        outputs = model([img.to(device) for img in images])
        for target, out in zip(targets, outputs):
            image_id = records[int(target["image_id"])].image_id
            for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
                detections.append(Detection(image_id, label - (voc.BACKGROUND + 1), score, tuple(box)))
    return detections


def evaluate(model: FasterRCNN, records: Sequence[voc.VOCRecord], classes: Sequence[str], metric: str,
             batch_size: int, device: torch.device) -> dict:
    """VOC AP per class and mAP (fractions) on `records`, difficult objects ignored."""
    ground_truth = {r.image_id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    return evaluate_detections(predict(model, records, batch_size, device), ground_truth, classes, metric)
