"""The paper's figures redrawn from run histories: LR schedules and validation top-1 per epoch (Figure 3),
and the logit-gap histograms without / with label smoothing (Figure 4).

Figures are built on `matplotlib.figure.Figure` (Agg canvas, no pyplot state) and saved without the
Software tag, so identical inputs give identical PNG bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline_src.io import atomic_path

DPI = 100
PNG_METADATA = {"Software": None}
GAP_BINS = 50


def save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)


def _label_axes(ax, xlabel: str, ylabel: str, title: str, title_size: float | str = "large",
                legend_size: float = 7) -> None:
    """The axis labels, title, light grid and legend every panel of the report carries."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save_single(fig: Figure, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    _label_axes(ax, xlabel, ylabel, title)
    fig.tight_layout()
    save_png(fig, path)


def _curve_key(curve: list) -> tuple:
    return tuple((round(float(e), 9), float(f"{float(lr):.9g}")) for e, lr in curve)


def group_curves(curves: dict[str, list]) -> list[list[str]]:
    """Runs whose LR curves are identical, grouped (first-seen order), so each curve is drawn once."""
    groups: dict[tuple, list[str]] = {}
    for run, curve in curves.items():
        groups.setdefault(_curve_key(curve), []).append(run)
    return list(groups.values())


def lr_schedule(curves: dict[str, list], path: Path) -> list[list[str]]:
    """Figure 3 (top): LR against epoch, one line per distinct schedule; returns the run groups drawn."""
    groups = group_curves(curves)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for i, runs in enumerate(groups, start=1):
        curve = np.asarray(curves[runs[0]], dtype=float)
        more = f" +{len(runs) - 1} more" if len(runs) > 1 else ""
        ax.plot(curve[:, 0], curve[:, 1], label=f"{i}: {runs[0]}{more}", linewidth=1.2, drawstyle="steps-post")
    _save_single(fig, ax, "epoch", "learning rate", "Learning-rate schedules (per iteration)", path)
    return groups


@dataclass(frozen=True)
class BandPoint:
    """One epoch of a run's validation curve over seeds: the mean and the min-max band around it."""

    epoch: int  # 1-based
    mean: float
    low: float
    high: float


def top1_band(histories: dict[int, dict]) -> list[BandPoint]:
    """Validation top-1 over seeds (mean, min, max) at the epochs every seed evaluated."""
    per_seed = [{e["epoch"] + 1: e["top1"] for e in h["epochs"] if "top1" in e} for h in histories.values()]
    if not per_seed:
        return []
    common = sorted(set.intersection(*(set(s) for s in per_seed)))
    points = []
    for ep in common:
        values = [s[ep] for s in per_seed]
        points.append(BandPoint(ep, sum(values) / len(values), min(values), max(values)))
    return points


def val_top1(panels: list[tuple[str, list[str]]], series: dict[str, list[BandPoint]], path: Path) -> int:
    """Figure 3 (bottom): validation top-1 per epoch, one panel per table, each run's mean over seeds as a
    line and its min-max over seeds as a shaded band; returns the panels drawn."""
    drawn = [(title, [r for r in runs if series.get(r)]) for title, runs in panels]
    drawn = [(title, runs) for title, runs in drawn if runs]
    if not drawn:
        return 0
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows))
    for i, (title, runs) in enumerate(drawn, start=1):
        ax = fig.add_subplot(rows, cols, i)
        for run in runs:
            pts = series[run]
            xs = [p.epoch for p in pts]
            (line,) = ax.plot(xs, [p.mean for p in pts], marker=".", linewidth=1.0, label=run)
            ax.fill_between(xs, [p.low for p in pts], [p.high for p in pts], color=line.get_color(), alpha=0.2,
                            linewidth=0)
        _label_axes(ax, "epoch", "val top-1 (%)", title, title_size=9, legend_size=6)
    fig.tight_layout()
    save_png(fig, path)
    return len(drawn)


def optimal_gap(num_classes: int, eps: float) -> float:
    """The logit gap label smoothing drives towards: log((K - 1)(1 - eps) / eps) (paper section 5.2)."""
    return math.log((num_classes - 1) * (1 - eps) / eps)


def logit_gaps(without: tuple[str, list[float]], with_ls: tuple[str, list[float]], eps: float | None,
               optimum: float | None, path: Path) -> None:
    """Figure 4: histograms of max logit minus the mean of the others, without and with smoothing;
    `optimum` (see `optimal_gap`) is drawn as a dashed line when given."""
    (run0, gaps0), (run1, gaps1) = without, with_ls
    edges = np.histogram_bin_edges(np.concatenate([gaps0, gaps1]), bins=GAP_BINS)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.hist(gaps0, bins=edges, density=True, alpha=0.55, label=f"{run0} (no label smoothing)")
    smoothing = "label smoothing" + (f" eps={eps:g}" if eps is not None else "")
    ax.hist(gaps1, bins=edges, density=True, alpha=0.55, label=f"{run1} ({smoothing})")
    if optimum is not None:
        ax.axvline(optimum, color="black", linestyle="--", linewidth=1.2,
                   label=f"optimum log((K-1)(1-eps)/eps) = {optimum:.2f}")
    _save_single(fig, ax, "max logit − mean of the other logits", "density", "Logit gaps on the validation set", path)
