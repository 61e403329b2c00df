"""Benchmark: what distillation costs per training step, student images/s with and without the teacher.

Both variants run the pipeline's own `train.train_one_epoch` on the same student (one model, one
optimizer): without a teacher it is the plain soft-target cross entropy; with one, the teacher's
forward (eval mode, no_grad, under the same autocast) and `tricks.distillation.distillation_loss`.
The teacher is built as `train.load_teacher` builds it (random weights: they do not change the
cost). Defaults follow the params profile: the student is --student-run (t6-label-smoothing, i.e.
t6-distill without its teacher), the teacher is teacher.run, batch = the student run's
train.batch_size, resolution = loader.res, classes = synthetic.classes, precision = what the
pipeline would really use for the student run on this machine (train.cpu_amp). Timed blocks
alternate the two variants, flipping the order every repeat, and each figure is the median.

    python bench/distill.py [--params params.yaml] [--student-run t6-label-smoothing]
                            [--student-depth D] [--student-width W] [--teacher-depth D] [--teacher-width W]
                            [--batch B] [--res R] [--steps 3] [--warmup 2] [--repeats 5] [--threads 2]

Prints one JSON object; `speedup` = images/s without / with the teacher (how many times slower
distillation trains), `distill_cost` = 1 - with / without (the fraction of throughput it takes).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# bench/ is on sys.path when this runs as a script; importing train_step also puts the repo there.
from train_step import (CPU, REPO, environment, interleave, nonnegative, paired_ratio, pipeline_block,
                        positive, synthetic_batch)

from pipeline_src import params as params_mod
from pipeline_src.models import build_model
from pipeline_src.tricks.mixed_precision import effective_precision


def override(model_cfg: dict, depth: int | None, width: float | None) -> dict:
    """A copy of params['model'] with the depth and width given on the command line."""
    out = dict(model_cfg)
    if depth is not None:
        out["depth"] = depth
    if width is not None:
        out["width"] = width
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--student-run", default="t6-label-smoothing", help="run whose recipe the student takes")
    parser.add_argument("--teacher-run", default=None, help="default: teacher.run of the params file")
    parser.add_argument("--student-depth", type=int, default=None)
    parser.add_argument("--student-width", type=float, default=None)
    parser.add_argument("--teacher-depth", type=int, default=None)
    parser.add_argument("--teacher-width", type=float, default=None)
    parser.add_argument("--batch", type=positive, default=None, help="default: the student run's train.batch_size")
    parser.add_argument("--res", type=positive, default=None, help="default: loader.res")
    parser.add_argument("--classes", type=positive, default=None, help="default: synthetic.classes")
    parser.add_argument("--teacher-channels-last", action="store_true",
                        help="convert the teacher to channels_last (train.load_teacher leaves it NCHW)")
    parser.add_argument("--precision", choices=["amp", "fp32"], default=None,
                        help="default: the student run's precision as the pipeline applies it here (train.cpu_amp)")
    parser.add_argument("--steps", type=positive, default=3, help="train steps per timed block")
    parser.add_argument("--warmup", type=nonnegative, default=2, help="untimed steps per variant before the blocks")
    parser.add_argument("--repeats", type=positive, default=5, help="timed blocks per variant")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--lr", type=float, default=0.01, help="constant LR (cost-neutral)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and synthetic batch")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        params = params_mod.load(args.params)
        teacher_run = args.teacher_run or params["teacher"]["run"]
        student_params = params_mod.resolve_run(params, args.student_run)
        teacher_params = params_mod.resolve_run(params, teacher_run)
    except params_mod.ParamsError as exc:
        parser.error(str(exc))
    student_params["model"] = override(student_params["model"], args.student_depth, args.student_width)
    teacher_model_cfg = override(teacher_params["model"], args.teacher_depth, args.teacher_width)
    train_cfg = student_params["train"]
    batch_size = args.batch or train_cfg["batch_size"]
    res = args.res or student_params["loader"]["res"]
    classes = args.classes or params["synthetic"]["classes"]
    precision = args.precision or effective_precision(CPU, train_cfg["precision"], train_cfg["cpu_amp"])

    torch.manual_seed(args.seed)
    try:
        student = build_model(student_params["model"], classes)
        # as train.load_teacher: zero_gamma off (weights are loaded there), eval, frozen, default layout
        teacher = build_model({**teacher_model_cfg, "zero_gamma": False}, classes).eval().requires_grad_(False)
    except ValueError as exc:
        parser.error(f"--student-depth/--student-width/--teacher-depth/--teacher-width: {exc}")
    if train_cfg["channels_last"]:
        student = student.to(memory_format=torch.channels_last)
    if args.teacher_channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    net = torch.compile(student) if train_cfg["compile"] else student
    batch = synthetic_batch(batch_size, res, classes, args.seed)
    timed = interleave({
        "without_teacher": pipeline_block(net, None, student_params, precision, args.lr, batch, classes),
        "with_teacher": pipeline_block(net, teacher, student_params, precision, args.lr, batch, classes),
    }, args.steps, args.warmup, args.repeats)
    without, with_ = timed["without_teacher"]["images_per_s"], timed["with_teacher"]["images_per_s"]

    def describe(model_cfg: dict, run: str) -> dict:
        return {"run": run, **{k: model_cfg[k] for k in ("arch", "depth", "variant", "width")}}

    result = {
        "benchmark": "distill",
        "speedup": round(without / with_, 3),
        "distill_cost": round(1 - with_ / without, 3),
        "speedup_paired": paired_ratio(timed["without_teacher"], timed["with_teacher"]),
        **timed,
        "settings": {
            "student": describe(student_params["model"], args.student_run),
            "teacher": describe(teacher_model_cfg, teacher_run),
            "batch": batch_size, "res": res, "classes": classes, "precision": precision,
            "channels_last": train_cfg["channels_last"], "teacher_channels_last": args.teacher_channels_last,
            "compile": train_cfg["compile"],
            "temperature": student_params["distill"]["temperature"],
            "distill_weight": student_params["distill"]["weight"],
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "lr": args.lr,
            "params": str(args.params),
        },
        "environment": environment(args.threads),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
