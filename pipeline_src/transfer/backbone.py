"""Backbones for transfer: a trained classification run's ResNet, loaded as a trunk for detection and
segmentation, and the bookkeeping the two transfer stages share (where a backbone and a result live).

A backbone is `<paths.runs>/<run>/seed<k>/model.pt` written by the train stage. The network is rebuilt
from the checkpoint's own `meta['model']`, and, when the caller passes the run's current
`params['model']`, the two must agree: a checkpoint left over from an older params file would
otherwise fine-tune a different network than the report names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline_src import checkpoint
from pipeline_src.errors import DIVERGED, InputError, run_main
from pipeline_src.io import read_json, sha256
from pipeline_src import params as params_mod
from pipeline_src.models.resnet import ResNet
from pipeline_src.run_folders import run_dir

# The model keys that decide the shape of the weights; `init` and `zero_gamma` only shaped training.
ARCH_KEYS = ("arch", "depth", "variant", "width", "stem_stride")
# Dilation flags for layer2..layer4 by output stride (torchvision's segmentation backbones).
DILATION = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}


class TransferError(InputError, ValueError):
    """A backbone, dataset or device a transfer stage cannot use; the message names it and what to do."""


class Diverged(InputError):
    """A fine-tune whose loss became non-finite."""

    exit_status = DIVERGED


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backbone RUN --seed K` plus the `--params` / `--set` options of every stage."""
    parser.add_argument("--backbone", required=True, help="the classification run to fine-tune, e.g. t5-resnet-d")
    parser.add_argument("--seed", type=int, default=None, help="default: the first of study.seeds")
    params_mod.add_arguments(parser)


def stage_main(argv: list[str] | None, stage: str, description: str, run: Callable[[dict, str, int], dict]) -> int:
    """The CLI of a transfer stage: exit 2 on bad input (the message names the file or key), 3 on divergence."""
    parser = argparse.ArgumentParser(description=description)
    add_stage_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        try:
            run(params, args.backbone, params["study"]["seeds"][0] if args.seed is None else args.seed)
        except FloatingPointError as exc:  # a diverged fine-tune; its MLflow run is marked FAILED
            raise Diverged(str(exc)) from exc

    return run_main(stage, body)

def seed_all(seed: int) -> None:
    """Seed every global RNG a fine-tune draws from (head initialisation, RPN and RoI sampling)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_path(params: dict, run: str, seed: int) -> Path:
    return run_dir(params, run, seed) / checkpoint.FINAL_NAME


def result_dir(params: dict, task: str, run: str, seed: int) -> Path:
    """`<paths.runs>/transfer/<task>/<run>/seed<k>`: the fine-tune's metrics.json and model.pt."""
    return Path(params["paths"]["runs"]) / "transfer" / task / run / f"seed{seed}"


def transfer_recipe(params: dict, task: str, run: str, seed: int) -> str:
    """Fingerprint of what shapes a fine-tune: the task's settings, the backbone run's recipe and
    weights, and the dataset, so a result is never skipped when any of them changed (as train does)."""
    backbone = checkpoint_path(params, run, seed)
    data_key = {"detection": "voc_dir", "segmentation": "ade20k_dir"}[task]
    parts = {
        "task": task,
        "settings": params["transfer"][task],
        "backbone_recipe": params_mod.recipe_of(params_mod.resolve_run(params, run)),
        "backbone_sha256": sha256(backbone) if backbone.is_file() else None,
        "data": params["data"][data_key] or params["synthetic"],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finished_metrics(params: dict, task: str, run: str, seed: int) -> dict | None:
    """The metrics of a fine-tune finished with these very params and backbone weights, else None."""
    out = result_dir(params, task, run, seed)
    metrics = checkpoint.finished_metrics(out, transfer_recipe(params, task, run, seed))
    if metrics is not None:
        print(f"{out}: already finished with these params, skipping (delete it to re-run)")
    return metrics


def stamped(params: dict, task: str, run: str, seed: int, metrics: dict) -> dict:
    """`metrics` with what `finished_metrics` checks: the recipe and the sha256 of the written model.pt."""
    model = result_dir(params, task, run, seed) / checkpoint.FINAL_NAME
    return {**metrics, "recipe": transfer_recipe(params, task, run, seed), "model_sha256": sha256(model)}


def check_backbone_run(params: dict, run: str, seed: int) -> Path:
    """The checkpoint of a backbone run, or a clear error when the run is unknown or not trained."""
    if run not in params_mod.all_run_names(params):
        raise TransferError(
            f"backbone '{run}' is not a run of {params['_source']}; transfer.backbones lists "
            f"{params['transfer']['backbones']}"
        )
    path = checkpoint_path(params, run, seed)
    if not path.is_file():
        raise TransferError(
            f"{path}: backbone checkpoint not found; train it first: "
            f"python -m pipeline_src.train --run {run} --seed {seed}"
        )
    return path


def dataset_root(params: dict, key: str, folder: str) -> Path:
    """`data.<key>` when set, else the embedded `<paths.data>/synthetic/<folder>`; it must exist."""
    given = params["data"][key]
    path = Path(given) if given else Path(params["paths"]["data"]) / "synthetic" / folder
    if not path.is_dir():
        hint = (f"fix data.{key}" if given else
                f"generate the embedded data first (python -m pipeline_src.synthetic) or set data.{key}")
        raise TransferError(f"{path}: dataset folder not found; {hint}")
    return path


def backbone_top1(params: dict, run: str, seed: int) -> float | None:
    """The backbone's ImageNet (or embedded) top-1 from its metrics.json, if the train stage wrote one."""
    path = checkpoint_path(params, run, seed).with_name("metrics.json")
    if not path.is_file():
        return None
    return read_json(path).get("top1")


def normalization(params: dict, run: str) -> tuple[list[float], list[float]]:
    """The backbone run's input mean and std, rescaled to images in [0, 1] as the transfer readers give."""
    augment = params_mod.resolve_run(params, run)["augment"]
    return [m / 255.0 for m in augment["mean"]], [s / 255.0 for s in augment["std"]]


def load_backbone(
    path: Path,
    expected_model: dict | None = None,
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
    stem_stride: int | None = None,
) -> tuple[ResNet, dict]:
    """Our ResNet with the weights of a final model file, without its classifier (`fc` and `avgpool`
    are replaced by identities); returns (trunk, meta).

    `expected_model` (the run's params['model']) must match the checkpoint's architecture.
    `stem_stride` (a task's `stem_stride` key; None: as trained) sets the stem's downsampling: the
    weights do not depend on it, and scenes larger than the classification crops need the paper's 4.
    """
    path = Path(path)
    state_dict, meta = checkpoint.load_model_weights(path)
    model_cfg = meta["model"]
    needed = (*ARCH_KEYS, "init")
    missing = [k for k in needed if k not in model_cfg]
    if missing:
        raise TransferError(f"{path}: meta['model'] lacks key(s) {missing}; it needs {list(needed)}")
    if model_cfg["arch"] != "resnet":
        raise TransferError(
            f"{path}: a {model_cfg['arch']} checkpoint; the transfer stages need a ResNet backbone "
            "(model.arch: resnet), whose named stages they attach the detection and FCN heads to"
        )
    if expected_model is not None:
        differ = {k: (model_cfg[k], expected_model[k]) for k in ARCH_KEYS if model_cfg[k] != expected_model[k]}
        if differ:
            details = ", ".join(f"{k}: checkpoint {a!r}, params {b!r}" for k, (a, b) in differ.items())
            raise TransferError(
                f"{path}: the checkpoint's architecture differs from the run's params ({details}); "
                "the checkpoint is stale: delete its folder and re-train the run"
            )
    if stem_stride is not None:  # the meta then describes the trunk as built, for the fine-tune's model.pt
        model_cfg = {**model_cfg, "stem_stride": stem_stride}
        meta = {**meta, "model": model_cfg}
    model = ResNet(
        model_cfg["depth"], model_cfg["variant"], model_cfg["width"], meta["num_classes"],
        model_cfg["init"], replace_stride_with_dilation=replace_stride_with_dilation,
        stem_stride=model_cfg["stem_stride"],
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise TransferError(
            f"{path}: the weights do not fit the ResNet its meta describes "
            f"({ {k: model_cfg[k] for k in ARCH_KEYS} }, {meta['num_classes']} classes): "
            f"{' '.join(first[:2])}; the file is inconsistent, re-train the run"
        ) from exc
    model.fc = nn.Identity()
    model.avgpool = nn.Identity()
    return model, meta


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics and affine parameters.

    Detection fine-tunes with a few images per batch, too few for batch statistics, so BN is frozen
    at the backbone's values (the common practice of Detectron and torchvision's detection models).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def freeze_stages(model: ResNet, names: tuple[str, ...]) -> None:
    """Stop gradients into the named early stages (generic low-level features, the costliest to train)."""
    for name in names:
        getattr(model, name).requires_grad_(False)
