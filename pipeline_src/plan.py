"""DVC's view of the settings: one small file per job with exactly the settings it depends on.

DVC tracks a file by its content, so after one trick change only the plan files of the runs using
that trick change, and only those runs' stages are stale (Snakemake gets the same text as `params:`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_src import params as params_mod
from pipeline_src.errors import run_main
from pipeline_src.graph import plan_files
from pipeline_src.io import write_text


def write_plan(params: dict) -> list[str]:
    """Write every plan file whose content changed; return those written."""
    written = []
    for path, text in plan_files(params).items():
        target = Path(path)
        if not target.is_file() or target.read_text() != text + "\n":
            write_text(target, text + "\n")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        written = write_plan(params)
        print(f"plan: {len(written)} of {len(plan_files(params))} files changed")

    return run_main("plan", body)


if __name__ == "__main__":
    sys.exit(main())
