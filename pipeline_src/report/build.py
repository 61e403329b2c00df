"""Stage: the report, from what the runs wrote.

    python -m pipeline_src.report [--params FILE] [--set key=value ...]

Writes `<paths.reports>/report.md`, `<paths.reports>/report.html` (self-contained) and
`<paths.reports>/figures/*.png`, atomically. Identical inputs give identical files (no timestamps).
The command (not `build`) then logs those files to an MLflow run `report`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline_src import params as params_mod, tracking
from pipeline_src.errors import run_main
from pipeline_src.io import write_text
from pipeline_src.report import plots, tables
from pipeline_src.report.paper import (COMPARISON_TABLES, TRANSFER_TABLES, load_paper_numbers, runs_named)
from pipeline_src.report.render import Block, Bullets, Figure, Heading, Para, Table, to_html, to_markdown
from pipeline_src.report.results import ReportInputError, Results, read_json

FIGURES = ("lr_schedule.png", "val_top1.png", "logit_gaps.png")
MANIFEST_MAX_KEYS = 8  # a manifest mapping with more keys (e.g. per class counts) is shown as its size


def read_num_classes(data_dir: Path) -> int | None:
    """K from `<data>/betons/classes.json` (a list of wnids or {'wnids': [...]}); None when absent."""
    path = data_dir / "betons" / "classes.json"
    if not path.is_file():
        return None
    data = read_json(path)
    wnids = data.get("wnids") if isinstance(data, dict) else data
    if not isinstance(wnids, list) or not wnids:
        raise ReportInputError(f"{path}: expected a non-empty JSON list of wnids or an object with key 'wnids'")
    return len(wnids)


def _manifest_items(node: Any, prefix: str = "") -> list[str]:
    """Scalar leaves as `key: value`; lists and large mappings summarised by their size."""
    items = []
    for key in sorted(node):
        value, name = node[key], f"{prefix}{key}"
        if isinstance(value, dict) and len(value) <= MANIFEST_MAX_KEYS:
            items += _manifest_items(value, name + ".")
        elif isinstance(value, dict):
            items.append(f"`{name}`: {len(value)} entries")
        elif isinstance(value, list):
            items.append(f"`{name}`: {len(value)} items")
        else:
            items.append(f"`{name}`: {value}")
    return items


def seeds_line(seeds: list[int]) -> str:
    """The seeds, and what the ± and the intervals are taken over (or that one seed defines neither)."""
    listed = ", ".join(map(str, seeds))
    if len(seeds) < 2:
        return (f"Seeds: {listed}. With one seed no standard deviation or interval is defined, so every "
                "delta's sign is unresolved; list 3 or more seeds in `study.seeds` to resolve them")
    return (f"Seeds: {listed}. Every ± is the sample standard deviation over these seeds; every [lo, hi] is "
            "a 95 % Student t interval over seeds of the paired differences (a run and its reference "
            "trained with the same seed, over the seeds both finished)")


def _machine_text(machine: dict | None) -> str:
    if machine is None:
        return "not recorded (metrics.json written before train.py recorded its machine)"
    flags = " ".join(machine["cpu_flags"]) or "none of the AVX-512 / bf16 / AMX flags train.py looks for"
    gpu = f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU"
    return f"CPU {machine['cpu'] or 'unknown model'} (precision-relevant flags: {flags}), {gpu}"


def _precision_text(precision: str | None, machine: dict | None, requested: str) -> str:
    """The precision a run really computed in, as the run recorded it."""
    if precision is None:
        return "not recorded"
    text = precision
    if precision == "amp" and machine is not None:
        text += " (fp16 autocast, loss scaling)" if machine.get("gpu") else " (bf16 autocast on CPU)"
    if precision != requested:
        text += f", asked {requested}"
    return text


def machine_lines(names: list[str], resolved: dict[str, dict], results: Results) -> list[str]:
    """Which machine made the tabulated results, and each run's effective precision, from metrics.json."""
    machines: dict[str, list[str]] = {}
    precisions: dict[str, list[str]] = {}
    for name in names:
        r = results.run(name)
        if not r.finished:
            continue
        requested = resolved[name]["train"]["precision"]  # a finished run is one of the params file's
        texts = {_machine_text(info["machine"]) for info in r.ran_on.values()}
        for text in sorted(texts):
            machines.setdefault(text, []).append(name)
        kinds = sorted({_precision_text(info["precision"], info["machine"], requested) for info in r.ran_on.values()})
        precisions.setdefault(" / ".join(kinds), []).append(name)
    if not machines:
        return ["Machine and precision: no finished run yet"]
    lines = []
    for text, runs in machines.items():
        scope = "every finished run" if len(machines) == 1 else _names(runs)
        lines.append(f"Machine ({scope}, from metrics.json): {text}")
    lines.append("Effective precision per run: " + "; ".join(f"{kind}: {_names(runs)}" for kind, runs in
                                                             sorted(precisions.items())))
    return lines


def header(params: dict, num_classes: int | None, machine: list[str]) -> list[Block]:
    """Where the numbers came from, so a CPU run on synthetic data is never mistaken for ImageNet."""
    prof, data_dir = params["profile"], Path(params["paths"]["data"])
    imagenet = params["data"]["imagenet_dir"]
    if imagenet is None:
        source = ("the embedded synthetic stand-in for ImageNet (`pipeline_src.synthetic`, "
                  f"{params['synthetic']['classes']} classes), NOT ImageNet: compare the direction of "
                  "the deltas with the paper's, not the accuracies")
    else:
        source = f"ImageNet from `{imagenet}`"
    sets = params["_sets"]
    model, train = params["model"], params["train"]
    items = [
        f"Profile: `{prof['name']}`: {prof['description']}",
        f"Params: `{params['_source']}`" + (f" with --set {', '.join(sets)}" if sets else ""),
        f"Data: {source}",
        f"Classes: {num_classes} (from `{data_dir / 'betons' / 'classes.json'}`)" if num_classes is not None
        else f"Classes: unknown, `{data_dir / 'betons' / 'classes.json'}` not found (the prepare stage has not run here)",
        seeds_line(params["study"]["seeds"]),
        f"Shared settings (runs change some through their tricks): {model['arch']}-{model['depth']} "
        f"variant {model['variant']}, width {model['width']}, stem stride {model['stem_stride']}, "
        f"{train['epochs']} epochs, batch "
        f"{train['batch_size']}, base LR {train['base_lr']}, train crop {params['loader']['res']} px",
        *machine,
    ]
    manifest = data_dir / "betons" / "manifest.json"
    blocks: list[Block] = [Heading(1, "Bag of Tricks re-run: report"), Bullets(tuple(items))]
    if manifest.is_file():
        data = read_json(manifest)
        if not isinstance(data, dict):
            raise ReportInputError(f"{manifest}: expected a JSON object; re-run the prepare stage")
        blocks += [Para(f"Data manifest `{manifest}`:"), Bullets(tuple(_manifest_items(data)))]
    else:
        blocks.append(Para(f"Data manifest `{manifest}`: not found (the prepare stage has not run here)."))
    return blocks


def status(names: list[str], results: Results) -> Para:
    done = [n for n in names if results.run(n).complete]
    partial = [n for n in names if results.run(n).finished and not results.run(n).complete]
    missing = [n for n in names if not results.run(n).finished]
    stale = sum(len(results.run(n).stale) for n in names)
    text = f"Runs: {len(done)} of {len(names)} finished for every seed"
    if partial:
        text += f", {len(partial)} for some seeds"
    if missing:
        text += f"; no finished seed yet: {', '.join(f'`{n}`' for n in missing)}"
    text += f". Stale run seeds (other recipe than the params', never tabulated): {stale}"
    return Para(text + ".")


def stale_section(params: dict, names: list[str], defined: set[str], results: Results) -> list[Block]:
    """Every run seed whose metrics.json is not of the params reported, with what to do about it."""
    items = []
    for name in names:
        by_reason: dict[str, list[int]] = {}
        for seed, why in sorted(results.run(name).stale.items()):
            by_reason.setdefault(why, []).append(seed)
        stage = ("python -m pipeline_src.teacher" if name == params["teacher"]["run"]
                 else f"python -m pipeline_src.train --run {name}")
        for why, seeds in by_reason.items():
            folders = ", ".join(f"`{Path(params['paths']['runs']) / name / f'seed{k}'}`" for k in seeds)
            listed = ", ".join(map(str, seeds))
            if name in defined:
                todo = (f"To tabulate it, delete {folders} and re-run `{stage} --seed K --params "
                        f"{params['_source']}` (with this report's --set options, if any) for K = {listed}; "
                        "or report it with the params it was trained with.")
            else:
                todo = f"Define the run in {params['_source']} and re-train it, or delete {folders}."
            items.append(f"`{name}` {tables.seed_list(seeds)}: {why}. {todo}")
    if not items:
        return []
    return [Heading(2, "Stale results (left out of every table and figure)"), Bullets(tuple(items))]


def _first_with(histories: dict[int, dict], key: str) -> dict | None:
    return next((h for _, h in sorted(histories.items()) if key in h), None)


def _names(runs: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in runs)


def lr_figure(histories: dict[str, dict[int, dict]], path: Path) -> list[Block]:
    """Figure 3 (top): every distinct LR schedule, with the runs that share it."""
    curves, no_curve = {}, []
    for name, hs in histories.items():
        if hs:
            h = _first_with(hs, "lr_curve")
            if h is None:
                no_curve.append(name)
            else:
                curves[name] = h["lr_curve"]
    blocks: list[Block] = [Heading(3, "Figure 3 (top): learning-rate schedules")]
    if curves:
        groups = plots.lr_schedule(curves, path)
        blocks += [Figure(path, f"figures/{path.name}",
                          "Learning rate against epoch (lr_curve of history.json, first finished seed)"),
                   Table(("curve", "runs with this schedule"),
                         tuple((str(i), _names(g)) for i, g in enumerate(groups, 1)))]
    else:
        blocks.append(Para("Not drawn: no finished run has an `lr_curve` in its history.json."))
    if no_curve:
        blocks.append(Para(f"Runs whose history.json has no `lr_curve` (not drawn): {_names(no_curve)}."))
    return blocks


def val_figure(params: dict, paper: dict, histories: dict[str, dict[int, dict]], path: Path) -> list[Block]:
    """Figure 3 (bottom): validation top-1 per epoch, one panel per table column and ranking."""
    panels = [(f"{paper['tables'][t]['cite']}, {col['label']}", [r["run"] for r in col["rows"] if r["run"]])
              for t in COMPARISON_TABLES for col in paper["tables"][t]["columns"]
              if any(r["run"] for r in col["rows"])]
    single, loo = params["study"]["single_trick"], params["study"]["leave_one_out"]
    panels.append(("Single tricks", [single["base"]] + [f"single-{t}" for t in single["tricks"]]))
    panels.append(("Leave one out", [loo["stack"]] + [f"loo-{t}" for t in loo["tricks"]]))
    series = {n: plots.top1_band(histories[n]) for _, runs in panels for n in runs}
    blocks: list[Block] = [Heading(3, "Figure 3 (bottom): validation top-1 per epoch")]
    if plots.val_top1(panels, series, path):
        blocks.append(Figure(path, f"figures/{path.name}",
                             "Validation top-1 per epoch: the line is the mean over the seeds with a history.json, "
                             "the shaded band their min-max (no band where one seed ran)"))
    else:
        blocks.append(Para("Not drawn: no run of the tables has a history.json with validation accuracy."))
    return blocks


def gap_figure(fig4: dict, histories: dict[str, dict[int, dict]], num_classes: int | None,
               path: Path) -> list[Block]:
    """Figure 4: logit gaps without vs with label smoothing, and the optimum gap when K and eps are known."""
    blocks: list[Block] = [Heading(3, f"{fig4['cite']}: {fig4['title']}")]
    gaps = {role: [g for _, h in sorted(histories[fig4[role]].items()) for g in h.get("logit_gaps", [])]
            for role in ("without", "with")}
    lacking = [fig4[role] for role in ("without", "with") if not gaps[role]]
    if lacking:
        return blocks + [Para(f"Not drawn: no logit gaps (history.json) for {_names(lacking)}.")]
    smoothed = _first_with(histories[fig4["with"]], "label_smoothing")
    eps = None if smoothed is None else float(smoothed["label_smoothing"])
    usable = num_classes is not None and eps is not None and 0 < eps < 1
    optimum = plots.optimal_gap(num_classes, eps) if usable else None
    plots.logit_gaps((fig4["without"], gaps["without"]), (fig4["with"], gaps["with"]), eps, optimum, path)
    blocks.append(Figure(path, f"figures/{path.name}",
                         f"Logit gaps of `{fig4['without']}` vs `{fig4['with']}` (all finished seeds)"))
    if num_classes is None:
        blocks.append(Para("The optimum-gap line is not drawn: the number of classes is unknown "
                           "(`classes.json` not found)."))
    elif eps is None:
        blocks.append(Para(f"The optimum-gap line is not drawn: the history.json of `{fig4['with']}` has no "
                           "`label_smoothing`."))
    elif not usable:
        blocks.append(Para(f"The optimum-gap line is not drawn: `{fig4['with']}` has label_smoothing {eps:g}."))
    else:
        blocks.append(Para(f"Dashed line: the optimal gap log((K-1)(1-eps)/eps) = "
                           f"{optimum:.2f} for K = {num_classes}, eps = {eps:g}."))
    return blocks


def figures(params: dict, paper: dict, results: Results, names: list[str], num_classes: int | None,
            out_dir: Path) -> list[Block]:
    """Figures 3 and 4 from the runs' histories; what could not be drawn is said, not hidden."""
    fig_dir = out_dir / "figures"
    histories = {n: results.histories(n) for n in names}
    blocks: list[Block] = [Heading(2, "Figures")]
    blocks += lr_figure(histories, fig_dir / FIGURES[0])
    blocks += val_figure(params, paper, histories, fig_dir / FIGURES[1])
    blocks += gap_figure(paper["figures"]["figure4"], histories, num_classes, fig_dir / FIGURES[2])
    made = {b.path.name for b in blocks if isinstance(b, Figure)}
    for name in FIGURES:  # a figure not drawn this time must not linger from an earlier report
        if name not in made:
            (fig_dir / name).unlink(missing_ok=True)
    return blocks


def notes(paper: dict) -> list[Block]:
    return [Heading(2, "Notes"), Bullets((
        f"{tables.DAGGER} {paper['unverified_note']}",
        "Ours: mean over the finished, non-stale seeds ± sample standard deviation (2+ seeds).",
        "Δ ours: for each seed both a row's run and its column's baseline (first) row finished, the run's "
        "number minus the baseline's with the same seed; the cell is the mean ± std of these differences "
        "[their 95 % Student t interval, df = pairs − 1]. Δ paper: the row minus the baseline row.",
        f"sign: {tables.AGREE} or {tables.DISAGREE} with the paper's Δ only when our interval excludes 0; "
        f"{tables.UNRESOLVED} when it contains 0 or is undefined (one pair). A resolved Δ where the paper "
        f"prints +0.00 counts as {tables.DISAGREE}.",
        "Stale: a training run's seed whose metrics.json records another recipe than the one these params "
        "resolve the run to; such seeds are listed, never tabulated. Transfer results (Tables 8 and 9) "
        "record no recipe yet, so a stale fine-tune cannot be told apart.",
        f"Paper numbers: {paper['source']}; kept in `pipeline_src/report/paper_numbers.yaml`.",
    ))]


def build(params: dict) -> dict[str, Path]:
    """Write report.md, report.html and the figures; returns their paths."""
    paper = load_paper_numbers()
    resolved = {n: params_mod.resolve_run(params, n) for n in params_mod.all_run_names(params)}
    recipes = {n: params_mod.recipe_hash(run_params) for n, run_params in resolved.items()}
    study = params["study"]
    results = Results(params["paths"]["runs"], study["seeds"], recipes, params["_source"],
                      transfer_seeds=study["transfer_seeds"],
                      seeds_of={params["teacher"]["run"]: [params["teacher"]["seed"]]})
    out_dir = Path(params["paths"]["reports"])
    defined = set(resolved)
    names = list(resolved) + [n for n in runs_named(paper) if n not in defined]
    num_classes = read_num_classes(Path(params["paths"]["data"]))
    t = paper["tables"]
    chance = None if num_classes is None else 100.0 / num_classes

    blocks = header(params, num_classes, machine_lines(names, resolved, results)) + [status(names, results)]
    blocks += stale_section(params, names, defined, results)
    blocks += [Heading(2, "Efficient training (Tables 3 and 4)")]
    blocks += tables.table3(t["table3"], results, defined)
    blocks += tables.comparison_table(t["table4"], results, defined, chance)
    blocks += [Heading(2, "Model tweaks (Table 5)")] + tables.comparison_table(t["table5"], results, defined, chance)
    blocks += [Heading(2, "Training refinements (Table 6)"), tables.teacher_line(params["teacher"]["run"], results)]
    blocks += tables.comparison_table(t["table6"], results, defined, chance)
    blocks += [Heading(2, "Each trick's effect")]
    blocks += tables.ranking("single_trick", params, results, defined)
    blocks += tables.ranking("leave_one_out", params, results, defined)
    blocks += [Heading(2, "Transfer learning (Tables 8 and 9)")]
    for name in TRANSFER_TABLES:
        blocks += tables.transfer_table(t[name], results, defined)
    blocks += figures(params, paper, results, names, num_classes, out_dir)
    blocks += notes(paper)

    md, html = out_dir / "report.md", out_dir / "report.html"
    write_text(md, to_markdown(blocks))
    write_text(html, to_html(blocks, f"Bag of Tricks re-run: {params['profile']['name']}"))
    figs = [b.path for b in blocks if isinstance(b, Figure)]
    return {"markdown": md, "html": html, **{p.stem: p for p in figs}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.from_args(args)
        written = build(params)
        for path in written.values():
            print(f"report: wrote {path}")
        try:
            run_id = tracking.log_report(params, written.values())
        except tracking.TrackingError as exc:
            raise tracking.TrackingError(f"the report is written, but logging it to MLflow failed: {exc}") from exc
        print(f"report: logged to MLflow run {run_id}")

    return run_main("report", body)
