"""What the runs wrote, read back: per-seed metrics, histories, transfer results, and their statistics.

Only files are read (metrics.json, history.json), never a training object, so the report can be
built anywhere the run folders are. A missing file means "not run yet"; a malformed one is an error.
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
    """Mean over seeds, sample std (n >= 2) and a 95 % Student t interval for the mean (n >= 3)."""

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
        if self.n < 3:
            return None
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


@dataclass
class RunResult:
    """The finished seeds of one run (seed -> metrics) and the seeds still missing."""

    name: str
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    missing_seeds: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.metrics)

    def summary(self, key: str) -> Summary | None:
        return Summary(tuple(m[key] for m in self.metrics.values())) if self.metrics else None


def read_json(path: Path) -> Any:
    """A JSON file, or an error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage that wrote it") from exc


def read_metrics(path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """One metrics.json, checked to hold a finite number for every key."""
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


class Results:
    """Reads `<runs>/<run>/seed<k>/` and `<runs>/transfer/<task>/<run>/seed<k>/` for the study's seeds."""

    def __init__(self, runs_dir: str | Path, seeds: list[int]):
        self.runs_dir = Path(runs_dir)
        self.seeds = list(seeds)
        self._cache: dict[tuple[str, str], RunResult] = {}

    def _collect(self, folder: Path, name: str, keys: tuple[str, ...]) -> RunResult:
        result = RunResult(name)
        for seed in self.seeds:
            path = folder / f"seed{seed}" / "metrics.json"
            if path.is_file():
                result.metrics[seed] = read_metrics(path, keys)
            else:
                result.missing_seeds.append(seed)
        return result

    def run(self, name: str) -> RunResult:
        """The ImageNet-style metrics of one training run."""
        key = ("train", name)
        if key not in self._cache:
            self._cache[key] = self._collect(self.runs_dir / name, name, METRIC_KEYS)
        return self._cache[key]

    def transfer(self, task: str, backbone: str) -> RunResult:
        """Detection (`map`) or segmentation (`pixel_accuracy`, `miou`) results of one backbone run."""
        if task not in TRANSFER_KEYS:
            raise ReportInputError(f"unknown transfer task '{task}'; expected one of {list(TRANSFER_KEYS)}")
        key = (task, backbone)
        if key not in self._cache:
            folder = self.runs_dir / "transfer" / task / backbone
            self._cache[key] = self._collect(folder, backbone, TRANSFER_KEYS[task])
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
