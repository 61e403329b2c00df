"""Tracking against a real MLflow server and a SQLite file: logging, resume, fail-fast, no-op ranks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline_src import params as params_mod
from pipeline_src import tracking
from pipeline_src.tracking import TrackingError

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
MLFLOW = Path(sys.executable).parent / "mlflow"
STARTUP_LIMIT_S = 120
BETON_TAGS = {"beton_train_sha256": "ab" * 32, "beton_val_sha256": "cd" * 32}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _params(run: str, *sets: str) -> dict:
    return params_mod.resolve_run(params_mod.load(PARAMS_FILE, list(sets)), run)


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend, killed after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
           "--artifacts-destination", str(root / "artifacts")]
    # The job runner spawns a pool of consumers this test never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = root / "server.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - start > STARTUP_LIMIT_S:
                tail = log_path.read_text()[-3000:]
                pytest.fail(f"mlflow server not healthy after {STARTUP_LIMIT_S} s:\n{tail}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        print(f"\nmlflow server startup: {time.monotonic() - start:.1f} s")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_server_logs_resumes_and_reads_back(server_uri, tmp_path):
    params = _params("baseline", f"tracking.uri={server_uri}", "tracking.experiment=server-test")
    # the run's own resolved recipe; `_source` (the params file) goes in as the params_file tag instead
    flat = tracking.recipe_params(params)
    assert {k.split(".")[0] for k in flat} == {"run", "loader", "augment", "model", "train"}

    first = tracking.start_run(params, "baseline", 0, BETON_TAGS)
    assert first.enabled and not first.resumed
    epoch0 = {"train_loss": 2.0, "val_top1": 0.1, "val_top5": 0.5, "lr": 0.1, "images_per_s": 90.0}
    first.log_metrics(epoch0, step=0)
    first.log_metrics({"train_loss": 1.5, "val_top1": 0.2}, step=1)
    artifact = tmp_path / "history.json"
    artifact.write_text('{"epochs": 2}\n')
    first.log_artifact(artifact)
    # Killed here: never finished. The resumed training must land in the same MLflow run.
    second = tracking.start_run(params, "baseline", 0, BETON_TAGS)
    assert second.resumed and second.run_id == first.run_id
    second.log_metrics({"train_loss": 1.4, "val_top1": 0.25}, step=1)
    second.log_metrics({"train_loss": 1.0, "val_top1": 0.4}, step=2)
    second.finish()

    client = MlflowClient(server_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "baseline-seed0"
    assert set(run.data.params) == set(flat)
    assert run.data.params["run.name"] == "baseline" and run.data.params["train.base_lr"] == str(params["train"]["base_lr"])
    assert run.data.params["train.step_milestones"] == json.dumps(params["train"]["step_milestones"])
    assert run.data.params["model.zero_gamma"] == "false"
    tags = run.data.tags
    assert tags["params_file"] == params["_source"]
    assert tags["mlflow.note.content"] == params["runs"]["baseline"]["description"]
    assert (tags["run"], tags["seed"], tags["profile"]) == ("baseline", "0", "cpu-embedded")
    assert tags["beton_train_sha256"] == "ab" * 32
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["history.json"]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    (item,) = tracking.read_runs(params)
    assert (item["run"], item["seed"], item["run_id"]) == ("baseline", 0, first.run_id)
    assert item["history"]["train_loss"] == [[0, 2.0], [1, 1.4], [2, 1.0]]
    assert item["history"]["val_top5"] == [[0, 0.5]]
    assert item["metrics"]["val_top1"] == 0.4
    assert item["params"]["train.epochs"] == str(params["train"]["epochs"])

    # A finished run is not resumed: training it again makes a new run, and the report reads the newest.
    again = tracking.start_run(params, "baseline", 0, BETON_TAGS)
    assert not again.resumed and again.run_id != first.run_id
    with again:
        again.log_metrics({"train_loss": 0.9}, step=0)
    (item,) = tracking.read_runs(params)
    assert item["run_id"] == again.run_id and item["history"] == {"train_loss": [[0, 0.9]]}


def test_sqlite_default_store_in_repo_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    long_text = "x" * 9000
    params = _params("t4-warmup")
    assert tracking.resolve_uri(params) == f"sqlite:///{tmp_path / 'mlflow.db'}"

    with pytest.raises(RuntimeError, match="diverged"):
        with tracking.start_run(params, "t4-warmup", 1, {"note": long_text}) as tracker:
            tracker.log_metrics({"train_loss": 3.0}, step=0)
            (tmp_path / "model.json").write_text("{}")
            tracker.log_artifact(tmp_path / "model.json")
            raise RuntimeError("loss diverged")
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    artifacts = (tmp_path / tracking.ARTIFACT_DIR_NAME).as_uri()
    assert run.info.artifact_uri.startswith(artifacts + "/")
    assert (Path(run.info.artifact_uri.removeprefix("file://")) / "model.json").is_file()
    assert run.info.status == "FAILED"
    assert run.data.tags["git_commit"] == "unknown"  # tmp_path is not a git work tree
    note = run.data.tags["note"]
    assert len(note) == tracking.MAX_TAG_VAL_LENGTH and note.endswith(tracking.TRUNCATED)
    assert tracking.read_runs(params) == []  # failed runs are not reported

    # A failed run is resumed (same id); params that did not change are accepted ...
    resumed = tracking.start_run(params, "t4-warmup", 1, {})
    assert resumed.resumed and resumed.run_id == tracker.run_id
    assert client.get_run(resumed.run_id).info.status == "RUNNING"
    with pytest.raises(TypeError, match="metric 'val_top1' at step 3: 'n/a' is not a number"):
        resumed.log_metrics({"train_loss": 1.0, "val_top1": "n/a"}, step=3)
    # ... but resuming with changed params is refused, naming the key.
    logged = _params("t4-warmup")["train"]["epochs"]
    changed = _params("t4-warmup", "train.epochs=30")
    with pytest.raises(TrackingError, match=rf"train\.epochs: logged '{logged}', now '30'"):
        tracking.start_run(changed, "t4-warmup", 1, {})
    # Another seed is another MLflow run.
    other = tracking.start_run(params, "t4-warmup", 2, {})
    assert not other.resumed and other.run_id != tracker.run_id


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_uri(_params("baseline")) == "http://127.0.0.1:1"
    assert tracking.resolve_uri(_params("baseline", "tracking.uri=sqlite:///x.db")) == "sqlite:///x.db"


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    params = _params("baseline", f"tracking.uri={uri}")
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.start_run(params, "baseline", 0, {})
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert uri in msg and "mlflow server" in msg and "MLFLOW_TRACKING_URI" in msg and "tracking.uri" in msg
    with pytest.raises(TrackingError, match=uri):
        tracking.read_runs(params)


def test_unusable_sqlite_path_fails_fast(tmp_path):
    missing = tmp_path / "no" / "such" / "mlflow.db"
    with pytest.raises(TrackingError, match=rf"{missing.parent} does not exist"):
        tracking.start_run(_params("baseline", f"tracking.uri=sqlite:///{missing}"), "baseline", 0, {})
    a_folder = tmp_path / "db_is_a_folder"
    a_folder.mkdir()
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"sqlite:///{a_folder}: cannot open.*MLFLOW_TRACKING_URI"):
        tracking.start_run(_params("baseline", f"tracking.uri=sqlite:///{a_folder}"), "baseline", 0, {})
    assert time.monotonic() - start < 10


def test_disabled_tracker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # An unreachable URI proves the disabled tracker never talks to the store.
    params = _params("baseline", f"tracking.uri=http://127.0.0.1:{_free_port()}")
    with tracking.start_run(params, "baseline", 0, BETON_TAGS, enabled=False) as tracker:
        assert not tracker.enabled and tracker.run_id is None
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        tracker.set_tags({"a": "b"})
        tracker.log_artifact(tmp_path / "missing.json")
    tracker.finish("FAILED")
    assert list(tmp_path.iterdir()) == []


def _flaky_store(monkeypatch) -> dict:
    """Metric batches fail while state['fail'] > 0 (a locked or unreachable store); counts the calls."""
    from mlflow.exceptions import MlflowException

    real = MlflowClient.log_batch
    state = {"calls": 0, "fail": 0}

    def flaky(self, run_id, metrics=(), **kwargs):
        if metrics:
            state["calls"] += 1
            if state["fail"] > 0:
                state["fail"] -= 1
                raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(tracking, "RETRY_FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(tracking, "RETRY_FOR_S", 0.3)
    return state


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_outage_is_retried_then_warned_and_the_metrics_are_sent_later(tmp_path, monkeypatch, capsys):
    params = _params("baseline", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = tracking.start_run(params, "baseline", 0, {})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = _flaky_store(monkeypatch)
    store["fail"] = 2  # the first try and one retry fail, the second retry works
    tracker.log_metrics({"train_loss": 2.0}, step=0)
    assert store["calls"] == 3 and _steps(client, tracker.run_id, "train_loss") == [0]

    store["fail"] = 10**6  # down for longer than the retry time
    start = time.monotonic()
    tracker.log_metrics({"train_loss": 1.5}, step=1)  # no exception: training goes on
    assert time.monotonic() - start < 5
    assert "tracking: warning: logging metrics of step 1 failed" in capsys.readouterr().err
    store["calls"] = 0
    tracker.log_metrics({"train_loss": 1.0}, step=2)  # known down: one try only, held back too
    assert store["calls"] == 1 and _steps(client, tracker.run_id, "train_loss") == [0]

    store["fail"] = 0  # back
    tracker.log_metrics({"train_loss": 0.5}, step=3)
    assert _steps(client, tracker.run_id, "train_loss") == [0, 1, 2, 3]
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_resume_logs_the_history_epochs_the_store_lacks(tmp_path):
    params = _params("baseline", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    first = tracking.start_run(params, "baseline", 0, {})
    first.log_metrics({"train_loss": 2.0, "lr": 0.1}, step=0)  # epoch 1 was checkpointed, never logged
    history = [{"train_loss": 2.0, "lr": 0.1, "epoch": 0}, {"train_loss": 1.0, "lr": 0.1, "epoch": 1}]
    resumed = tracking.start_run(params, "baseline", 0, {})
    assert resumed.run_id == first.run_id
    resumed.log_history(history)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _steps(client, first.run_id, "train_loss") == [0, 1]  # epoch 0 not logged twice
    assert _steps(client, first.run_id, "lr") == [0, 1]


def test_exit_keeps_the_first_error_when_the_store_also_fails(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    params = _params("baseline", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = tracking.start_run(params, "baseline", 0, {})

    def locked(*args, **kwargs):
        raise MlflowException("database is locked")

    monkeypatch.setattr(MlflowClient, "set_terminated", locked)
    with pytest.raises(ValueError, match="the first error"):
        with tracker:
            raise ValueError("the first error")
    assert f"MLflow run {tracker.run_id}" in capsys.readouterr().err


def _artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def test_artifact_root_is_taken_from_the_repo_root_and_never_changed_silently(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = _params("baseline", f"tracking.uri={uri}", "tracking.artifact_root=store/artifacts")
    with tracking.start_run(params, "baseline", 0, {}) as tracker:
        pass
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "artifacts").as_uri() + "/")
    assert tracking.artifact_location(_params("baseline", "tracking.artifact_root=s3://bucket/x/"), uri) == "s3://bucket/x"

    # the experiment exists with that root: another root (a moved repo, another machine) is refused
    moved = _params("baseline", f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path / 'elsewhere'}")
    with pytest.raises(TrackingError, match=r"keeps its artifacts at .*store/artifacts.*tracking\.artifact_root"):
        tracking.start_run(moved, "baseline", 1, {})


def test_final_model_is_an_artifact_that_loads_with_weights_only(tmp_path):
    import torch

    from pipeline_src.checkpoint import load_model_weights, save_final_model
    from pipeline_src.models import build_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = _params("t5-resnet-d", f"tracking.uri={uri}", "model.width=0.0625")
    model = build_model(params["model"], 3)
    meta = {"run": "t5-resnet-d", "seed": 0, "model": params["model"], "num_classes": 3, "wnids": ["a", "b", "c"]}
    save_final_model(tmp_path / "model.pt", model.state_dict(), meta)
    with tracking.start_run(params, "t5-resnet-d", 0, {}) as tracker:
        tracker.log_model(tmp_path / "model.pt", meta)
    client = MlflowClient(uri)
    assert _artifact_files(client, tracker.run_id, "model") == {"model/model.pt", "model/meta.json"}
    local = Path(client.download_artifacts(tracker.run_id, "model", str(tmp_path / "down")))
    state, got = load_model_weights(local / "model.pt")
    assert got == meta == json.loads((local / "meta.json").read_text())
    rebuilt = build_model(got["model"], got["num_classes"])
    rebuilt.load_state_dict(state)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_report_run_holds_the_figures_and_is_not_a_training_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = params_mod.load(PARAMS_FILE, [f"tracking.uri={uri}"])
    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "val_top1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run_id = tracking.log_report(params, [tmp_path / "report.md", tmp_path / "val_top1.png"])
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["run"] == "report"
    assert run.data.tags["mlflow.note.content"] == params["profile"]["description"]
    assert _artifact_files(client, run_id) == {"report.md", "figures"}
    assert _artifact_files(client, run_id, "figures") == {"figures/val_top1.png"}
    assert tracking.read_runs(params) == []


def test_a_stage_other_than_training_logs_no_run_definitions():
    params = params_mod.load(PARAMS_FILE)
    logged = tracking.recipe_params(params)
    assert "transfer.detection.lr" in logged and "paths.runs" in logged
    assert not [k for k in logged if k.split(".")[0] in (*tracking.RUN_DEFINITIONS, *params_mod.RUN_SECTIONS)]
    distilled = tracking.recipe_params(_params("t6-distill"))
    assert distilled["teacher.run"] == "teacher" and "distill.temperature" in distilled
    base = params["study"]["single_trick"]["base"]
    assert tracking.description(_params("single-mixup")) == f"{base} + mixup (study.single_trick)"
    assert tracking.description(params) is None


def test_an_adhoc_run_never_resumes_the_pipelines_mlflow_run(tmp_path):
    params = _params("baseline", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    pipeline = tracking.start_run(params, "baseline", 0, {"run_dir": "data/runs/baseline/seed0"})  # killed
    adhoc_dir = "data/runs/adhoc/baseline-0123456789ab/seed0"
    adhoc = tracking.start_run(params, "baseline", 0, {"run_dir": adhoc_dir})
    assert not adhoc.resumed and adhoc.run_id != pipeline.run_id
    adhoc.finish(tracking.FAILED)
    again = tracking.start_run(params, "baseline", 0, {"run_dir": "data/runs/baseline/seed0"})
    assert again.resumed and again.run_id == pipeline.run_id  # not the newer, ad-hoc one


@pytest.mark.parametrize("setting, disabled", [(None, True), ("false", False)])
def test_mlflow_telemetry_is_off_unless_the_user_opts_in(setting, disabled):
    # MLflow itself turns telemetry off under pytest and CI: the child process has neither variable.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    if setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = setting
    code = ("import pipeline_src.tracking\n"
            "from mlflow.telemetry.utils import is_telemetry_disabled\n"
            "print(is_telemetry_disabled())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PARAMS_FILE.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(disabled)
