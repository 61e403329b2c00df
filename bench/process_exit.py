"""A stage process's exit with and without `errors.run_main`'s frozen heap, side by side.

Each timed block is a fresh process that imports what a training job imports, runs an empty stage
body, prints the time and exits; the block is the time from that print to the process's end (the
interpreter's shutdown). *Ours* goes through `run_main`, which registers `gc.freeze` at exit;
*plain* runs the same body directly. Alternating (AB BA AB ...):

    .venv/bin/python bench/process_exit.py
    .venv/bin/python bench/process_exit.py --repeats 10 --modules pipeline_src.report
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_JOB_MODULES = ["pipeline_src.train", "pipeline_src.training", "pipeline_src.loader", "pipeline_src.tracking",
                     "torch._dynamo"]  # torch._dynamo: what torch.optim imports when a job builds its optimizer


def child_code(modules: list[str], through_run_main: bool) -> str:
    body = "run_main('bench', body)" if through_run_main else "body()"
    return "\n".join([
        "import time",
        *[f"import {m}" for m in modules],
        "from pipeline_src.errors import run_main",
        "def body():",
        "    print(time.time(), flush=True)",
        body,
    ])


def exit_seconds(code: str) -> float:
    """Seconds from the child's last print to its end, as this process sees them."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    printed = float(proc.stdout.readline())
    proc.wait(timeout=600)
    if proc.returncode:
        raise SystemExit(f"the child process failed (status {proc.returncode}): {code!r}")
    return time.time() - printed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="processes per variant")
    parser.add_argument("--modules", nargs="+", default=TRAIN_JOB_MODULES, help="what each process imports")
    args = parser.parse_args(argv)
    variants = {"ours": child_code(args.modules, True), "plain": child_code(args.modules, False)}
    blocks: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(variants)[::-1]):
            blocks[name].append(exit_seconds(variants[name]))
    median = {name: statistics.median(times) for name, times in blocks.items()}
    result = {
        "modules": args.modules,
        "exit_s": {name: {"median": median[name], "blocks": blocks[name]} for name in blocks},
        "speedup": median["plain"] / median["ours"],
        "saved_s_per_process": median["plain"] - median["ours"],
        "environment": {"load_average_1min": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
