"""Where a training run writes: the pipeline's folder holds only the params file's own recipe.

`paths.runs/<run>/seed<k>/` is what the report tabulates and Snakemake/DVC track, so only the recipe
that the params file itself gives a run name may land there. A run whose `--set` overrides change
that recipe (say `train.epochs=1`) goes to `paths.runs/adhoc/<run>-<recipe hash[:12]>/seed<k>/`, or
to `--out DIR`: the same overrides find the same folder again (resume, skip), and a quick try never
replaces a published result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_src import params as P
from pipeline_src.errors import InputError

ADHOC = "adhoc"


class RunFolderError(InputError, ValueError):
    """An output folder that would mix an ad-hoc recipe into the pipeline's results."""


def run_dir(params: dict, run: str, seed: int) -> Path:
    """The pipeline's folder of (run, seed)."""
    return Path(params["paths"]["runs"]) / run / f"seed{seed}"


def adhoc_dir(params: dict, run: str, seed: int, recipe: str) -> Path:
    return Path(params["paths"]["runs"]) / ADHOC / f"{run}-{recipe[:12]}" / f"seed{seed}"


def is_adhoc(cfg: dict, run: str) -> bool:
    """Whether `cfg` (resolved with --set overrides) trains another recipe than the params file gives `run`."""
    return P.recipe_hash(cfg) != P.recipe_hash(P.resolve_run(P.load(cfg["_source"]), run))


def _value(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def with_same_overrides(cfg: dict, run: str) -> dict:
    """`run` resolved from `cfg`'s params file with the --set overrides that made `cfg`.

    A student trained with `--set train.epochs=1` distils from the teacher trained with the same
    `--set`, so the two find each other's folders. --set values always win over a run's own
    overrides, so `cfg` still holds each of them; JSON is YAML, so they parse back unchanged.
    """
    sets = [f"{key}={json.dumps(_value(cfg, key))}" for key in cfg["_sets"]]
    return P.resolve_run(P.load(cfg["_source"], sets), run)


def output_dir(cfg: dict, run: str, seed: int, out: str | Path | None = None) -> Path:
    """The pipeline's run folder for the params file's own recipe, else its ad-hoc folder or `out`."""
    pipeline = run_dir(cfg, run, seed)
    adhoc = is_adhoc(cfg, run)
    if out is None:
        return adhoc_dir(cfg, run, seed, P.recipe_hash(cfg)) if adhoc else pipeline
    out = Path(out)
    if adhoc and out.resolve() == pipeline.resolve():
        raise RunFolderError(
            f"--out {out} is the pipeline's folder of run '{run}', but the --set overrides change its "
            f"recipe from {cfg['_source']}'s; pick another --out (or none: {adhoc_dir(cfg, run, seed, P.recipe_hash(cfg))})"
        )
    return out
