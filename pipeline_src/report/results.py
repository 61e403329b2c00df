"""What the runs wrote, read back: per-seed metrics, histories, transfer results, and their statistics.

Only files are read (metrics.json, history.json), never a training object, so the report can be
built anywhere the run folders are. A missing file means "not run yet"; a malformed one is an error;
one whose recorded recipe is not the recipe the params resolve the run to is stale: it is kept out of
every number and listed instead.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_src.errors import InputError

METRIC_KEYS = ("top1", "top5", "val_loss", "train_loss", "images_per_s", "wall_time_s")
TRANSFER_KEYS = {"detection": ("map",), "segmentation": ("pixel_accuracy", "miou")}


class ReportInputError(InputError, ValueError):
    """A run output the report cannot read; the message names the file and what to do."""


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4, a finite series)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0
    first = 2 if df % 2 == 0 else 3
    for k in range(first, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    if df % 2 == 0:
        return s * total
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student t critical value: P(|T| < t) = level (bisection on the exact CDF)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Mean over seeds, sample std and a 95 % Student t interval for the mean (both need n >= 2)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def ci95(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


@dataclass
class RunResult:
    """The finished seeds of one run (seed -> metrics), the seeds still missing, the stale ones
    (seed -> why) and what each finished seed recorded about how it ran (seed -> precision, machine)."""

    name: str
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    missing_seeds: list[int] = field(default_factory=list)
    stale: dict[int, str] = field(default_factory=dict)
    ran_on: dict[int, dict] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.metrics)

    @property
    def complete(self) -> bool:
        return self.finished and not self.missing_seeds and not self.stale

    def summary(self, key: str) -> Summary | None:
        return Summary(tuple(m[key] for m in self.metrics.values())) if self.metrics else None


@dataclass(frozen=True)
class PairedDelta:
    """A run minus its reference over the seeds both finished, seed by seed (a paired comparison:
    seed-to-seed variation common to both cancels); `diffs` holds mean, std and 95 % t interval."""

    seeds: tuple[int, ...]
    diffs: Summary


def paired_delta(run: RunResult, reference: RunResult, key: str) -> PairedDelta | None:
    """`run - reference` on `key` for each seed both have; None when they share no seed."""
    seeds = tuple(sorted(set(run.metrics) & set(reference.metrics)))
    if not seeds:
        return None
    return PairedDelta(seeds, Summary(tuple(run.metrics[s][key] - reference.metrics[s][key] for s in seeds)))


def read_json(path: Path) -> Any:
    """A JSON file, or an error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage that wrote it") from exc


def read_metrics(path: Path, keys: tuple[str, ...], data: Any = None) -> dict[str, float]:
    """One metrics.json (`data`: its content when already read), checked to hold a finite number for
    every key."""
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object with keys {list(keys)}")
    out = {}
    for key in keys:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReportInputError(
                f"{path}: key '{key}' must be a finite number, got {value!r}; this file was not written by "
                "a finished run of the current code: delete its seed folder and re-run the stage"
            )
        out[key] = float(value)
    return out


def stale_reason(data: dict, expected: str | None, params_source: str) -> str | None:
    """Why a training run's metrics.json does not belong to the params being reported, or None."""
    if expected is None:
        return f"not a run of {params_source}"
    found = data.get("recipe")
    if not isinstance(found, str):
        return "records no recipe (written by older code, or imported rather than trained)"
    if found != expected:
        return f"trained with recipe {found[:12]}, but {params_source} resolves this run to {expected[:12]}"
    return None


def _ran_on(data: dict, path: Path) -> dict:
    """The effective precision and machine a run recorded (older runs recorded no machine)."""
    precision, machine = data.get("precision"), data.get("machine")
    if precision is not None and not isinstance(precision, str):
        raise ReportInputError(f"{path}: key 'precision' must be a string, got {precision!r}")
    if machine is not None and not (isinstance(machine, dict) and isinstance(machine.get("cpu"), str)
                                    and isinstance(machine.get("cpu_flags"), list)):
        raise ReportInputError(f"{path}: key 'machine' must be an object with 'cpu' (a string) and 'cpu_flags' "
                               f"(a list), got {machine!r}; delete its seed folder and re-run the run")
    return {"precision": precision, "machine": machine}


class Results:
    """Reads `<runs>/<run>/seed<k>/` and `<runs>/transfer/<task>/<run>/seed<k>/` for the study's seeds.

    `recipes` maps each run of the params file to `params.recipe_hash` of its resolved params; a
    training run's seed whose metrics.json records another recipe (or none) is stale. Transfer
    fine-tunes are read for `transfer_seeds` (`study.transfer_seeds`), and a run named in
    `seeds_of` (the teacher, trained once) for its own seeds."""

    def __init__(self, runs_dir: str | Path, seeds: list[int], recipes: dict[str, str], params_source: str,
                 transfer_seeds: list[int] | None = None, seeds_of: dict[str, list[int]] | None = None):
        self.runs_dir = Path(runs_dir)
        self.seeds = list(seeds)
        self.transfer_seeds = list(self.seeds if transfer_seeds is None else transfer_seeds)
        self.seeds_of = dict(seeds_of or {})
        self.recipes = dict(recipes)
        self.params_source = params_source
        self._cache: dict[tuple[str, str], RunResult] = {}

    def _collect(self, folder: Path, name: str, keys: tuple[str, ...], check_recipe: bool,
                 seeds: list[int]) -> RunResult:
        result = RunResult(name)
        for seed in seeds:
            path = folder / f"seed{seed}" / "metrics.json"
            if not path.is_file():
                result.missing_seeds.append(seed)
                continue
            data = read_json(path)
            if check_recipe and isinstance(data, dict):
                reason = stale_reason(data, self.recipes.get(name), self.params_source)
                if reason is not None:
                    result.stale[seed] = reason
                    continue
            result.metrics[seed] = read_metrics(path, keys, data)
            if check_recipe:
                result.ran_on[seed] = _ran_on(data, path)
        return result

    def run(self, name: str) -> RunResult:
        """The ImageNet-style metrics of one training run, its stale seeds set apart."""
        key = ("train", name)
        if key not in self._cache:
            self._cache[key] = self._collect(self.runs_dir / name, name, METRIC_KEYS, check_recipe=True,
                                             seeds=self.seeds_of.get(name, self.seeds))
        return self._cache[key]

    def transfer(self, task: str, backbone: str) -> RunResult:
        """Detection (`map`) or segmentation (`pixel_accuracy`, `miou`) results of one backbone run."""
        if task not in TRANSFER_KEYS:
            raise ReportInputError(f"unknown transfer task '{task}'; expected one of {list(TRANSFER_KEYS)}")
        key = (task, backbone)
        if key not in self._cache:
            folder = self.runs_dir / "transfer" / task / backbone
            self._cache[key] = self._collect(folder, backbone, TRANSFER_KEYS[task], check_recipe=False,
                                             seeds=self.transfer_seeds)
        return self._cache[key]

    def histories(self, name: str) -> dict[int, dict]:
        """seed -> history.json of every finished seed that has one (the plots' input)."""
        out = {}
        for seed in self.run(name).metrics:
            path = self.runs_dir / name / f"seed{seed}" / "history.json"
            if not path.is_file():
                continue
            out[seed] = check_history(read_json(path), path)
        return out


def check_history(data: Any, path: Path) -> dict:
    """The parts of history.json the plots read, checked so a bad file fails here, by name."""
    def bad(what: str) -> ReportInputError:
        return ReportInputError(f"{path}: {what}; this file was not written by the current train stage: "
                                "delete its seed folder and re-run the run")
    if not isinstance(data, dict) or not isinstance(data.get("epochs"), list):
        raise bad("expected a JSON object with an 'epochs' list")
    if not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in data["epochs"]):
        raise bad("every item of 'epochs' must be an object with an integer 'epoch'")
    curve = data.get("lr_curve", [])
    if not isinstance(curve, list) or not all(isinstance(p, list) and len(p) == 2 for p in curve):
        raise bad("'lr_curve' must be a list of [epoch, lr] pairs")
    if not isinstance(data.get("logit_gaps", []), list):
        raise bad("'logit_gaps' must be a list of numbers")
    return data
