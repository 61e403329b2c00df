"""Stage: train one named run of params.yaml for one seed (the loop and its tricks: training.py).

    python -m pipeline_src.train --run baseline --seed 0 [--params FILE] [--set key=value ...]
    torchrun --nproc_per_node 2 -m pipeline_src.train -- --run efficient   # DDP (NCCL / gloo)

(The `--` keeps torchrun's own parser from reading `--run` as an abbreviation of its `--run-path`.)
Outputs: data/runs/<run>/seed<k>/{last.pt, model.pt, history.json, metrics.json}; a run whose --set
overrides change its recipe writes to data/runs/adhoc/<run>-<hash>/seed<k>/ or --out DIR instead.
"""
from __future__ import annotations

import argparse
import sys

from pipeline_src import distributed, params as params_mod
from pipeline_src.errors import run_main
from pipeline_src.training import train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run name from params.yaml (runs, single-*, loo-*)")
    parser.add_argument("--seed", type=int, default=None, help="default: the first of study.seeds")
    parser.add_argument("--out", default=None, help="output folder (default: paths.runs/<run>/seed<k>, or "
                        "paths.runs/adhoc/<run>-<hash>/seed<k> when --set changes the run's recipe)")
    params_mod.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        run_params = params_mod.resolve_run(params, args.run)
        try:
            train(run_params, args.run, params["study"]["seeds"][0] if args.seed is None else args.seed, args.out)
        finally:
            distributed.teardown()

    return run_main("train", body)


if __name__ == "__main__":
    sys.exit(main())
