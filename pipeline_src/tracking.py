"""Experiment tracking with MLflow; the only module of the project that imports mlflow.

One MLflow run per (run name, seed, profile), found again by its tags, so a killed and resumed
training keeps logging into the same MLflow run. The store is checked at start, so a wrong URI fails
in seconds instead of after an epoch of training (MLflow's own HTTP retries can take minutes).
A run logs its own resolved recipe (not every other run's definition), its description, and at the
end its model; the report and the LR range test log their figures as runs of their own.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

# MLflow 3 sends usage telemetry to its servers from a thread of every process that imports it; a
# pipeline run reaches no network but its own tracking store. MLFLOW_DISABLE_TELEMETRY=false opts in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402 (after the telemetry switch)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import (  # noqa: E402
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline_src import params as params_mod
from pipeline_src.errors import InputError
from pipeline_src.params import flatten

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DB_NAME = "mlflow.db"
# Artifacts beside a SQLite store; not ./mlruns, which `mlflow server` would take for a folder store.
ARTIFACT_DIR_NAME = "mlartifacts"
PROBE_TIMEOUT_S = 5.0
# During training a failed logging call is retried with doubling waits for this long, then the run
# goes on without it (the checkpoint is already saved) and the call is tried again at the next one.
RETRY_FOR_S = 120.0
RETRY_FIRST_WAIT_S = 1.0
TRUNCATED = "...[truncated]"
FINISHED, FAILED, RUNNING = "FINISHED", "FAILED", "RUNNING"
MODEL_ARTIFACTS = "model"  # artifact folder of a run's final weights and their meta
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description
# Sections that define other runs, not the one being logged.
RUN_DEFINITIONS = ("runs", "tricks", "study")


class TrackingError(InputError, RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


def default_uri() -> str:
    return f"sqlite:///{REPO_ROOT / DEFAULT_DB_NAME}"


def resolve_uri(params: dict) -> str:
    """`tracking.uri` if set, else $MLFLOW_TRACKING_URI, else the SQLite file in the repo root."""
    return params["tracking"]["uri"] or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def _fix_hint() -> str:
    return (
        f"set tracking.uri in the params file (or --set tracking.uri=...), or $MLFLOW_TRACKING_URI, "
        f"to a reachable server or a writable sqlite:///path/mlflow.db; the default is {default_uri()}"
    )


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _probe(uri: str) -> None:
    """Fail in seconds, naming the URI, when the store is unreachable or unwritable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError as exc:
            raise TrackingError(
                f"{url} answered HTTP {exc.code}: is {uri} an MLflow tracking server? Otherwise {_fix_hint()}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({getattr(exc, 'reason', exc)}); start "
                f"it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), or {_fix_hint()}"
            ) from exc
    elif uri.startswith("sqlite:///"):
        # MLflow retries a SQLite engine that cannot open for about 100 s; probe with sqlite3 first.
        db = _sqlite_path(uri)
        if not db.parent.is_dir():
            raise TrackingError(
                f"tracking store {uri}: folder {db.parent} does not exist; create it or {_fix_hint()}"
            )
        try:
            conn = sqlite3.connect(db, timeout=PROBE_TIMEOUT_S)
            try:
                conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or folder
                conn.rollback()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise TrackingError(
                f"tracking store {uri}: cannot open {db} for writing ({exc}); {_fix_hint()}"
            ) from exc


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite store: two jobs creating its tables at once fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(f"{_sqlite_path(uri)}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _connect(uri: str) -> MlflowClient:
    _probe(uri)
    return _store_call(uri, "opening the store", MlflowClient, tracking_uri=uri)


def _store_call(uri: str, what: str, fn, *args, **kwargs):
    """Run the first calls against the store, turning MLflow/DB errors into one clear message."""
    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        raise TrackingError(f"tracking store {uri}: {what} failed ({exc.message}); {_fix_hint()}") from exc
    except Exception as exc:  # SQLAlchemy and requests errors surface here unwrapped
        raise TrackingError(
            f"tracking store {uri}: {what} failed ({type(exc).__name__}: {exc}); {_fix_hint()}"
        ) from exc


def artifact_location(params: dict, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: `tracking.artifact_root`, else beside a SQLite store.

    A relative root is taken from the repo root, not from the working directory; a URI (s3://,
    mlflow-artifacts:/...) is used as given. None leaves the choice to the tracking server.
    """
    root = params["tracking"]["artifact_root"]
    if root is None:
        if not uri.startswith("sqlite:///"):
            return None
        return (_sqlite_path(uri).resolve().parent / ARTIFACT_DIR_NAME).as_uri()
    if ":/" in root:
        return root.rstrip("/")
    path = Path(root).expanduser()
    return (path if path.is_absolute() else REPO_ROOT / path).resolve().as_uri()


def _check_location(uri: str, exp: Any, location: str | None) -> None:
    """MLflow fixes an experiment's artifact folder at creation; refuse to log to another one silently."""
    if location is None or exp.artifact_location.rstrip("/") == location:
        return
    raise TrackingError(
        f"tracking store {uri}: experiment '{exp.name}' keeps its artifacts at {exp.artifact_location}, "
        f"but tracking.artifact_root gives {location} (was the store made on another machine or path?); "
        f"set tracking.artifact_root to {exp.artifact_location} to keep using it, or set "
        "tracking.experiment to a new name to start an experiment there"
    )


def _experiment_id(client: MlflowClient, uri: str, name: str, create: bool,
                   location: str | None = None) -> str | None:
    exp = _store_call(uri, f"reading experiment '{name}'", client.get_experiment_by_name, name)
    if exp is None and create:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            exp = _store_call(uri, f"reading experiment '{name}'", client.get_experiment_by_name, name)
            if exp is None:  # not a concurrent run creating it first: a real failure
                raise TrackingError(
                    f"tracking store {uri}: creating experiment '{name}' failed ({exc.message})"
                ) from exc
    if exp is None:
        return None
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"tracking store {uri}: experiment '{name}' is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment"
        )
    if create:
        _check_location(uri, exp, location)
    return exp.experiment_id


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _quoted(value: str) -> str:
    if "'" in value:
        raise TrackingError(f"tag value {value!r} contains a quote; use run/profile names without quotes")
    return f"'{value}'"


def _retried(what: str, fn, *args, budget_s: float = RETRY_FOR_S, **kwargs) -> bool:
    """Call `fn`, retrying with back-off for `budget_s`; False, after one warning line, if it never worked."""
    wait, deadline = RETRY_FIRST_WAIT_S, time.monotonic() + budget_s
    while True:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # MLflow, SQLAlchemy and requests errors: all mean "the store did not take it"
            if time.monotonic() + wait > deadline:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                how_long = f"for {budget_s:.0f} s" if budget_s > 0 else "again (the store is still down)"
                print(f"tracking: warning: {what} failed {how_long} ({type(exc).__name__}: {detail}); "
                      "training goes on and it is logged again at the next epoch or on resume",
                      file=sys.stderr, flush=True)
                return False
            time.sleep(wait)
            wait *= 2


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class Tracker:
    """Logs one training run; `with tracker:` marks it FAILED on an exception, else FINISHED.

    A disabled Tracker (DDP ranks other than 0) has the same methods and does nothing.
    """

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None, resumed: bool = False):
        self._client = client
        self.run_id = run_id
        self.resumed = resumed
        self._done = False
        self._pending: list[list[Metric]] = []  # batches an outage kept out of the store, oldest first

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch scalars (train loss, val top-1/top-5, lr, images/s) at `step` (the epoch).

        Never raises for an unreachable store: it retries (`RETRY_FOR_S`), then warns and keeps the
        batch to send before the next one. While the store is known to be down, one try per call.
        """
        if self._client is None:
            return
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                entries.append(Metric(key, float(value), now, int(step)))
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metric '{key}' at step {step}: {value!r} is not a number") from exc
        budget = RETRY_FOR_S if not self._pending else 0.0
        self._pending.append(entries)
        while self._pending:
            batch = self._pending[0]
            if not _retried(f"logging metrics of step {batch[0].step}", self._log_entries, batch, budget_s=budget):
                return
            self._pending.pop(0)

    def _log_entries(self, entries: list[Metric]) -> None:
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_history(self, history: list[dict], step_key: str = "epoch") -> None:
        """Log the rows of a resumed run's history that the store lacks (an outage, or a kill between
        the checkpoint and the logging); `step_key` names each row's step."""
        if self._client is None or not history:
            return
        first = next(k for k in history[0] if k != step_key)
        logged: set[int] = set()

        def read() -> None:
            logged.update(m.step for m in self._client.get_metric_history(self.run_id, first))

        if not _retried("reading the logged history", read):
            return
        for row in history:
            if row[step_key] not in logged:
                self.log_metrics({k: v for k, v in row.items() if k != step_key}, step=row[step_key])

    def _log_params(self, params: dict[str, Any]) -> None:
        """Log flattened params; ones already logged must hold the same value (MLflow forbids changes)."""
        wanted = {key: _text(value, MAX_PARAM_VAL_LENGTH) for key, value in params.items()}
        logged = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k in wanted if k in logged and logged[k] != wanted[k])
        if changed:
            diffs = "; ".join(f"{k}: logged {logged[k]!r}, now {wanted[k]!r}" for k in changed[:5])
            raise TrackingError(
                f"MLflow run {self.run_id} was started with different params ({diffs}); resume with the "
                "params it was started with, or delete its checkpoint and MLflow run to start over"
            )
        missing = [Param(k, v) for k, v in wanted.items() if k not in logged]
        for chunk in _chunks(missing, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._client is None:
            return
        entries = [RunTag(key, _text(value, MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload a file (into `folder`); an outage past the retry time only warns (the file stays on disk)."""
        if self._client is None:
            return
        _retried(f"logging artifact {path}", self._client.log_artifact, self.run_id, str(path), folder)

    def log_model(self, model_file: str | Path, meta: dict) -> None:
        """The final weights file and its meta (as JSON, for reading in the UI) under `model/`.

        The file `checkpoint.save_final_model` wrote, not `mlflow.pytorch.log_model`: that pickles
        the whole nn.Module (loading it needs weights_only=False and this package importable) and
        infers pip requirements. This file loads with torch.load(weights_only=True) anywhere and
        rebuilds with models.build_model(meta["model"], meta["num_classes"]).
        """
        if self._client is None:
            return
        self.log_artifact(model_file, MODEL_ARTIFACTS)
        with tempfile.TemporaryDirectory() as tmp:
            meta_file = Path(tmp) / "meta.json"
            meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            self.log_artifact(meta_file, MODEL_ARTIFACTS)

    def finish(self, status: str = FINISHED) -> None:
        """Mark the run FINISHED or FAILED (after sending what an outage held back); later calls do nothing."""
        if self._client is None or self._done:
            return
        if status not in (FINISHED, FAILED):
            raise ValueError(f"finish(status={status!r}): use {FINISHED!r} or {FAILED!r}")
        budget = RETRY_FOR_S if status == FINISHED else 0.0  # a failing run reports its own error soon
        while self._pending and _retried("logging held-back metrics", self._log_entries, self._pending[0],
                                         budget_s=budget):
            self._pending.pop(0)
        if not _retried(f"marking MLflow run {self.run_id} {status}", self._client.set_terminated, self.run_id,
                        status=status, budget_s=budget):
            print(f"tracking: warning: MLflow run {self.run_id} stays RUNNING in the store; the run's files "
                  "are complete", file=sys.stderr, flush=True)
        self._done = True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish(FINISHED)
            return
        try:  # the error that ended the run is the one to report, not a second one from the store
            self.finish(FAILED)
        except Exception as second:
            print(f"tracking: warning: could not mark MLflow run {self.run_id} FAILED ({second})",
                  file=sys.stderr, flush=True)


def recipe_params(params: dict) -> dict[str, Any]:
    """What one run is logged with: its own resolved recipe, not the params file's other runs.

    A training run (params resolved by params_mod.resolve_run) logs its name, tricks and the sections it
    trains with (params_mod.recipe_of), plus the teacher section when it distils. Any other stage logs the
    shared sections, without the run definitions and the per-run sections it does not train with.
    """
    if "run" in params:
        tree = {"run": params["run"], **params_mod.recipe_of(params)}
        if params["train"]["distill"]:
            tree["teacher"] = params["teacher"]
    else:
        skip = (*RUN_DEFINITIONS, *params_mod.RUN_SECTIONS)
        tree = {k: v for k, v in params.items() if k not in skip and not k.startswith("_")}
    return flatten(tree)


def description(params: dict) -> str | None:
    """The params file's description of a resolved run, for the MLflow run's description."""
    return params_mod.run_description(params, params["run"]["name"]) if "run" in params else None


def start_run(params: dict, run_name: str, seed: int, tags: dict[str, Any], enabled: bool = True,
              resume: bool = True) -> Tracker:
    """The Tracker of (run, seed): resumes its unfinished MLflow run (if `resume`), else starts a new one.

    The run folder, when `tags` has a `run_dir`, is part of the identity: an ad-hoc run never resumes
    the pipeline's MLflow run of the same name, nor the other way round.
    Tags the run with run, seed, profile, git commit, the run's description and the caller's `tags`
    (beton sha256s), and logs `recipe_params(params)`. `enabled=False` (DDP ranks other than 0)
    gives a no-op.
    """
    if not enabled:
        return Tracker()
    uri = resolve_uri(params)
    experiment = params["tracking"]["experiment"]
    profile = params["profile"]["name"]
    _probe(uri)  # first: a clear error before any lock file is made
    with _store_lock(uri):
        client = _connect(uri)
        exp_id = _experiment_id(client, uri, experiment, create=True, location=artifact_location(params, uri))
    identity = {"run": run_name, "seed": str(seed), "profile": profile}
    if "run_dir" in tags:  # an ad-hoc run (run_folders.py) is another MLflow run than the pipeline's
        identity["run_dir"] = str(tags["run_dir"])
    filter_string = " and ".join(f"tags.{key} = {_quoted(value)}" for key, value in identity.items())
    found = _store_call(
        uri, "searching runs", client.search_runs, [exp_id], filter_string,
        max_results=1, order_by=["attributes.start_time DESC"],
    )
    if resume and found and found[0].info.status != FINISHED:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RUNNING)
        tracker = Tracker(client, run_id, resumed=True)
    else:
        run = client.create_run(exp_id, run_name=f"{run_name}-seed{seed}", tags=identity)
        tracker = Tracker(client, run.info.run_id)
    note = description(params)
    tracker.set_tags({"git_commit": git_commit(), "params_file": params.get("_source", ""),
                      **({DESCRIPTION_TAG: note} if note else {}), **tags, **identity})
    tracker._log_params(recipe_params(params))
    return tracker


def log_report(params: dict, files: Iterable[Path]) -> str:
    """One finished MLflow run `report` per built report, holding its files (figures under figures/).

    A run of its own, tagged run=report and the profile but no seed, so it is never read as a
    training run; returns its id.
    """
    uri = resolve_uri(params)
    _probe(uri)
    with _store_lock(uri):
        client = _connect(uri)
        exp_id = _experiment_id(client, uri, params["tracking"]["experiment"], create=True,
                                location=artifact_location(params, uri))
    tags = {"run": "report", "profile": params["profile"]["name"], "git_commit": git_commit(),
            "params_file": params.get("_source", ""), DESCRIPTION_TAG: params["profile"]["description"]}
    run = _store_call(uri, "creating the report run", client.create_run, exp_id, run_name="report", tags=tags)
    with Tracker(client, run.info.run_id) as tracker:
        for path in files:
            path = Path(path)
            tracker.log_artifact(path, "figures" if path.suffix == ".png" else None)
    return run.info.run_id


def _history(client: MlflowClient, run_id: str, key: str) -> list[list[float]]:
    """[[step, value], ...] by step; a step logged again after a resume keeps its latest value."""
    latest: dict[int, Metric] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step].timestamp:
            latest[m.step] = m
    return [[step, latest[step].value] for step in sorted(latest)]


def read_runs(params: dict) -> list[dict]:
    """The latest finished MLflow run of each (run, seed) of this profile, with full histories.

    Each item: run, seed, run_id, tags, params, metrics (final values) and history
    (metric -> [[step, value], ...]); sorted by (run, seed). An absent experiment gives [].
    """
    uri = resolve_uri(params)
    client = _connect(uri)
    exp_id = _experiment_id(client, uri, params["tracking"]["experiment"], create=False)
    if exp_id is None:
        return []
    profile = _quoted(params["profile"]["name"])
    filter_string = f"tags.profile = {profile} and attributes.status = '{FINISHED}'"
    latest: dict[tuple[str, int], Any] = {}
    token = None
    while True:
        page = _store_call(
            uri, "searching runs", client.search_runs, [exp_id], filter_string,
            order_by=["attributes.start_time DESC"], page_token=token,
        )
        for run in page:
            if "seed" not in run.data.tags:  # the report's own runs
                continue
            key = (run.data.tags["run"], int(run.data.tags["seed"]))
            latest.setdefault(key, run)
        token = page.token
        if not token:
            break
    out = []
    for (name, seed), run in sorted(latest.items()):
        run_id = run.info.run_id
        out.append({
            "run": name,
            "seed": seed,
            "run_id": run_id,
            "tags": dict(run.data.tags),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "history": {key: _history(client, run_id, key) for key in sorted(run.data.metrics)},
        })
    return out
