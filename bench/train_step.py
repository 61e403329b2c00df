"""Benchmark: training images/s of our step against a plain eager fp32 NCHW loop of the same model.

Ours is the pipeline's own `train.train_one_epoch` (bf16 autocast on CPU via
`tricks.mixed_precision.autocast_context(device, 'amp')`, channels_last, SGD Nesterov over
`tricks.no_bias_decay.param_groups`, soft-target cross entropy), optionally `torch.compile`d as
`train.train` does. Plain is the textbook loop: `F.cross_entropy` on integer labels, SGD, fp32, NCHW.
Both start from the same initial weights and train on the same synthetic batch (no loader: this
measures the step). Timed blocks alternate ours/plain, the order flipping every repeat (AB BA AB
...), so drift and other processes on the machine hit both; each variant's figure is its median.

    python bench/train_step.py [--depth 26] [--width 1.0] [--stem-stride 4] [--batch 64] [--res 64 96] [--steps 3]
                               [--warmup 2] [--repeats 5] [--threads 2] [--compile]

Prints one JSON object; `speedup` = ours / plain images/s, the smallest over the resolutions.
Each resolution also reports the FLOPs of one step (torch's FlopCounterMode: forward + backward),
the GFLOP/s each loop achieves, the fraction of a measured peak (a large fp32 GEMM on the same
threads, timed in the same run) and, with --profile, where a step of ours spends its time
(torch.profiler, top ops by self CPU time).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_src import params as params_mod  # noqa: E402
from pipeline_src.models import build_model  # noqa: E402
from pipeline_src.engine import build_optimizer  # noqa: E402
from pipeline_src.training import build_batch_transform, build_criterion, train_one_epoch  # noqa: E402
from pipeline_src.tricks.mixed_precision import effective_precision, make_grad_scaler  # noqa: E402

CPU = torch.device("cpu")

# Runs `steps` train steps and returns the number of images they processed; one call per timed block.
Block = Callable[[int], int]


def cpuinfo_field(name: str) -> str:
    """The first `name : value` line of /proc/cpuinfo ('' where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def cpu_bf16_support() -> dict:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX); without it autocast emulates it."""
    flags = set(cpuinfo_field("flags").split())
    info: dict = {flag: flag in flags for flag in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    info["native_bf16"] = info["avx512_bf16"] or info["amx_bf16"]
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def environment(threads: int) -> dict:
    """What the figures depend on besides the settings."""
    return {
        "torch": torch.__version__,
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpuinfo_field("model name"),
        "cpu_bf16": cpu_bf16_support(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def synthetic_batch(batch: int, res: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalized-looking images (NCHW, as the loader yields them) and integer labels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, res, res, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


def step_flops(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """FLOPs of one forward + backward of `model` on `batch` (convs, matmuls: what FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(probe(batch[0]), batch[1]).backward()
    return counter.get_total_flops()


def gemm_peak_gflops(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """A practical peak: the best fp32 GEMM rate of `repeats` timed `size`-cube matmuls on these threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def profile_step(block: "Block", steps: int, top: int = 8) -> list[dict]:
    """The ops of `steps` steps of a block that take the most self CPU time, as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(steps)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]]


def pipeline_block(model: nn.Module, teacher: nn.Module | None, params: dict, precision: str, lr: float,
                   batch: tuple[torch.Tensor, torch.Tensor], classes: int) -> Block:
    """`steps` iterations of the pipeline's own train_one_epoch on one repeated batch.

    The LR is constant: its value does not change the cost of a step.
    """
    optimizer = build_optimizer(model, params["train"], lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = make_grad_scaler(CPU, precision)
    criterion = build_criterion(teacher, params["distill"])
    batch_transform = build_batch_transform(params["train"], classes, torch.Generator().manual_seed(0))

    def run(steps: int) -> int:
        train_one_epoch(model, [batch] * steps, criterion, batch_transform, optimizer, scheduler, scaler, params,
                        device=CPU, precision=precision, epoch=0)
        return steps * batch[0].shape[0]

    return run


def plain_block(model: nn.Module, train_cfg: dict, lr: float, batch: tuple[torch.Tensor, torch.Tensor]) -> Block:
    """The reference loop with none of our tricks: eager, fp32, NCHW, hard-label cross entropy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"])
    images, labels = batch

    def run(steps: int) -> int:
        model.train()
        for _ in range(steps):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        return steps * images.shape[0]

    return run


def interleave(blocks: dict[str, Block], steps: int, warmup: int, repeats: int) -> dict[str, dict]:
    """Warm each variant up, then time `repeats` blocks of each, alternating and flipping the order.

    Returns per variant the median images/s, every block's images/s and the warm-up seconds
    (which hold torch.compile's compilation when it is on).
    """
    names = list(blocks)
    out: dict[str, dict] = {name: {"blocks": []} for name in names}
    for name in names:
        start = time.perf_counter()
        if warmup:
            blocks[name](warmup)
        out[name]["warmup_s"] = round(time.perf_counter() - start, 2)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            images = blocks[name](steps)
            out[name]["blocks"].append(round(images / (time.perf_counter() - start), 2))
    for name in names:
        out[name]["images_per_s"] = round(statistics.median(out[name]["blocks"]), 2)
    return out


def paired_ratio(a: dict, b: dict) -> float:
    """Median over repeats of a's block / b's block from the same repeat: robust to load that drifts."""
    return round(statistics.median(x / y for x, y in zip(a["blocks"], b["blocks"])), 3)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=26)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem-stride", type=int, choices=(1, 2, 4), default=4,
                        help="model.stem_stride (4: the paper's stem; the CPU profile's 32 px crops use 1)")
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--res", type=positive, nargs="+", default=[64, 96])
    parser.add_argument("--classes", type=positive, default=1000, help="classifier outputs (ImageNet: 1000)")
    parser.add_argument("--steps", type=positive, default=3, help="train steps per timed block")
    parser.add_argument("--warmup", type=nonnegative, default=2, help="untimed steps per variant before the blocks")
    parser.add_argument("--repeats", type=positive, default=5, help="timed blocks per variant")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model, as train.compile does")
    parser.add_argument("--precision", choices=["amp", "fp32"], default="amp",
                        help="our step's precision (amp = bf16 autocast on CPU, used even where "
                             "train.cpu_amp: native_only would make the pipeline fall back to fp32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="our step's train.channels_last")
    parser.add_argument("--lr", type=float, default=0.01, help="constant LR of both loops (cost-neutral)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and synthetic batch")
    parser.add_argument("--profile", action="store_true", help="also break one block of ours down by op")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="model arch/variant/init and optimizer momentum/decay come from here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        params = params_mod.load(args.params, [
            f"model.depth={args.depth}", f"model.width={args.width}", f"model.stem_stride={args.stem_stride}",
            f"train.batch_size={args.batch}",
            f"train.precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
            f"train.compile={str(args.compile).lower()}", "train.no_bias_decay=true", "train.mixup_alpha=0.0",
        ])
    except params_mod.ParamsError as exc:
        parser.error(str(exc))
    env = environment(args.threads)
    if args.precision == "amp" and not env["cpu_bf16"]["native_bf16"]:
        print("warning: this CPU has no avx512_bf16 / amx_bf16: bf16 autocast is emulated, expect our step "
              "to be slower than fp32 and this run to take long (try --steps 1 --repeats 1 --res 64)",
              file=sys.stderr)

    peak = gemm_peak_gflops(args.threads)
    results = []
    for res in args.res:
        torch.manual_seed(args.seed)
        plain_model = build_model(params["model"], args.classes)
        ours_model = copy.deepcopy(plain_model)  # same initial weights
        if args.channels_last:
            ours_model = ours_model.to(memory_format=torch.channels_last)
        if args.compile:
            torch._dynamo.reset()
        net = torch.compile(ours_model) if args.compile else ours_model
        batch = synthetic_batch(args.batch, res, args.classes, args.seed)
        flops_per_image = step_flops(plain_model, batch) / args.batch
        blocks = {
            "ours": pipeline_block(net, None, params, args.precision, args.lr, batch, args.classes),
            "plain": plain_block(plain_model, params["train"], args.lr, batch),
        }
        timed = interleave(blocks, args.steps, args.warmup, args.repeats)
        for name in timed:
            gflops = timed[name]["images_per_s"] * flops_per_image / 1e9
            timed[name].update(gflops=round(gflops, 2), fraction_of_peak=round(gflops / peak, 3))
        results.append({"res": res, "step_gflop_per_image": round(flops_per_image / 1e9, 4), **timed,
                        "speedup": round(timed["ours"]["images_per_s"] / timed["plain"]["images_per_s"], 3),
                        "speedup_paired": paired_ratio(timed["ours"], timed["plain"]),
                        **({"profile_ours": profile_step(blocks["ours"], args.steps)} if args.profile else {})})
        print(f"res {res}: ours {timed['ours']['images_per_s']} vs plain {timed['plain']['images_per_s']} "
              "images/s", file=sys.stderr, flush=True)

    m = params["model"]
    result = {
        "benchmark": "train_step",
        "speedup": min(r["speedup"] for r in results),
        "speedup_by_res": {str(r["res"]): r["speedup"] for r in results},
        "results": results,
        "peak_gflops": peak,
        "peak_note": f"best fp32 1024^3 GEMM on {args.threads} thread(s), this run",
        "settings": {
            "arch": m["arch"], "depth": m["depth"], "variant": m["variant"], "width": m["width"],
            "stem_stride": m["stem_stride"],
            "init": m["init"], "classes": args.classes, "batch": args.batch, "res": args.res,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "lr": args.lr,
            "ours": {"precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
                     "optimizer": f"SGD nesterov={params['train']['nesterov']}, no_bias_decay param_groups",
                     "loss": "soft-target CE"},
            "plain": {"precision": "fp32", "channels_last": False, "compile": False,
                      "optimizer": "SGD", "loss": "cross_entropy"},
            "params": str(args.params),
            "pipeline_precision_for_amp": effective_precision(CPU, "amp", params["train"]["cpu_amp"]),
        },
        "environment": env,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
