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

from pipeline_src import params as params_mod
from pipeline_src.errors import InputError

ADHOC = "adhoc"


class RunFolderError(InputError, ValueError):
    """An output folder that would mix an ad-hoc recipe into the pipeline's results."""


def run_dir(params: dict, run: str, seed: int) -> Path:
    """The pipeline's folder of (run, seed)."""
    return Path(params["paths"]["runs"]) / run / f"seed{seed}"


def adhoc_dir(params: dict, run: str, seed: int, recipe: str) -> Path:
    return Path(params["paths"]["runs"]) / ADHOC / f"{run}-{recipe[:12]}" / f"seed{seed}"


def is_adhoc(params: dict, run: str) -> bool:
    """Whether `params` (resolved with --set overrides) trains another recipe than the params file gives `run`."""
    own = params_mod.resolve_run(params_mod.load(params["_source"]), run)
    return params_mod.recipe_hash(params) != params_mod.recipe_hash(own)


def _value(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def with_same_overrides(params: dict, run: str) -> dict:
    """`run` resolved from `params`'s params file with the --set overrides that made `params`.

    A student trained with `--set train.epochs=1` distils from the teacher trained with the same
    `--set`, so the two find each other's folders. --set values always win over a run's own
    overrides, so `params` still holds each of them; JSON is YAML, so they parse back unchanged.
    """
    sets = [f"{key}={json.dumps(_value(params, key))}" for key in params["_sets"]]
    return params_mod.resolve_run(params_mod.load(params["_source"], sets), run)


def output_dir(params: dict, run: str, seed: int, out: str | Path | None = None) -> Path:
    """The pipeline's run folder for the params file's own recipe, else its ad-hoc folder or `out`."""
    pipeline = run_dir(params, run, seed)
    adhoc = is_adhoc(params, run)
    if out is None:
        return adhoc_dir(params, run, seed, params_mod.recipe_hash(params)) if adhoc else pipeline
    out = Path(out)
    if adhoc and out.resolve() == pipeline.resolve():
        raise RunFolderError(
            f"--out {out} is the pipeline's folder of run '{run}', but the --set overrides change its "
            f"recipe from {params['_source']}'s; pick another --out "
            f"(or none: {adhoc_dir(params, run, seed, params_mod.recipe_hash(params))})"
        )
    return out
