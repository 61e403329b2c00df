"""The paper's numbers, read from paper_numbers.yaml (their one home) and checked on load.

Values come back as `PaperValue`s so the report can mark the ones flagged `unverified` (†).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline_src.errors import InputError

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")

# What each table must hold; the report's renderers rely on exactly these keys.
COMPARISON_TABLES = ("table4", "table5", "table6")
TRANSFER_TABLES = ("table8", "table9")
ACCURACY_KEYS = ("top1", "top5")


class PaperNumbersError(InputError, ValueError):
    """paper_numbers.yaml does not have the shape the report reads."""


@dataclass(frozen=True)
class PaperValue:
    """One published number; `unverified` marks it as not yet checked against the PDF."""

    value: float
    unverified: bool = False


def _value(raw: Any, where: str) -> PaperValue:
    if isinstance(raw, dict):
        extra = set(raw) - {"value", "unverified"}
        if extra or "value" not in raw:
            raise PaperNumbersError(f"{where}: expected a number or {{value: N, unverified: true}}, got {raw!r}")
        flag = raw.get("unverified", False)
        if not isinstance(flag, bool):
            raise PaperNumbersError(f"{where}.unverified must be true or false, got {flag!r}")
        return PaperValue(_value(raw["value"], where + ".value").value, flag)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise PaperNumbersError(f"{where}: expected a number, got {raw!r}")
    return PaperValue(float(raw))


def _need(node: dict, key: str, where: str) -> Any:
    if not isinstance(node, dict) or key not in node:
        raise PaperNumbersError(f"{where}: missing key '{key}'")
    return node[key]


ROW_FIELDS = ("label", "run", "unverified")


def _row(raw: dict, values: tuple[str, ...], where: str) -> dict:
    """A row: label, run (a name or null), optional row flag, the required values and any other values
    the paper prints (Table 5's params and GFLOPs)."""
    run = _need(raw, "run", where)
    if run is not None and not isinstance(run, str):
        raise PaperNumbersError(f"{where}.run must be a run name or null, got {run!r}")
    for key in values:
        _need(raw, key, where)
    row = {"label": str(raw.get("label", "")), "run": run, "unverified": bool(raw.get("unverified", False))}
    for key in raw:
        if key not in ROW_FIELDS:
            row[key] = _value(raw[key], f"{where}.{key}")
    return row


def load_paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict:
    """Tables 3-6, 8, 9 and the figure mappings, validated; numbers as `PaperValue`s."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    src = str(path)
    tables = _need(raw, "tables", src)
    out: dict[str, Any] = {"source": str(_need(raw, "source", src)),
                           "unverified_note": str(_need(raw, "unverified_note", src)),
                           "tables": {}, "figures": _need(raw, "figures", src)}

    t3 = _need(tables, "table3", f"{src}: tables")
    rows3 = []
    for i, r in enumerate(_need(t3, "rows", f"{src}: tables.table3")):
        where = f"{src}: tables.table3.rows[{i}]"
        rows3.append({"model": str(_need(r, "model", where)),
                      **{s: _row(_need(r, s, where), ("min_per_epoch",) + ACCURACY_KEYS, f"{where}.{s}")
                         for s in ("baseline", "efficient")}})
    out["tables"]["table3"] = {"cite": str(_need(t3, "cite", src)), "title": str(_need(t3, "title", src)),
                               "rows": rows3}

    for name in COMPARISON_TABLES:
        where = f"{src}: tables.{name}"
        spec = _need(tables, name, f"{src}: tables")
        columns = []
        for i, col in enumerate(_need(spec, "columns", where)):
            rows = [_row(r, ACCURACY_KEYS, f"{where}.columns[{i}].rows[{j}]")
                    for j, r in enumerate(_need(col, "rows", f"{where}.columns[{i}]"))]
            if not rows:
                raise PaperNumbersError(f"{where}.columns[{i}]: needs at least the baseline row")
            if len({r["run"] is None for r in rows}) > 1:
                raise PaperNumbersError(f"{where}.columns[{i}]: give every row a run, or none (a paper-only column)")
            columns.append({"label": str(_need(col, "label", f"{where}.columns[{i}]")), "rows": rows})
        out["tables"][name] = {"cite": str(_need(spec, "cite", where)), "title": str(_need(spec, "title", where)),
                               "columns": columns}

    for name in TRANSFER_TABLES:
        where = f"{src}: tables.{name}"
        spec = _need(tables, name, f"{src}: tables")
        metrics = _need(spec, "metrics", where)
        if not isinstance(metrics, dict) or not metrics:
            raise PaperNumbersError(f"{where}.metrics: expected a mapping of metric key to its column title")
        keys = ("imagenet_top1",) + tuple(metrics)
        out["tables"][name] = {
            "cite": str(_need(spec, "cite", where)), "title": str(_need(spec, "title", where)),
            "task": str(_need(spec, "task", where)), "metrics": {str(k): str(v) for k, v in metrics.items()},
            "rows": [_row(r, keys, f"{where}.rows[{j}]") for j, r in enumerate(_need(spec, "rows", where))],
        }
        if any(r["run"] is None for r in out["tables"][name]["rows"]):
            raise PaperNumbersError(f"{where}: every row needs the backbone run it transfers from")

    fig4 = _need(out["figures"], "figure4", f"{src}: figures")
    for key in ("cite", "title", "without", "with"):
        if not isinstance(_need(fig4, key, f"{src}: figures.figure4"), str):
            raise PaperNumbersError(f"{src}: figures.figure4.{key} must be a string")
    return out


def runs_named(paper: dict) -> list[str]:
    """Every run the paper's tables and figures map to, in table order, without repeats."""
    names: list[str] = []
    tables = paper["tables"]
    rows = [r[s] for r in tables["table3"]["rows"] for s in ("baseline", "efficient")]
    rows += [r for name in COMPARISON_TABLES for col in tables[name]["columns"] for r in col["rows"]]
    rows += [r for name in TRANSFER_TABLES for r in tables[name]["rows"]]
    fig4 = paper["figures"]["figure4"]
    rows += [{"run": fig4["without"]}, {"run": fig4["with"]}]
    for row in rows:
        if row["run"] is not None and row["run"] not in names:
            names.append(row["run"])
    return names
