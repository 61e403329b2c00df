"""The report's tables: our numbers (mean ± std [95 % CI] over seeds) beside the paper's, deltas against
each column's baseline row, sign agreement, single-trick and leave-one-out rankings, transfer.

Every builder returns blocks and never fails on a run that has not finished: it says which are missing.
"""
from __future__ import annotations

from pipeline_src.report.paper import PaperValue
from pipeline_src.report.render import Block, Heading, Para, Table
from pipeline_src.report.results import Results, RunResult, Summary

DAGGER = "†"
AGREE, DISAGREE = "✓", "✗"
NONE = "—"  # no value: the run is missing, or no run reproduces the row


def fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def fmt_summary(s: Summary | None) -> str:
    """`mean`, `mean ± std` (2 seeds) or `mean ± std [lo, hi]` (3+ seeds, 95 % Student t)."""
    if s is None:
        return NONE
    text = fmt(s.mean)
    if s.std is not None:
        text += f" ± {fmt(s.std)}"
    if s.ci95 is not None:
        text += f" [{fmt(s.ci95[0])}, {fmt(s.ci95[1])}]"
    return text


def fmt_paper(v: PaperValue, digits: int = 2) -> str:
    return f"{v.value:.{digits}f}" + (f" {DAGGER}" if v.unverified else "")


def label(row: dict) -> str:
    return row["label"] + (f" {DAGGER}" if row["unverified"] else "")


def sign_marker(ours: float, paper: float) -> str:
    """✓ when our delta points the same way as the paper's (both up, both down, or both zero), judged on
    the deltas as printed (2 decimals), so a printed +0.00 never passes for an improvement."""
    def sign(x: float) -> int:
        x = round(x, 2)
        return (x > 0) - (x < 0)
    return AGREE if sign(ours) == sign(paper) else DISAGREE


def _mean(result: RunResult, key: str) -> float | None:
    s = result.summary(key)
    return None if s is None else s.mean


def _seeds(result: RunResult | None, total: int) -> str:
    return NONE if result is None else f"{len(result.metrics)}/{total}"


def _run_cell(name: str | None) -> str:
    return NONE if name is None else f"`{name}`"


def missing_note(names: list[str | None], results: Results, defined: set[str], what: str = "run") -> Para:
    """Which of `names` have no finished seed (and why), and which lack some seeds."""
    missing, partial, seen = [], [], set()
    for name in names:
        if name is None or name in seen:
            continue
        seen.add(name)
        r = results.run(name) if what == "run" else results.transfer(what, name)
        if not r.finished:
            why = ("not a run of the params file yet" if what == "run" and name not in defined
                   else "no finished seed")
            missing.append(f"`{name}` ({why})")
        elif r.missing_seeds:
            partial.append(f"`{name}` (seed {', '.join(map(str, r.missing_seeds))} missing)")
    if not missing and not partial:
        return Para(f"Every {'run' if what == 'run' else what + ' result'} of this table is finished for all seeds.")
    parts = []
    if missing:
        parts.append(f"Missing {'runs' if what == 'run' else what + ' results'}: " + ", ".join(missing) + ".")
    if partial:
        parts.append("Incomplete: " + ", ".join(partial) + "; their numbers use the finished seeds only.")
    return Para(" ".join(parts))


def comparison_column(spec: dict, column: dict, results: Results, defined: set[str]) -> list[Block]:
    """One column of Table 4, 5 or 6: each row against the column's first (baseline) row."""
    rows = column["rows"]
    base = rows[0]
    base_result = results.run(base["run"])
    total = len(results.seeds)
    headers = ("row", "run", "seeds")
    for name in ("top-1", "top-5"):
        headers += (f"{name} ours", f"{name} paper", f"Δ {name} ours", f"Δ {name} paper", "sign")
    table_rows = []
    for row in rows:
        result = results.run(row["run"])
        cells = [label(row), _run_cell(row["run"]), _seeds(result, total)]
        for m in ("top1", "top5"):
            ours, paper = result.summary(m), row[m]
            cells += [fmt_summary(ours), fmt_paper(paper)]
            if row is base:
                cells += ["baseline", "baseline", ""]
                continue
            paper_delta = paper.value - base[m].value
            ours_mean, base_mean = _mean(result, m), _mean(base_result, m)
            if ours_mean is None or base_mean is None:
                cells += [NONE, fmt(paper_delta, True), NONE]
            else:
                ours_delta = ours_mean - base_mean
                cells += [fmt(ours_delta, True), fmt(paper_delta, True), sign_marker(ours_delta, paper_delta)]
        table_rows.append(tuple(cells))
    return [Heading(3, f"{spec['cite']}, {column['label']}: {spec['title']}"),
            Table(headers, tuple(table_rows)),
            missing_note([r["run"] for r in rows], results, defined)]


def comparison_table(spec: dict, results: Results, defined: set[str]) -> list[Block]:
    """Every column of the table that a run of ours reproduces; the others are named, not shown."""
    blocks: list[Block] = []
    paper_only = []
    for column in spec["columns"]:
        if all(r["run"] is None for r in column["rows"]):
            paper_only.append(column["label"])
        else:
            blocks += comparison_column(spec, column, results, defined)
    if paper_only:
        blocks.append(Para(f"{spec['cite']} columns no run reproduces (paper numbers in "
                           f"`paper_numbers.yaml`): {', '.join(paper_only)}."))
    return blocks


def table3(spec: dict, results: Results, defined: set[str]) -> list[Block]:
    """Speed: the paper's minutes per epoch beside our images/s, and both speed-ups."""
    headers = ("model", "setting", "run", "seeds", "paper min/epoch", "paper speed-up", "ours images/s",
               "ours speed-up", "top-1 ours", "top-1 paper", "top-5 ours", "top-5 paper")
    total = len(results.seeds)
    rows, names = [], []
    for entry in spec["rows"]:
        base = entry["baseline"]
        ips = {}
        for setting in ("baseline", "efficient"):
            row = entry[setting]
            result = results.run(row["run"]) if row["run"] else None
            names.append(row["run"])
            ips[setting] = _mean(result, "images_per_s") if result else None
            paper_speed = f"{base['min_per_epoch'].value / row['min_per_epoch'].value:.2f}x"
            both = ips.get("baseline") is not None and ips[setting] is not None
            ours_speed = f"{ips[setting] / ips['baseline']:.2f}x" if both else NONE
            rows.append((entry["model"], setting, _run_cell(row["run"]), _seeds(result, total),
                         fmt_paper(row["min_per_epoch"], digits=1), paper_speed,
                         fmt_summary(result.summary("images_per_s")) if result else NONE, ours_speed,
                         fmt_summary(result.summary("top1")) if result else NONE, fmt_paper(row["top1"]),
                         fmt_summary(result.summary("top5")) if result else NONE, fmt_paper(row["top5"])))
    return [Heading(3, f"{spec['cite']}: {spec['title']}"),
            Para("Speed-up: the paper's is baseline min/epoch over efficient min/epoch (8 V100s); ours is "
                 "efficient images/s over baseline images/s (`images_per_s` of metrics.json, this machine)."),
            Table(headers, tuple(rows)),
            missing_note(names, results, defined)]


def teacher_line(name: str, results: Results) -> Para:
    r = results.run(name)
    if not r.finished:
        return Para(f"Distillation teacher `{name}`: missing (no finished seed).")
    return Para(f"Distillation teacher `{name}` ({len(r.metrics)}/{len(results.seeds)} seeds): "
                f"top-1 {fmt_summary(r.summary('top1'))}, top-5 {fmt_summary(r.summary('top5'))}.")


def ranking(kind: str, params: dict, results: Results, defined: set[str]) -> list[Block]:
    """Single-trick (`single-<t>` minus the base) or leave-one-out (the stack minus `loo-<t>`) effects,
    ranked by the effect on top-1: in both, a positive effect means the trick helps."""
    study = params["study"][kind]
    if kind == "single_trick":
        ref, prefix = study["base"], "single-"
        title = f"Single tricks: each trick alone on top of `{ref}`"
        meaning = f"effect = run − `{ref}`"
    else:
        ref, prefix = study["stack"], "loo-"
        title = f"Leave one out: the stack `{ref}` without each trick"
        meaning = f"effect = `{ref}` − run (what the trick adds to the stack)"
    ref_result = results.run(ref)
    total = len(results.seeds)
    scored, unscored = [], []
    for order, trick in enumerate(study["tricks"]):
        run = prefix + trick
        result = results.run(run)
        effects = {}
        for m in ("top1", "top5"):
            ours, base = _mean(result, m), _mean(ref_result, m)
            if ours is not None and base is not None:
                effects[m] = ours - base if kind == "single_trick" else base - ours
        item = (trick, run, result, effects)
        (scored if effects else unscored).append((order, item))
    scored.sort(key=lambda oi: (-oi[1][3]["top1"], oi[0]))
    rows = []
    for rank, (_, (trick, run, result, effects)) in enumerate(scored + unscored, start=1):
        rows.append((str(rank) if effects else NONE, trick, _run_cell(run), _seeds(result, total),
                     fmt_summary(result.summary("top1")),
                     fmt(effects["top1"], True) if effects else NONE,
                     fmt_summary(result.summary("top5")),
                     fmt(effects["top5"], True) if effects else NONE))
    headers = ("rank", "trick", "run", "seeds", "top-1 ours", "effect top-1", "top-5 ours", "effect top-5")
    return [Heading(3, title),
            Para(f"Reference `{ref}`: top-1 {fmt_summary(ref_result.summary('top1'))}, "
                 f"top-5 {fmt_summary(ref_result.summary('top5'))}. Ranked by the effect on top-1 ({meaning}); "
                 "runs without a number are listed last."),
            Table(headers, tuple(rows)),
            missing_note([ref] + [prefix + t for t in study["tricks"]], results, defined)]


def transfer_table(spec: dict, results: Results, defined: set[str]) -> list[Block]:
    """Table 8 or 9: the paper's transfer numbers beside ours, with each backbone's ImageNet top-1."""
    task, metrics = spec["task"], spec["metrics"]
    total = len(results.seeds)
    headers = ("backbone", "run", "ImageNet top-1 ours", "ImageNet top-1 paper", "seeds")
    for title in metrics.values():
        headers += (f"{title} ours", f"{title} paper")
    rows = []
    for row in spec["rows"]:
        backbone = results.run(row["run"])
        transfer = results.transfer(task, row["run"])
        cells = [label(row), _run_cell(row["run"]), fmt_summary(backbone.summary("top1")),
                 fmt_paper(row["imagenet_top1"]), _seeds(transfer, total)]
        for key in metrics:
            cells += [fmt_summary(transfer.summary(key)), fmt_paper(row[key])]
        rows.append(tuple(cells))
    names = [r["run"] for r in spec["rows"]]
    return [Heading(3, f"{spec['cite']}: {spec['title']}"),
            Table(headers, tuple(rows)),
            missing_note(names, results, defined),
            missing_note(names, results, defined, what=task)]
