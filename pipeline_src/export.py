"""After training: a final model file as TorchScript or ONNX, to serve without this package.

    python -m pipeline_src.export --checkpoint data/runs/baseline/seed0/model.pt --format torchscript --out model.ts
    python -m pipeline_src.export --checkpoint data/runs/baseline/seed0/model.pt --format onnx --out model.onnx

The exported model takes a float batch (N, 3, res, res), normalized as the val pipeline does
(augment.mean/std), with a free batch size; `res` is `loader.val_res` of the checkpoint's run (or
--res). Before the file is kept its logits are compared with the eager model's on a random batch of
another size: TorchScript reloaded with torch.jit.load, ONNX run by ONNX Runtime (the `export`
extra: onnx, onnxscript, onnxruntime). The output names the largest difference.
TorchScript is deprecated by PyTorch (torch.jit warns in 2.14); it is here for existing C++/mobile users.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline_src import checkpoint, params as params_mod
from pipeline_src.errors import InputError, run_main
from pipeline_src.engine import run_params_of
from pipeline_src.io import atomic_path
from pipeline_src.models import build_model

FORMATS = ("torchscript", "onnx")
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4}  # abs logit difference; ONNX Runtime fuses differently
INPUT, OUTPUT = "images", "logits"


class ExportError(InputError, RuntimeError):
    """An export that cannot be made or does not reproduce the model's logits."""


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    state, meta = checkpoint.load_model_weights(path)
    model = build_model({**meta["model"], "zero_gamma": False}, meta["num_classes"])
    model.load_state_dict(state)
    return model.eval(), meta


def _torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path):
    traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(out))
    return torch.jit.load(str(out))


def _onnx(model: torch.nn.Module, example: torch.Tensor, out: Path):
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError("ONNX export needs the `export` extra: pip install -e '.[export]' "
                          "(onnx, onnxscript, onnxruntime)") from exc
    torch.onnx.export(model, (example,), str(out), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def export(checkpoint_path: Path, fmt: str, out: Path, params: dict, res: int | None = None) -> dict:
    """Write `out` (atomically) and return the check: max |logit difference| on a fresh batch."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    model, meta = load_model(checkpoint_path)
    res = res or run_params_of(params, meta)["loader"]["val_res"]
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, res, res, generator=gen)
    check = torch.randn(3, 3, res, res, generator=gen)  # another batch size: the batch dimension is free
    with atomic_path(out) as tmp, torch.no_grad():
        exported = (_torchscript if fmt == "torchscript" else _onnx)(model, example, tmp)
        diff = (exported(check) - model(check)).abs().max().item()
        if not diff <= TOLERANCE[fmt]:
            raise ExportError(f"{out}: the {fmt} model's logits differ from the checkpoint's by {diff:.3g} "
                              f"(> {TOLERANCE[fmt]}); not written")
    return {"checkpoint": str(checkpoint_path), "format": fmt, "out": str(out), "res": res,
            "num_classes": meta["num_classes"], "max_abs_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a final model file (a run's model.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--res", type=int, default=None, help="input side (default: the run's loader.val_res)")
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        print(json.dumps(export(args.checkpoint, args.format, args.out, params_mod.from_args(args), args.res)))

    return run_main("export", body)


if __name__ == "__main__":
    sys.exit(main())
