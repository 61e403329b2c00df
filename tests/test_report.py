"""The report stage: numbers over seeds, paired-seed deltas with their intervals and sign verdicts,
rankings, missing and stale runs, the machine header, figures, self-contained HTML, the paper's numbers,
determinism. Fake run outputs (as train.py writes them) with known numbers."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_src import params as params_mod
from pipeline_src.report import build, plots, tables
from pipeline_src.report.paper import PaperNumbersError, PaperValue, load_paper_numbers, runs_named
from pipeline_src.report.render import to_markdown
from pipeline_src.report.results import Results, Summary, t_quantile

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]
T_975 = {1: 12.706204736174705, 2: 4.302652729911275}  # Student t 0.975 quantiles (published tables)
T2 = T_975[2]
MACHINE = {"cpu": "Test CPU 9000", "cpu_flags": ["avx512f", "avx512_bf16"], "gpu": None}


def _paired(run: list[float], ref: list[float]) -> str:
    """The Δ cell computed independently: numpy mean, std (ddof 1) and t interval of the differences."""
    d = np.asarray(run) - np.asarray(ref)
    mean, std = d.mean(), d.std(ddof=1)
    half = T_975[len(d) - 1] * std / math.sqrt(len(d))
    return f"{mean:+.2f} ± {std:.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _params(tmp_path: Path, seeds=SEEDS) -> tuple[Path, list[str]]:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    sets = [f"paths.data={tmp_path / 'data'}", f"paths.runs={tmp_path / 'runs'}",
            f"paths.reports={tmp_path / 'reports'}", f"study.seeds={json.dumps(seeds)}"]
    return path, sets


def _history(run: str, seed: int, top1: float, schedule: str, gaps=None, eps=0.0) -> dict:
    epochs = [{"epoch": e, "lr": 0.1, "train_loss": 2.0 - e / 10, "images_per_s": 100.0, "epoch_time_s": 1.0,
               "top1": top1 - (3 - e), "top5": 90.0, "val_loss": 1.0} for e in range(4)]
    if schedule == "cosine":
        curve = [[i / 4, 0.05 * (1 + math.cos(math.pi * i / 16))] for i in range(16)]
    else:
        curve = [[i / 4, 0.1 if i < 8 else 0.01] for i in range(16)]
    return {"run": run, "seed": seed, "tricks": [], "epochs": epochs, "lr_curve": curve,
            "logit_gaps": gaps if gaps is not None else [], "label_smoothing": eps}


def _write_run(params: dict, run: str, top1: list, top5: list | None = None, schedule: str = "step",
               gaps=None, eps: float = 0.0, recipe: str | None = None, precision: str | None = None,
               machine: dict | None = MACHINE) -> None:
    """metrics.json and history.json as train.py writes them, with the recipe the params resolve the run
    to unless `recipe` is given (a stale run)."""
    run_params = params_mod.resolve_run(params, run)
    for seed, (t1, t5) in enumerate(zip(top1, top5 or [90.0] * len(top1))):
        if t1 is None:
            continue
        out = Path(params["paths"]["runs"]) / run / f"seed{seed}"
        out.mkdir(parents=True)
        metrics = {"top1": t1, "top5": t5, "val_loss": 1.0, "train_loss": 1.5,
                   "images_per_s": 100.0 if run == "baseline" else 250.0, "wall_time_s": 4.0,
                   "recipe": recipe or params_mod.recipe_hash(run_params),
                   "precision": precision or run_params["train"]["precision"]}
        if machine is not None:
            metrics["machine"] = machine
        (out / "metrics.json").write_text(json.dumps(metrics))
        (out / "history.json").write_text(json.dumps(_history(run, seed, t1, schedule, gaps, eps)))


def _stale_recipe(params: dict, run: str) -> str:
    """The recipe of `run` trained with `--set train.epochs=2`: what an ad-hoc run records."""
    run_params = params_mod.resolve_run(params, run)
    run_params["train"]["epochs"] = 2
    return params_mod.recipe_hash(run_params)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """Run outputs with hand-checkable numbers for three seeds; the rest of the runs is missing."""
    tmp_path = tmp_path_factory.mktemp("fake")
    path, sets = _params(tmp_path)
    params = params_mod.load(path, sets + ["study.transfer_seeds=[0, 1]"])  # fine-tunes for 2 of the 3 seeds
    _write_run(params, "baseline", [70, 72, 74])  # 72 ± 2; top-5 90 ± 0
    # each seed 1.5 (±0.1) above the baseline's: paired, resolved; unpaired the ±2 spreads would swamp it
    _write_run(params, "t4-warmup", [71.5, 73.4, 75.6], [89, 89, 89])
    _write_run(params, "t4-zero-gamma", [71, 72, None])  # seed 2 missing: 2 pairs, df = 1
    _write_run(params, "t4-no-bias-decay", [99, 99, 99], recipe=_stale_recipe(params, "t4-no-bias-decay"))
    _write_run(params, "t4-amp", [10, None, None], recipe=_stale_recipe(params, "t4-amp"))  # stale seed 0
    _write_run(params, "t4-amp", [None, 72, 74])  # seeds 1, 2 current: Δ exactly 0 on both
    for run, offset in [("single-warmup", 3), ("single-amp", 1), ("single-mixup", 0.5)]:
        _write_run(params, run, [70 + offset, 72 + offset, 74 + offset], precision="fp32" if run == "single-amp"
                   else None)
    _write_run(params, "single-cosine", [69.5, 71, 72.5])  # -1 ± 0.5: unresolved
    for run, t1 in [("t6-mixup", 80), ("loo-cosine", 78), ("loo-mixup", 81), ("loo-warmup", 79.5)]:
        _write_run(params, run, [t1] * 3)
    _write_run(params, "teacher", [85] * 3, machine=None)
    _write_run(params, "t6-cosine", [76, 76, 76], schedule="cosine", gaps=[8.0, 9.5, 10.0, 11.0])
    _write_run(params, "t6-label-smoothing", [77, 77, 77], schedule="cosine", gaps=[3.5, 4.0, 4.5, 5.0], eps=0.1)
    for seed, m in enumerate([60.0, 62.0]):
        out = tmp_path / "runs" / "transfer" / "detection" / "t6-cosine" / f"seed{seed}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"map": m}))
    betons = tmp_path / "data" / "betons"
    betons.mkdir(parents=True)
    (betons / "classes.json").write_text(json.dumps({"wnids": [f"n{i:08d}" for i in range(10)]}))
    (betons / "manifest.json").write_text(json.dumps({"source": "embedded", "counts": {"train": 1600, "val": 400}}))
    written = build.build(params)
    return tmp_path, written


def _cells(md: str, heading: str) -> list[list[str]]:
    """The first markdown table after `heading`: header row, then body rows, as lists of cells."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return [rows[0]] + rows[2:]


def _table(md: str, heading: str, key: str = "run") -> dict[str, dict[str, str]]:
    """The table under `heading` as {key column without backticks: {column: cell}}."""
    header, *body = _cells(md, heading)
    k = header.index(key)
    return {row[k].strip("`"): dict(zip(header, row)) for row in body}


def _section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def test_t_quantile_matches_published_table():
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert t_quantile(df) == pytest.approx(t, abs=1e-4)
    s = Summary((70.0, 72.0, 74.0))
    assert (s.mean, s.std) == (72.0, 2.0)
    assert s.ci95 == pytest.approx((72 - T2 * 2 / math.sqrt(3), 72 + T2 * 2 / math.sqrt(3)))
    assert Summary((1.0, 2.0)).ci95 == pytest.approx((1.5 - T_975[1] * 0.5, 1.5 + T_975[1] * 0.5))
    assert Summary((1.0,)).ci95 is None and Summary((1.0,)).std is None


def _signs(md: str, heading: str, run: str) -> list[str]:
    header, *body = _cells(md, heading)
    row = next(r for r in body if r[1] == f"`{run}`")
    return [c for h, c in zip(header, row) if h == "sign"]


def test_table4_deltas_are_paired_over_seeds_with_t_intervals(fake):
    md = fake[1]["markdown"].read_text()
    t4 = _table(md, "### Table 4, BS = 256")
    assert t4["baseline"]["top-1 ours"] == "72.00 ± 2.00" and t4["baseline"]["seeds"] == "3/3"
    w = t4["t4-warmup"]
    assert w["top-1 ours"] == "73.50 ± 2.05" and w["top-1 paper"] == "76.03" and w["paired seeds"] == "3"
    assert w["Δ top-1 ours"] == _paired([71.5, 73.4, 75.6], [70, 72, 74]) == "+1.50 ± 0.10 [+1.25, +1.75]"
    assert (w["Δ top-1 paper"], w["Δ top-5 ours"], w["Δ top-5 paper"]) == ("+0.16", "-1.00 ± 0.00 [-1.00, -1.00]",
                                                                          "+0.11")
    assert _signs(md, "### Table 4, BS = 256", "t4-warmup") == [tables.AGREE, tables.DISAGREE]
    z = t4["t4-zero-gamma"]  # seed 2 missing: paired over seeds 0 and 1 only, df = 1
    assert z["seeds"] == "2/3" and z["paired seeds"] == "2" and z["top-1 ours"] == "71.50 ± 0.71"
    assert z["Δ top-1 ours"] == _paired([71, 72], [70, 72]) == "+0.50 ± 0.71 [-5.85, +6.85]"
    assert _signs(md, "### Table 4, BS = 256", "t4-zero-gamma") == [tables.UNRESOLVED, tables.UNRESOLVED]
    a = t4["t4-amp"]  # identical to the baseline seed by seed: the interval [0, 0] does not exclude 0
    assert a["Δ top-1 ours"] == "+0.00 ± 0.00 [+0.00, +0.00]"
    assert _signs(md, "### Table 4, BS = 256", "t4-amp") == [tables.UNRESOLVED, tables.UNRESOLVED]
    assert "Summary, Table 4, BS = 256: top-1: 1 of 3 deltas resolved, 1 of them with the paper's sign (1 not " \
           "computed: run missing); top-5: 1 of 3 deltas resolved, 0 of them with the paper's sign (1 not " \
           "computed: run missing)." in md
    note = _section(md, "### Table 4, BS = 256")
    assert "`t4-zero-gamma` (seed 2 missing)" in note and "pair only the seeds both runs finished" in note


def test_stale_runs_are_listed_and_never_tabulated(fake):
    tmp_path, written = fake
    md = written["markdown"].read_text()
    t4 = _table(md, "### Table 4, BS = 256")
    nbd = t4["t4-no-bias-decay"]
    assert (nbd["top-1 ours"], nbd["Δ top-1 ours"], nbd["sign"], nbd["Δ top-1 paper"]) == ("—", "—", "—", "+0.29")
    assert t4["t4-amp"]["top-1 ours"] == "73.00 ± 1.41" and t4["t4-amp"]["seeds"] == "2/3"  # seed 0's 10 is out
    note = _section(md, "### Table 4, BS = 256")
    assert "Stale, left out of this table (see Stale results): `t4-no-bias-decay` (seeds 0, 1, 2), " \
           "`t4-amp` (seed 0)." in note
    stale = _section(md, "## Stale results (left out of every table and figure)")
    runs = tmp_path / "runs"
    recipe = _stale_recipe(params_mod.load(*_params(tmp_path)), "t4-amp")
    assert f"`t4-amp` seed 0: trained with recipe {recipe[:12]}" in stale
    assert f"To tabulate it, delete `{runs / 't4-amp' / 'seed0'}` and re-run `python -m pipeline_src.train " \
           "--run t4-amp --seed K" in stale and "for K = 0;" in stale
    assert "`t4-no-bias-decay` seeds 0, 1, 2: trained with recipe" in stale and "for K = 0, 1, 2;" in stale
    assert "Stale run seeds (other recipe than the params', never tabulated): 4." in md
    assert "Missing runs: `t4-no-bias-decay` (only stale seeds)." in note
    params = params_mod.load(*_params(tmp_path))
    recipes = {n: params_mod.recipe_hash(params_mod.resolve_run(params, n)) for n in params_mod.all_run_names(params)}
    results = Results(runs, SEEDS, recipes, params["_source"])
    assert set(results.histories("t4-amp")) == {1, 2}  # the figures never see a stale seed
    assert set(results.run("t4-amp").stale) == {0} and results.run("t4-amp").missing_seeds == []


def test_one_seed_leaves_every_delta_unresolved(tmp_path):
    path, sets = _params(tmp_path, seeds=[0])
    params = params_mod.load(path, sets)
    _write_run(params, "baseline", [70])
    _write_run(params, "t4-warmup", [75])
    md = build.build(params)["markdown"].read_text()
    assert "With one seed no standard deviation or interval is defined, so every delta's sign is unresolved" in md
    w = _table(md, "### Table 4, BS = 256")["t4-warmup"]
    assert w["top-1 ours"] == "75.00" and w["Δ top-1 ours"] == "+5.00 (1 seed, no interval)"
    assert _signs(md, "### Table 4, BS = 256", "t4-warmup") == [tables.UNRESOLVED, tables.UNRESOLVED]
    assert "top-1: 0 of 1 deltas resolved, 0 of them with the paper's sign" in md


def test_sign_verdict_needs_the_interval_to_exclude_zero():
    from pipeline_src.report.results import PairedDelta
    up = PairedDelta((0, 1, 2), Summary((0.9, 1.0, 1.1)))
    down = PairedDelta((0, 1, 2), Summary((-0.9, -1.0, -1.1)))
    wide = PairedDelta((0, 1, 2), Summary((-1.0, 1.0, 3.0)))
    assert [tables.sign_verdict(d, 0.5) for d in (up, down, wide)] == [tables.AGREE, tables.DISAGREE,
                                                                       tables.UNRESOLVED]
    assert tables.sign_verdict(down, -0.3) == tables.AGREE and tables.sign_verdict(up, 0.001) == tables.DISAGREE
    assert tables.sign_verdict(PairedDelta((0,), Summary((5.0,))), 1.0) == tables.UNRESOLVED


def test_table6_teacher_transfer_and_runs_not_defined(fake):
    md = fake[1]["markdown"].read_text()
    # trained once (teacher.seed 0): the other seeds' teacher folders are never read
    assert "Distillation teacher `teacher` (1/1 seeds, every student seed distils from it): top-1 85.00" in md
    t6 = _table(md, "### Table 6, ResNet-50-D")
    assert t6["t6-label-smoothing"]["top-1 ours"].startswith("77.00")
    assert t6["t6-label-smoothing"]["Δ top-1 ours"] == "—"  # its baseline t5-resnet-d has not run
    assert t6["t6-label-smoothing"]["paired seeds"] == "0"
    assert "`t6-distill` (" in _section(md, "### Table 6, ResNet-50-D").split("Missing runs:")[1]
    t8 = _table(md, "### Table 8")
    assert t8["t6-cosine"]["VOC mAP ours"] == "61.00 ± 1.41" and t8["t6-cosine"]["fine-tune seeds"] == "2/2"
    assert t8["t6-cosine"]["ImageNet top-1 ours"] == "76.00 ± 0.00"
    assert t8["t6-label-smoothing"]["ImageNet top-1 paper"] == "78.34 †"
    assert t8["t6-mixup"]["VOC mAP paper"] == "81.10 †" and "+ distill w/o mixup †" in t8["t6-distill"]["backbone"]
    assert "`t8-resnet-b-standard` (no finished seed)" in _section(md, "### Table 8")
    assert "Missing segmentation results:" in _section(md, "### Table 9")
    assert "- † Not yet checked against the paper's PDF" in md


def test_single_trick_and_leave_one_out_ranked_by_paired_effect(fake):
    md = fake[1]["markdown"].read_text()
    single = list(_table(md, "### Single tricks").values())
    assert [r["trick"] for r in single[:4]] == ["warmup", "amp", "mixup", "cosine"]
    assert [r["effect top-1"] for r in single[:3]] == ["+3.00 ± 0.00 [+3.00, +3.00]", "+1.00 ± 0.00 [+1.00, +1.00]",
                                                       "+0.50 ± 0.00 [+0.50, +0.50]"]
    assert single[3]["effect top-1"] == _paired([69.5, 71, 72.5], [70, 72, 74]) == "-1.00 ± 0.50 [-2.24, +0.24]"
    assert [r["top-1 verdict"] for r in single[:5]] == [tables.HELPS] * 3 + [tables.UNRESOLVED, "—"]
    assert [r["rank"] for r in single[:5]] == ["1", "2", "3", "4", "—"]
    assert [r["trick"] for r in single[4:]] == ["large_batch", "zero_gamma", "no_bias_decay", "resnet_d",
                                                "label_smoothing"]  # missing: params order, last
    loo = list(_table(md, "### Leave one out").values())
    assert [(r["trick"], r["effect top-1"].split(" ")[0], r["top-1 verdict"]) for r in loo[:3]] == [
        ("cosine", "+2.00", tables.HELPS), ("warmup", "+0.50", tables.HELPS), ("mixup", "-1.00", tables.HURTS)]


def test_header_says_where_the_data_came_from(fake):
    md = fake[1]["markdown"].read_text()
    assert "Profile: `cpu-embedded`" in md and "NOT ImageNet" in md
    assert "Seeds: 0, 1, 2. Every ± is the sample standard deviation over these seeds; every [lo, hi] is a 95 % " \
           "Student t interval over seeds of the paired differences" in md
    assert "Classes: 10" in md and "`counts.train`: 1600" in md and "`source`: embedded" in md
    machine = "CPU Test CPU 9000 (precision-relevant flags: avx512f avx512_bf16), no GPU"
    lines = [line for line in md.splitlines() if line.startswith("- Machine (")]
    assert len(lines) == 2 and lines[0].startswith("- Machine (`baseline`, `t4-warmup`") and lines[0].endswith(machine)
    assert lines[1] == ("- Machine (`teacher`, from metrics.json): not recorded (metrics.json written before "
                        "train.py recorded its machine)")
    precision = next(line for line in md.splitlines() if line.startswith("- Effective precision per run: "))
    groups = dict(g.split(": ", 1) for g in precision.removeprefix("- Effective precision per run: ").split("; "))
    assert "`t4-amp`" in groups["amp (bf16 autocast on CPU)"] and "`baseline`" in groups["fp32"]
    assert groups["fp32, asked amp"] == "`single-amp`"  # an amp run this CPU kept at fp32


def test_figures_written_and_html_self_contained(fake):
    tmp_path, written = fake
    figs = sorted(p.name for p in (tmp_path / "reports" / "figures").iterdir())
    assert figs == ["logit_gaps.png", "lr_schedule.png", "val_top1.png"]
    for name in figs:
        assert (tmp_path / "reports" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["markdown"].read_text()
    assert "](figures/lr_schedule.png)" in md
    assert "log((K-1)(1-eps)/eps) = 4.39 for K = 10, eps = 0.1" in md  # log(9 * 0.9 / 0.1) = log 81
    # two distinct schedules: step (baseline first) and cosine
    curves = _table(md, "### Figure 3 (top)", key="curve")
    assert len(curves) == 2 and "`baseline`" in curves["1"]["runs with this schedule"]
    html = written["html"].read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for ref in ("http://", "https://", "href=", "<link", "<script", "url("):
        assert ref not in html
    assert "<td>+1.50 ± 0.10 [+1.25, +1.75]</td>" in html


def test_figure3_bottom_band_is_min_max_over_seeds():
    hs = {s: _history("r", s, t1, "step") for s, t1 in enumerate([70.0, 72.0, 77.0])}
    del hs[2]["epochs"][0]["top1"]  # seed 2 did not evaluate epoch 1: only epochs all seeds have
    band = plots.top1_band(hs)
    assert [p.epoch for p in band] == [2, 3, 4]
    assert band[-1] == plots.BandPoint(4, 73.0, 70.0, 77.0) and band[0] == plots.BandPoint(2, 71.0, 68.0, 75.0)


def test_rerun_gives_identical_files(fake):
    tmp_path, written = fake
    files = sorted(p for p in (tmp_path / "reports").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    path, sets = _params(tmp_path)
    build.build(params_mod.load(path, sets + ["study.transfer_seeds=[0, 1]"]))
    assert sorted(p for p in (tmp_path / "reports").rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in before.items())


def test_zero_finished_runs_still_render_via_the_cli(tmp_path):
    path, sets = _params(tmp_path, seeds=[0])
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    (tmp_path / "reports" / "figures" / "val_top1.png").write_bytes(b"stale")
    cmd = [sys.executable, "-m", "pipeline_src.report", "--params", str(path)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # not the repo's store
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "report: logged to MLflow run" in proc.stdout
    md = (tmp_path / "reports" / "report.md").read_text()
    names = set(params_mod.all_run_names(params_mod.load(path, sets))) | set(runs_named(load_paper_numbers()))
    assert f"Runs: 0 of {len(names)} finished for every seed" in md
    assert "`baseline` (no finished seed)" in md and "classes.json` not found" in md
    assert "Not drawn: no finished run has an `lr_curve`" in md
    assert not (tmp_path / "reports" / "figures" / "val_top1.png").exists()  # stale figure removed
    assert "data:image/png" not in (tmp_path / "reports" / "report.html").read_text()


def test_malformed_metrics_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "runs" / "baseline" / "seed0"
    out.mkdir(parents=True)
    path, sets = _params(tmp_path, seeds=[0])
    recipe = params_mod.recipe_hash(params_mod.resolve_run(params_mod.load(path, sets), "baseline"))
    (out / "metrics.json").write_text(json.dumps({"top1": 70.0, "recipe": recipe}))
    assert build.main(["--params", str(path)] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert str(out / "metrics.json") in err and "'top5'" in err


def test_paper_numbers_match_the_paper_tables():
    paper = load_paper_numbers()
    t = paper["tables"]
    t4 = t["table4"]["columns"]
    assert [c["label"] for c in t4] == ["BS = 256", "BS = 1024"]
    assert (t4[0]["rows"][0]["top1"], t4[0]["rows"][0]["top5"]) == (PaperValue(75.87), PaperValue(92.70))
    assert t4[1]["rows"][2]["top1"] == PaperValue(76.37) and t4[1]["rows"][4]["run"] == "efficient"
    assert [r["run"] for r in t4[0]["rows"]] == ["baseline", "t4-warmup", "t4-zero-gamma", "t4-no-bias-decay", "t4-amp"]
    assert [r["run"] for r in t4[1]["rows"]] == ["t4-large", "t4-large-warmup", "t4-large-zero-gamma",
                                                 "t4-large-no-bias-decay", "efficient"]
    t5 = t["table5"]["columns"][0]["rows"]
    assert (t5[3]["label"], t5[3]["top1"].value, t5[3]["top5"].value, t5[1]["gflops"].value) == \
        ("ResNet-50-D", 77.16, 93.52, 4.36)
    r50d, inception, mobilenet = t["table6"]["columns"]
    assert r50d["rows"][5]["top1"] == PaperValue(79.29) and r50d["rows"][5]["run"] == "t6-distill-mixup"
    assert inception["rows"][3]["top5"].value == 94.01 and mobilenet["rows"][4]["top1"].value == 73.28
    assert t["table3"]["rows"][2]["efficient"]["min_per_epoch"].value == 1.9
    t8, t9 = t["table8"]["rows"], t["table9"]["rows"]
    assert t8[3]["imagenet_top1"] == PaperValue(78.34, unverified=True) and t8[3]["map"] == PaperValue(80.71)
    assert t8[4]["unverified"] and t8[4]["map"] == PaperValue(80.96, unverified=True) and not t8[3]["unverified"]
    assert t8[6]["map"] == PaperValue(81.33) and t8[0]["run"] == "t8-resnet-b-standard"
    assert t9[2]["miou"] == PaperValue(39.33) and t9[2]["pixel_accuracy"] == PaperValue(79.25)
    assert t9[6]["miou"] == PaperValue(38.40, unverified=True) and t9[5]["pixel_accuracy"] == PaperValue(78.47)
    # every row reproduced by a run of today's params.yaml names a run that exists there
    defined = set(params_mod.all_run_names(params_mod.load(ROOT / "params.yaml")))
    named = {r["run"] for name in ("table4", "table5", "table6") for c in t[name]["columns"] for r in c["rows"]}
    assert named - {None} <= defined


def test_figures_say_what_they_could_not_draw(tmp_path):
    hist = {"a": {0: _history("a", 0, 70.0, "step", gaps=[9.0, 10.0])},
            "b": {0: {k: v for k, v in _history("b", 0, 71.0, "cosine", gaps=[4.0, 5.0]).items()
                      if k not in ("lr_curve", "label_smoothing")}}}
    md = to_markdown(build.lr_figure(hist, tmp_path / "lr.png"))
    assert "Runs whose history.json has no `lr_curve` (not drawn): `b`." in md and (tmp_path / "lr.png").is_file()
    fig4 = {"cite": "Figure 4", "title": "gaps", "without": "a", "with": "b"}
    md = to_markdown(build.gap_figure(fig4, hist, 10, tmp_path / "gaps.png"))
    assert "history.json of `b` has no `label_smoothing`" in md and (tmp_path / "gaps.png").is_file()
    hist["b"][0]["label_smoothing"] = 0.1
    md = to_markdown(build.gap_figure(fig4, hist, None, tmp_path / "gaps.png"))
    assert "the number of classes is unknown" in md
    hist["a"][0]["logit_gaps"] = []
    md = to_markdown(build.gap_figure(fig4, hist, 10, tmp_path / "gaps.png"))
    assert "Not drawn: no logit gaps (history.json) for `a`." in md


def test_paper_numbers_file_errors_name_the_key(tmp_path):
    text = (ROOT / "pipeline_src" / "report" / "paper_numbers.yaml").read_text()
    bad = tmp_path / "paper.yaml"
    bad.write_text(text.replace("run: t4-warmup, top1: 76.03,", "run: t4-warmup, top1: seventy-six,"))
    with pytest.raises(PaperNumbersError, match=r"tables\.table4\.columns\[0\]\.rows\[1\]\.top1: expected a number"):
        load_paper_numbers(bad)


def test_malformed_history_is_a_clear_error(tmp_path, capsys):
    params_path, sets = _params(tmp_path, seeds=[0])
    _write_run(params_mod.load(params_path, sets), "baseline", [70.0])
    path = tmp_path / "runs" / "baseline" / "seed0" / "history.json"
    data = json.loads(path.read_text())
    data["lr_curve"] = [0.1, 0.2]
    path.write_text(json.dumps(data))
    assert build.main(["--params", str(params_path)] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'lr_curve' must be a list of [epoch, lr] pairs" in err


def test_malformed_machine_record_is_a_clear_error(tmp_path, capsys):
    params_path, sets = _params(tmp_path, seeds=[0])
    _write_run(params_mod.load(params_path, sets), "baseline", [70.0], machine="AMD")
    assert build.main(["--params", str(params_path)] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "runs" / "baseline" / "seed0" / "metrics.json") in err and "key 'machine'" in err


def test_runs_near_chance_are_flagged_with_the_classes_chance(tmp_path):
    """10 classes: chance 10 %; 24.9 is within 15 points of it (flagged), 25.1 and the baseline are not."""
    path, sets = _params(tmp_path)
    params = params_mod.load(path, sets)
    _write_run(params, "baseline", [60, 62, 64])
    _write_run(params, "t4-warmup", [24.8, 24.9, 25.0])
    _write_run(params, "t4-zero-gamma", [25.0, 25.1, 25.2])
    betons = tmp_path / "data" / "betons"
    betons.mkdir(parents=True)
    (betons / "classes.json").write_text(json.dumps({"wnids": [f"n{i:08d}" for i in range(10)]}))
    md = build.build(params)["markdown"].read_text()
    rows = _table(md, "### Table 4, BS = 256")
    assert rows["t4-warmup"]["top-1 ours"] == f"24.90 ± 0.10 {tables.NEAR_CHANCE}"
    assert rows["t4-zero-gamma"]["top-1 ours"] == "25.10 ± 0.10"
    assert rows["baseline"]["top-1 ours"] == "62.00 ± 2.00"
    note = _section(md, "### Table 4, BS = 256")
    assert f"{tables.NEAR_CHANCE} Near chance (top-1 within 15 points of chance, 10.00 %): `t4-warmup` (24.90)." in note
    assert "`t4-zero-gamma` (" not in note
    # without classes.json the chance is unknown: nothing is flagged
    shutil.rmtree(betons)
    md = build.build(params)["markdown"].read_text()
    assert tables.NEAR_CHANCE not in md
