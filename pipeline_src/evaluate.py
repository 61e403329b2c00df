"""After training: top-1 / top-5 of a final model file on a val beton or an ILSVRC-layout val folder.

    python -m pipeline_src.evaluate --checkpoint data/runs/baseline/seed0/model.pt --data data/betons/val.beton
    python -m pipeline_src.evaluate --checkpoint model.pt --data /imagenet/val [--out scores.json]

A beton goes through the loader's val pipeline. A folder of `<wnid>/*.JPEG` class folders (ILSVRC's
val/ sorted into classes, as prepare reads it) goes through PIL with the same box: the centred square
of side `loader.val_crop_ratio` x the shorter side, resized to `loader.val_res` (PIL's BOX filter:
area averaging, as the OpenCV INTER_AREA resize of the ffcv decoder when shrinking), normalized by
`augment.mean/std`. The settings are the params file's, resolved for the checkpoint's run if the file
defines it; the scores are fp32 and printed as one JSON line (and written to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline_src import checkpoint, params as params_mod
from pipeline_src.engine import evaluate, pick_device, run_params_of
from pipeline_src.errors import InputError, run_main
from pipeline_src.io import IMAGE_SUFFIXES, write_json
from pipeline_src.loader import make_val_loader
from pipeline_src.models import build_model


class EvaluateError(InputError, ValueError):
    """Data that cannot be scored with this checkpoint; the message names the path and the fix."""


def center_crop(image: Image.Image, res: int, ratio: float) -> Image.Image:
    """ffcv's CenterCropRGBImageDecoder box: the centred square of side int(ratio * shorter side)."""
    width, height = image.size
    side = int(ratio * min(width, height))
    top, left = (height - side) // 2, (width - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((res, res), Image.BOX)


class ValFolder(torch.utils.data.Dataset):
    """`<wnid>/<image>` class folders, labelled by the checkpoint's class list."""

    def __init__(self, root: Path, wnids: list[str], params: dict) -> None:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise EvaluateError(f"{root}: no class folders; expected <wnid>/*.JPEG (sort a flat ILSVRC val/ "
                                "into class folders, or pass the val beton that prepare wrote)")
        unknown = [p.name for p in folders if p.name not in wnids]
        if unknown:
            raise EvaluateError(f"{root}: class folder(s) {unknown[:10]} are not among the checkpoint's "
                                f"{len(wnids)} classes (meta.wnids); is this the dataset it was trained on?")
        index = {w: i for i, w in enumerate(wnids)}
        self.items = [(p, index[folder.name]) for folder in folders for p in sorted(folder.iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not self.items:
            raise EvaluateError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
        loader, augment = params["loader"], params["augment"]
        self.res, self.ratio = loader["val_res"], loader["val_crop_ratio"]
        self.mean = torch.tensor(augment["mean"]).view(3, 1, 1)
        self.std = torch.tensor(augment["std"]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as image:
            crop = center_crop(image.convert("RGB"), self.res, self.ratio)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, label


def score(checkpoint_path: Path, data: Path, params: dict) -> dict:
    """top1 / top5 / val_loss (and the image count) of `checkpoint_path` on `data`."""
    state, meta = checkpoint.load_model_weights(checkpoint_path)
    run_params = run_params_of(params, meta)
    model = build_model({**meta["model"], "zero_gamma": False}, meta["num_classes"])
    model.load_state_dict(state)
    device = pick_device(run_params)
    model = model.to(device)
    if run_params["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    batch = run_params["train"]["batch_size"]
    if data.is_dir():
        loader = torch.utils.data.DataLoader(ValFolder(data, meta["wnids"], run_params), batch_size=batch,
                                             num_workers=run_params["loader"]["num_workers"])
        loader = ((x.to(device), y.to(device)) for x, y in loader)
    elif data.is_file() and data.suffix == ".beton":
        loader = make_val_loader(data, run_params, batch, device)
    elif not data.exists():
        raise EvaluateError(f"{data}: no such file or folder")
    else:
        raise EvaluateError(f"{data}: not a .beton file nor a folder of <wnid>/ class folders")
    scores = evaluate(model, loader, run_params, device, "fp32", meta["num_classes"])
    return {"checkpoint": str(checkpoint_path), "data": str(data), "run": meta.get("run"), **scores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a final model file (a run's model.pt)")
    parser.add_argument("--data", required=True, type=Path, help="a val .beton, or a folder of <wnid>/ folders")
    parser.add_argument("--out", type=Path, default=None, help="also write the scores to this JSON file")
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        result = score(args.checkpoint, args.data, params_mod.from_args(args))
        if args.out is not None:
            write_json(args.out, result)
        print(json.dumps(result))

    return run_main("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
