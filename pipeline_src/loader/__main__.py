"""Time a loader on a beton: `python -m pipeline_src.loader --beton B [--split train|val] [--batches N]`.

Prints JSON: batches, images, seconds and images/s (the first batch, with numba compilation, is
not timed). Batch size is train.batch_size, the device is loader.device, as in training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline_src import params as params_mod
from pipeline_src.engine import EngineInputError, pick_device

from .pipelines import LoaderError, make_train_loader, make_val_loader, measure_throughput


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    params_mod.add_arguments(parser)
    parser.add_argument("--beton", type=Path, required=True, help="a beton written by the prepare stage")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--batches", type=int, default=None, help="stop after N batches (default: whole epochs)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        params = params_mod.from_args(args)
        device = pick_device(params)
        batch = params["train"]["batch_size"]
        if args.split == "train":
            loader = make_train_loader(args.beton, params, batch, args.seed, device)
        else:
            loader = make_val_loader(args.beton, params, batch, device)
        stats = measure_throughput(loader, args.batches, args.epochs)
    except (params_mod.ParamsError, LoaderError, EngineInputError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    result = {"beton": str(args.beton), "split": args.split, "device": str(device), "batch_size": batch, **stats}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
