"""The training step under a preloaded allocator (`launch.allocator`) vs glibc's malloc, side by side.

An allocator is chosen when a process starts (LD_PRELOAD), so each timed block is a fresh
`bench/train_step.py` process on the params file's model, batch and resolution (one thread, as a
training job of the CPU profile runs), with and without the library, alternating (AB BA AB ...).

    .venv/bin/python bench/allocator.py                      # tcmalloc vs system, the CPU profile
    .venv/bin/python bench/allocator.py --allocator jemalloc --repeats 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_src import launch  # noqa: E402
from pipeline_src import params as params_mod  # noqa: E402


def step_command(params: dict, steps: int) -> list[str]:
    """bench/train_step.py on the params' model, batch and crop, fp32 on one thread, one timed block."""
    model, train = params["model"], params["train"]
    return [sys.executable, str(REPO / "bench" / "train_step.py"), "--params", params["_source"],
            "--depth", str(model["depth"]), "--width", str(model["width"]), "--stem-stride", str(model["stem_stride"]),
            "--batch", str(train["batch_size"]), "--res", str(params["loader"]["res"]),
            "--classes", str(params["synthetic"]["classes"]), "--threads", "1", "--precision", "fp32",
            "--steps", str(steps), "--repeats", "1", "--warmup", "3"]


def images_per_s(command: list[str], env: dict) -> float:
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out)["results"][0]["ours"]["images_per_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", choices=sorted(launch.ALLOCATOR_LIBRARIES), default="tcmalloc")
    parser.add_argument("--repeats", type=int, default=4, help="timed blocks (processes) per allocator")
    parser.add_argument("--steps", type=int, default=10, help="train steps per block")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args(argv)
    params = params_mod.load(args.params)
    system = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    preload = launch.allocator_env(args.allocator, system)
    if not preload:
        parser.error(f"{launch.ALLOCATOR_LIBRARIES[args.allocator]} is not installed "
                     f"({launch.ALLOCATOR_PACKAGES[args.allocator]})")
    envs = {"system": system, args.allocator: {**system, **preload}}
    command = step_command(params, args.steps)
    blocks: dict[str, list[float]] = {name: [] for name in envs}
    for repeat in range(args.repeats):
        for name in (list(envs) if repeat % 2 == 0 else list(envs)[::-1]):
            blocks[name].append(images_per_s(command, envs[name]))
            print(f"block {repeat}: {name} {blocks[name][-1]:.1f} images/s", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in blocks.items()}
    result = {
        "speedup": median[args.allocator] / median["system"],
        "speedup_paired": statistics.median(a / s for a, s in zip(blocks[args.allocator], blocks["system"])),
        "images_per_s": median,
        "blocks": blocks,
        "settings": {"allocator": args.allocator, "library": preload["LD_PRELOAD"].split()[0],
                     "params": str(args.params), "command": command[1:]},
        "environment": {"load_average_1min": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
