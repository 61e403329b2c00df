"""FCN (torchvision's `FCN` and `FCNHead`) on our dilated ResNet backbones, with its train and test loops.

The backbone keeps output stride 8 (or 16) by dilating stages 4 and 5 (`backbone.DILATION`), the FCN
head reads layer4, an optional auxiliary head reads layer3, and both are upsampled bilinearly to the
input size. Training follows GluonCV's and torchvision's segmentation references: the shorter side is
rescaled to a random size in scale_range x base_size, a crop_size square is cut at random (padding
with the ignore label where the image is smaller), half the crops are flipped; SGD with the poly
schedule. Evaluation resizes each validation image's shorter side to base_size, predicts, upsamples
the logits back to the image's own size and scores against its full-resolution mask.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.fcn import FCN, FCNHead

from pipeline_src.models.resnet import ResNet
from pipeline_src.transfer import ade20k
from pipeline_src.transfer.metrics import SegmentationMeter


def build_fcn(backbone: ResNet, num_classes: int, aux_loss: bool) -> FCN:
    """FCN heads on a (dilated) backbone: 'out' from layer4 and, with `aux_loss`, 'aux' from layer3."""
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    trunk = IntermediateLayerGetter(backbone, return_layers=return_layers)
    aux = FCNHead(backbone.stage_channels["layer3"], num_classes) if aux_loss else None
    return FCN(trunk, FCNHead(backbone.stage_channels["layer4"], num_classes), aux)


def _normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (image - mean[:, None, None]) / std[:, None, None]


def resize_shorter(image: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize a (C, H, W) tensor so its shorter side is `size` (bilinear for images, nearest for masks)."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    out_size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if mode == "nearest":
        return F.interpolate(image[None].float(), size=out_size, mode="nearest")[0].to(image.dtype)
    return F.interpolate(image[None], size=out_size, mode="bilinear", align_corners=False, antialias=True)[0]


class TrainTransform:
    """Random rescale to scale_range x base_size, random crop of crop_size (padded with ignore), flip."""

    def __init__(self, base_size: int, crop_size: int, scale_range: Sequence[float], mean: Sequence[float],
                 std: Sequence[float], generator: torch.Generator) -> None:
        self.base_size, self.crop_size = base_size, crop_size
        self.scale_range = tuple(scale_range)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.generator = generator

    def _randint(self, low: int, high: int) -> int:
        """A uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.scale_range
        short = self._randint(int(low * self.base_size), int(high * self.base_size))
        image = _normalize(resize_shorter(image, short, "bilinear"), self.mean, self.std)
        mask = resize_shorter(mask[None], short, "nearest")[0]
        h, w = mask.shape
        pad_h, pad_w = max(0, self.crop_size - h), max(0, self.crop_size - w)
        if pad_h or pad_w:  # pad right and bottom: 0 is the mean pixel after normalising
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ade20k.IGNORE_INDEX)
            h, w = mask.shape
        top, left = self._randint(0, h - self.crop_size), self._randint(0, w - self.crop_size)
        image = image[:, top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        if torch.rand(1, generator=self.generator).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def train_loader(records: Sequence[ade20k.ADERecord], num_classes: int, batch_size: int, base_size: int,
                 crop_size: int, scale_range: Sequence[float], mean: Sequence[float], std: Sequence[float],
                 seed: int) -> DataLoader:
    """Shuffled batches of equal-size crops; the order and augmentation follow `seed`."""
    if len(records) < batch_size:
        raise ValueError(
            f"the training split has {len(records)} images, fewer than one batch "
            f"(transfer.segmentation.batch_size={batch_size}); lower the batch size"
        )
    transform = TrainTransform(base_size, crop_size, scale_range, mean, std, torch.Generator().manual_seed(seed))
    dataset = ade20k.ADE20KSegmentation(records, num_classes, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def fcn_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Pixel-wise cross-entropy over labelled pixels, plus aux_weight x that of the auxiliary head."""
    loss = F.cross_entropy(outputs["out"], target, ignore_index=ade20k.IGNORE_INDEX)
    if "aux" in outputs:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"], target, ignore_index=ade20k.IGNORE_INDEX)
    return loss


def poly_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (1 - iter / max_iters) ** power, stepped after every iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, max_iters) / max_iters) ** power)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, aux_weight: float,
                    device: torch.device) -> dict[str, float]:
    """One pass with a scheduler step per iteration; returns the mean loss and images per second."""
    model.train()
    loss_sum, batches, images_seen, start = 0.0, 0, 0, time.perf_counter()
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        loss = fcn_loss(model(images), masks, aux_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"segmentation loss is {loss.item()}; lower transfer.segmentation.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        batches += 1
        images_seen += len(images)
    return {"loss": loss_sum / batches, "images_per_s": images_seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model: nn.Module, records: Sequence[ade20k.ADERecord], num_classes: int, base_size: int,
             mean: Sequence[float], std: Sequence[float], device: torch.device) -> dict:
    """Pixel accuracy and mIoU (fractions) over the full-resolution masks of `records`."""
    model.eval()
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    meter = SegmentationMeter(num_classes)
    for image, mask in ade20k.ADE20KSegmentation(records, num_classes):
        x = _normalize(resize_shorter(image, base_size, "bilinear"), mean_t, std_t)
        logits = model(x[None].to(device))["out"]
        logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        meter.update(logits.argmax(1)[0].cpu(), mask)
    return meter.compute()
