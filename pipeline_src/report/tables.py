"""The report's tables: our numbers (mean ± std over seeds) beside the paper's, deltas against each
column's baseline row from paired seeds (mean ± std [95 % t interval] of the per-seed differences),
whether each delta resolves the paper's sign, single-trick and leave-one-out rankings, transfer.

Every builder returns blocks and never fails on a run that has not finished: it says which are missing.
"""
from __future__ import annotations

from pipeline_src.report.paper import PaperValue
from pipeline_src.report.render import Block, Heading, Para, Table
from pipeline_src.report.results import PairedDelta, Results, RunResult, Summary, paired_delta

DAGGER = "†"
AGREE, DISAGREE, UNRESOLVED = "agree", "disagree", "unresolved"
HELPS, HURTS = "helps", "hurts"
NONE = "—"  # no value: the run is missing, or no run reproduces the row
NEAR_CHANCE = "‡"
NEAR_CHANCE_POINTS = 15.0  # top-1 within this many points of chance: the run did not learn (issue #13's bar)


def fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def fmt_summary(s: Summary | None) -> str:
    """`mean` (one seed) or `mean ± std` (sample std over seeds)."""
    if s is None:
        return NONE
    return fmt(s.mean) + (f" ± {fmt(s.std)}" if s.std is not None else "")


def fmt_delta(d: PairedDelta | None) -> str:
    """`mean ± std [lo, hi]` of the paired differences; with one pair only the difference itself."""
    if d is None:
        return NONE
    s = d.diffs
    if s.ci95 is None:
        return f"{fmt(s.mean, True)} (1 seed, no interval)"
    return f"{fmt(s.mean, True)} ± {fmt(s.std)} [{fmt(s.ci95[0], True)}, {fmt(s.ci95[1], True)}]"


def fmt_paper(v: PaperValue, digits: int = 2) -> str:
    return f"{v.value:.{digits}f}" + (f" {DAGGER}" if v.unverified else "")


def label(row: dict) -> str:
    return row["label"] + (f" {DAGGER}" if row["unverified"] else "")


def resolved_sign(d: PairedDelta | None) -> int:
    """+1 or -1 when the 95 % interval of the paired differences excludes 0, else 0 (unresolved)."""
    ci = None if d is None else d.diffs.ci95
    if ci is None or ci[0] <= 0 <= ci[1]:
        return 0
    return 1 if ci[0] > 0 else -1


def sign_verdict(d: PairedDelta, paper: float) -> str:
    """agree / disagree with the paper's delta (as printed, 2 decimals) when our interval excludes 0,
    else unresolved; a resolved delta where the paper prints +0.00 disagrees."""
    ours = resolved_sign(d)
    if ours == 0:
        return UNRESOLVED
    theirs = round(paper, 2)
    return AGREE if ours == (theirs > 0) - (theirs < 0) else DISAGREE


def _seeds(result: RunResult | None, total: int) -> str:
    return NONE if result is None else f"{len(result.metrics)}/{total}"


def _run_cell(name: str | None) -> str:
    return NONE if name is None else f"`{name}`"


def seed_list(seeds) -> str:
    seeds = sorted(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def missing_note(names: list[str | None], results: Results, defined: set[str], what: str = "run") -> Para:
    """Which of `names` have no finished seed (and why), which lack some seeds, which are stale."""
    missing, partial, stale, seen = [], [], [], set()
    for name in names:
        if name is None or name in seen:
            continue
        seen.add(name)
        r = results.run(name) if what == "run" else results.transfer(what, name)
        if r.stale:
            stale.append(f"`{name}` ({seed_list(r.stale)})")
        if not r.finished:
            why = ("not a run of the params file yet" if what == "run" and name not in defined
                   else "only stale seeds" if r.stale else "no finished seed")
            missing.append(f"`{name}` ({why})")
        elif r.missing_seeds:
            partial.append(f"`{name}` ({seed_list(r.missing_seeds)} missing)")
    if not missing and not partial and not stale:
        return Para(f"Every {'run' if what == 'run' else what + ' result'} of this table is finished for all seeds.")
    parts = []
    if missing:
        parts.append(f"Missing {'runs' if what == 'run' else what + ' results'}: " + ", ".join(missing) + ".")
    if partial:
        parts.append("Incomplete: " + ", ".join(partial) + "; their numbers use the finished seeds only, and "
                     "their deltas pair only the seeds both runs finished.")
    if stale:
        parts.append("Stale, left out of this table (see Stale results): " + ", ".join(stale) + ".")
    return Para(" ".join(parts))


def sign_summary(where: str, verdicts: dict[str, list[str | None]]) -> Para:
    """One line: per metric, how many deltas resolve (interval excludes 0) and how many of those agree."""
    parts = []
    for metric, vs in verdicts.items():
        computed = [v for v in vs if v is not None]
        resolved = [v for v in computed if v != UNRESOLVED]
        text = (f"{metric}: {len(resolved)} of {len(computed)} deltas resolved, "
                f"{sum(v == AGREE for v in resolved)} of them with the paper's sign")
        if len(computed) < len(vs):
            text += f" ({len(vs) - len(computed)} not computed: run missing)"
        parts.append(text)
    return Para(f"Summary, {where}: " + "; ".join(parts) + ".")


def near_chance(result: RunResult | None, chance: float | None) -> bool:
    """Whether a finished run's mean top-1 is within NEAR_CHANCE_POINTS of chance (100 / classes)."""
    top1 = None if result is None else result.summary("top1")
    return chance is not None and top1 is not None and top1.mean <= chance + NEAR_CHANCE_POINTS


def near_chance_note(names: list[str], results: Results, chance: float | None) -> Para | None:
    """Names the runs that did not learn, so that a delta to or from one is read as that collapse."""
    flagged = [n for n in dict.fromkeys(names) if near_chance(results.run(n), chance)]
    if not flagged:
        return None
    runs = ", ".join(f"`{n}` ({fmt(results.run(n).summary('top1').mean)})" for n in flagged)
    return Para(f"{NEAR_CHANCE} Near chance (top-1 within {NEAR_CHANCE_POINTS:g} points of chance, "
                f"{fmt(chance)} %): {runs}. These runs did not learn on this profile, so a delta to or from "
                f"one measures that collapse, not the trick; the README's \"Why ResNet-A, -B and -C stay "
                f"near chance\" says why.")


def comparison_column(spec: dict, column: dict, results: Results, defined: set[str],
                      chance: float | None) -> list[Block]:
    """One column of Table 4, 5 or 6: each row against the column's first (baseline) row, seed by seed.

    `chance` is the top-1 of guessing (100 / classes), None where the classes are unknown."""
    rows = column["rows"]
    base = rows[0]
    base_result = results.run(base["run"])
    total = len(results.seeds)
    headers = ("row", "run", "seeds", "paired seeds")
    for name in ("top-1", "top-5"):
        headers += (f"{name} ours", f"{name} paper", f"Δ {name} ours", f"Δ {name} paper", "sign")
    table_rows = []
    verdicts: dict[str, list[str | None]] = {"top-1": [], "top-5": []}
    for row in rows:
        result = results.run(row["run"])
        deltas = {m: None if row is base else paired_delta(result, base_result, m) for m in ("top1", "top5")}
        pairs = next((len(d.seeds) for d in deltas.values() if d is not None), 0)
        cells = [label(row), _run_cell(row["run"]), _seeds(result, total),
                 "baseline" if row is base else str(pairs)]
        for m, name in (("top1", "top-1"), ("top5", "top-5")):
            flag = f" {NEAR_CHANCE}" if m == "top1" and near_chance(result, chance) else ""
            cells += [fmt_summary(result.summary(m)) + flag, fmt_paper(row[m])]
            if row is base:
                cells += ["baseline", "baseline", ""]
                continue
            paper_delta = row[m].value - base[m].value
            verdict = None if deltas[m] is None else sign_verdict(deltas[m], paper_delta)
            verdicts[name].append(verdict)
            cells += [fmt_delta(deltas[m]), fmt(paper_delta, True), verdict or NONE]
        table_rows.append(tuple(cells))
    where = f"{spec['cite']}, {column['label']}"
    names = [r["run"] for r in rows]
    collapsed = near_chance_note([n for n in names if n is not None], results, chance)
    return [Heading(3, f"{where}: {spec['title']}"),
            Table(headers, tuple(table_rows)),
            sign_summary(where, verdicts)] + ([collapsed] if collapsed else []) + [
            missing_note(names, results, defined)]


def comparison_table(spec: dict, results: Results, defined: set[str], chance: float | None) -> list[Block]:
    """Every column of the table that a run of ours reproduces; the others are named, not shown."""
    blocks: list[Block] = []
    paper_only = []
    for column in spec["columns"]:
        if all(r["run"] is None for r in column["rows"]):
            paper_only.append(column["label"])
        else:
            blocks += comparison_column(spec, column, results, defined, chance)
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
            speed = result.summary("images_per_s") if result else None
            ips[setting] = None if speed is None else speed.mean
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
    seeds = results.seeds_of.get(name, results.seeds)
    return Para(f"Distillation teacher `{name}` ({len(r.metrics)}/{len(seeds)} seeds, every student seed "
                f"distils from it): "
                f"top-1 {fmt_summary(r.summary('top1'))}, top-5 {fmt_summary(r.summary('top5'))}.")


def ranking(kind: str, params: dict, results: Results, defined: set[str]) -> list[Block]:
    """Single-trick (`single-<t>` minus the base) or leave-one-out (the stack minus `loo-<t>`) effects,
    from paired seeds, ranked by the mean effect on top-1: in both, a positive effect means the trick helps."""
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
        effects = {m: paired_delta(result, ref_result, m) if kind == "single_trick" else
                   paired_delta(ref_result, result, m) for m in ("top1", "top5")}
        item = (trick, run, result, effects)
        (unscored if effects["top1"] is None else scored).append((order, item))
    scored.sort(key=lambda oi: (-oi[1][3]["top1"].diffs.mean, oi[0]))
    rows = []
    for rank, (_, (trick, run, result, effects)) in enumerate(scored + unscored, start=1):
        scored_row = effects["top1"] is not None
        verdict = {1: HELPS, -1: HURTS, 0: UNRESOLVED}[resolved_sign(effects["top1"])] if scored_row else NONE
        rows.append((str(rank) if scored_row else NONE, trick, _run_cell(run), _seeds(result, total),
                     fmt_summary(result.summary("top1")), fmt_delta(effects["top1"]), verdict,
                     fmt_summary(result.summary("top5")), fmt_delta(effects["top5"])))
    headers = ("rank", "trick", "run", "seeds", "top-1 ours", "effect top-1", "top-1 verdict", "top-5 ours",
               "effect top-5")
    return [Heading(3, title),
            Para(f"Reference `{ref}`: top-1 {fmt_summary(ref_result.summary('top1'))}, "
                 f"top-5 {fmt_summary(ref_result.summary('top5'))}. Ranked by the mean effect on top-1 "
                 f"({meaning}, over paired seeds); the verdict says {HELPS} or {HURTS} only when the 95 % "
                 f"interval excludes 0. Runs without a number are listed last."),
            Table(headers, tuple(rows)),
            missing_note([ref] + [prefix + t for t in study["tricks"]], results, defined)]


def transfer_table(spec: dict, results: Results, defined: set[str]) -> list[Block]:
    """Table 8 or 9: the paper's transfer numbers beside ours, with each backbone's ImageNet top-1."""
    task, metrics = spec["task"], spec["metrics"]
    total = len(results.transfer_seeds)  # the fine-tunes run for study.transfer_seeds only
    headers = ("backbone", "run", "ImageNet top-1 ours", "ImageNet top-1 paper", "fine-tune seeds")
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
