"""Stage: the distillation teacher, trained as the run `teacher.run` or imported from `teacher.checkpoint`.

    python -m pipeline_src.teacher --seed 0 [--params FILE] [--set teacher.checkpoint=FILE]

Either way the teacher ends up at data/runs/<teacher.run>/seed<k>/model.pt with its measured val
top-1 in metrics.json (and in MLflow) before any student trains, so a bad teacher is seen early.
--set overrides that change the teacher run's recipe send it to its ad-hoc folder (run_folders.py),
where students trained with the same overrides look for it. teacher.checkpoint is a final model
file of this pipeline or a torchvision/timm resnet50/101/152 state dict (models/torchvision_resnet.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline_src import checkpoint, params as params_mod, tracking
from pipeline_src.errors import InputError, run_main
from pipeline_src.loader import make_val_loader
from pipeline_src.models import build_model, torchvision_resnet
from pipeline_src.run_folders import output_dir
from pipeline_src.engine import betons_dir, evaluate, read_classes, write_run_outputs
from pipeline_src.training import train


class TeacherError(InputError):
    """A teacher checkpoint that does not fit the teacher run or the betons' classes."""


def _torchvision_state(obj: object) -> dict | None:
    """A torchvision/timm ResNet state dict, bare or wrapped as {'state_dict': ...} / {'model': ...}."""
    if torchvision_resnet.is_torchvision_resnet(obj):
        return obj
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and "meta" not in obj and torchvision_resnet.is_torchvision_resnet(obj.get(key)):
            return obj[key]
    return None


def read_teacher_file(source: Path, wnids: list[str]) -> tuple[dict, dict]:
    """(state_dict, meta) of our final model file, or of a torchvision/timm resnet50/101/152 state dict.

    A torchvision file names no classes; its class i is taken to be the betons' class i (the
    sorted wnids, the order of torchvision's ImageNet weights); the class count is still checked.
    """
    obj = checkpoint.load_file(source)
    if isinstance(obj, dict) and {"state_dict", "meta"} <= set(obj):
        return checkpoint.final_model_of(obj, source)
    tv_state = _torchvision_state(obj)
    if tv_state is None:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise checkpoint.CheckpointError(
            f"{source}: unknown teacher format (top-level keys {keys}); teacher.checkpoint takes a final "
            "model file of this pipeline (keys 'state_dict' and 'meta', e.g. a run's model.pt) or a "
            "torchvision/timm resnet50/101/152 state dict (keys conv1.weight, bn1.*, layer1.0.*, fc.weight)"
        )
    try:
        state, model, classes = torchvision_resnet.convert(tv_state)
    except torchvision_resnet.TorchvisionFormatError as exc:
        raise checkpoint.CheckpointError(f"{source}: a torchvision-style ResNet state dict, but {exc}") from exc
    print(f"{source}: torchvision ResNet-{model['depth']} state dict, mapped to ResNet-B; its {classes} "
          "outputs are taken to be the betons' classes in classes.json order")
    return state, {"model": model, "num_classes": classes, "wnids": wnids if classes == len(wnids) else []}


def import_teacher(params: dict, seed: int, out: str | Path | None = None) -> dict:
    """Check a user's checkpoint against the teacher run's architecture and class count, measure it."""
    source = Path(params["teacher"]["checkpoint"])
    wnids = read_classes(params)
    state, meta = read_teacher_file(source, wnids)
    expected = params["model"]
    # A stem stride changes no weight shape, so load_state_dict cannot catch it; a checkpoint that
    # names none has the paper's stem (stride 4), as torchvision's and timm's ResNets do.
    found = {"stem_stride": 4, **meta.get("model", {})}
    mismatched = {k: (found[k], expected[k]) for k in ("arch", "depth", "variant", "width", "stem_stride")
                  if k in found and found[k] != expected[k]}
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs params {b!r}" for k, (a, b) in mismatched.items())
        raise TeacherError(f"{source}: teacher architecture does not match run '{params['run']['name']}' ({detail}); "
                           "fix the runs.<teacher>.set / model keys or point teacher.checkpoint elsewhere")
    if meta["num_classes"] != len(wnids):
        raise TeacherError(f"{source}: teacher has {meta['num_classes']} classes but the betons have {len(wnids)}; "
                           "a teacher must be trained on the same classes as its students")
    if meta["wnids"] != wnids:
        raise TeacherError(f"{source}: teacher classes {meta['wnids']} differ from "
                           f"{betons_dir(params) / 'classes.json'} {wnids}; a teacher must be trained on the same "
                           "classes, in the same order, as its students")
    model = build_model({**expected, "zero_gamma": False}, len(wnids))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TeacherError(f"{source}: weights do not fit {expected} with {len(wnids)} classes: "
                           f"{str(exc).splitlines()[0]}") from exc
    device = torch.device("cpu")
    val = make_val_loader(betons_dir(params) / "val.beton", params, params["train"]["batch_size"], device)
    scores = evaluate(model, val, params, device, "fp32", len(wnids), keep_gaps=True)
    out = output_dir(params, params["run"]["name"], seed, out)
    metrics = {"top1": scores["top1"], "top5": scores["top5"], "val_loss": scores["val_loss"],
               "source": str(source)}
    tags = {"run": params["run"]["name"], "seed": str(seed), "profile": params["profile"]["name"],
            "teacher_source": str(source), "run_dir": str(out)}
    meta = {"run": params["run"]["name"], "seed": seed, "model": expected, "num_classes": len(wnids), "wnids": wnids}
    with tracking.start_run(params, params["run"]["name"], seed, tags, resume=False) as tracker:
        return write_run_outputs(out, params, seed, model.state_dict(), meta, metrics, scores, tracker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="default: teacher.seed")
    parser.add_argument("--out", default=None, help="output folder (default: as the train stage chooses)")
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        run_params = params_mod.resolve_run(params, params["teacher"]["run"])
        seed = params["teacher"]["seed"] if args.seed is None else args.seed
        if params["teacher"]["checkpoint"]:  # always re-checked: a stale import is never trusted
            metrics = import_teacher(run_params, seed, args.out)
        else:
            metrics = train(run_params, run_params["run"]["name"], seed, args.out)
        if metrics:
            print(f"teacher {run_params['run']['name']} seed {seed}: val top-1 {metrics['top1']:.2f}%")

    return run_main("teacher", body)


if __name__ == "__main__":
    sys.exit(main())
