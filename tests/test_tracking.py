"""MLflow tracking (`--mlflow`, tracking.py): a real tiny run logged into a SQLite store, checked
through MlflowClient: one parent run per run folder, one nested run per unit, params, metric
histories, artifacts and tags; resuming adds nothing twice; the CLI as typed; and the one-line
error without MLflow.

One store per module (its migrations take seconds); every check finds its runs by run folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")

import cnnlab  # noqa: E402
from cnnlab.api import PreparedRun, execute, plan_run, prepare, report  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.config import DataSelection, HardwareRequest, Recipe  # noqa: E402
from cnnlab.errors import ConfigError  # noqa: E402
from cnnlab.results import UnitStatus  # noqa: E402
from cnnlab.runfolder import RunFolder  # noqa: E402
from cnnlab.runner import UnitOutcome  # noqa: E402
from cnnlab.tracking import DEFAULT_URI, MlflowTracker, _absolute_uri, safe_metric_name  # noqa: E402
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder  # noqa: E402

pytestmark = pytest.mark.mlflow

EPOCHS = 2
SEEDS = (0, 1)
CPU = HardwareRequest(device="cpu", precision="fp32", compile="off", threads=1)


@dataclasses.dataclass
class Tracked:
    uri: str
    data_dir: Path
    spec: Path
    prepared: PreparedRun
    summary: object
    tracker: MlflowTracker

    @property
    def client(self):
        return mlflow.tracking.MlflowClient(tracking_uri=self.uri)

    @property
    def folder(self) -> RunFolder:
        return self.prepared.folder


def runs_of(client, folder: Path, experiment: str = "cnnlab") -> tuple[list, list]:
    """(parent runs, nested runs) of a run folder."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    path = str(Path(folder).resolve())
    quote = '"' if "'" in path else "'"
    runs = client.search_runs([experiment_id], f"tags.`cnnlab.run_folder` = {quote}{path}{quote}", max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for info in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return paths


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Tracked:
    """Two arms (two learning rates) x 2 seeds x 2 epochs of a tiny CNN, tracked into one store."""
    tmp = tmp_path_factory.mktemp("tracking")
    data_dir = tmp / "data"
    write_dataset_folder(data_dir / "mnist", learnable_arrays(256, 64))
    spec = tmp / "small.toml"
    spec.write_text(SMALL_SPEC)
    uri = f"sqlite:///{tmp}/mlflow.db"
    plan = plan_run(
        [spec],
        recipes=[
            Recipe(epochs=EPOCHS, batch_size=64, learning_rate=0.01),
            Recipe(epochs=EPOCHS, batch_size=64, learning_rate=0.02),
        ],
        seeds=SEEDS,
        data=DataSelection(data_dir=str(data_dir), limit_train=128, limit_test=64),
        hardware=CPU,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated files: a checksum warning
        prepared = prepare(plan, runs_dir=tmp / "runs")
    tracker = MlflowTracker(uri)
    outcome = execute(prepared, tracker=tracker)
    assert not outcome.failed
    summary = report(prepared.folder.path, image_format="svg")
    tracker.finish(summary)
    return Tracked(uri, data_dir, spec, prepared, summary, tracker)


def test_one_parent_run_with_the_plan_the_report_and_arm_means(tracked):
    client = tracked.client
    (parent,), nested = runs_of(client, tracked.folder.path)
    assert parent.info.status == "FINISHED" and parent.info.run_name == tracked.folder.path.name
    assert parent.info.run_id == tracked.tracker.run_id
    params, tags = parent.data.params, parent.data.tags
    assert params["seeds"] == "0,1" and params["data.limit_train"] == "128" and params["data.dataset"] == "mnist"
    assert params["hardware_request.device"] == "cpu" and params["hardware.precision"] == "fp32"
    assert json.loads(params["arms"]) == [arm.name for arm in tracked.prepared.plan.arms]
    assert tags["cnnlab.version"] == cnnlab.__version__ and tags["cnnlab.precision"] == "fp32"
    assert tags["cnnlab.device_name"] == tracked.prepared.hardware.device_name
    assert tags["cnnlab.run_folder"] == str(tracked.folder.path.resolve())
    assert tags.get("cnnlab.git_commit") == tracked.folder.environment().get("git_commit")
    artifacts = artifact_paths(client, parent.info.run_id)
    for name in ("config.toml", "environment.json", "report.html", "report.md", "comparison.csv", "curves_all.svg"):
        assert name in artifacts, name
    assert [row.arm for row in tracked.summary.rows] == ["small", "small@lr=0.02"]  # made safe for MLflow
    for row in tracked.summary.rows:
        assert parent.data.metrics[f"test_accuracy.{safe_metric_name(row.arm)}"] == pytest.approx(
            row.test_accuracy.mean
        )


def test_one_nested_run_per_unit_with_params_metrics_tags_and_files(tracked):
    client = tracked.client
    (parent,), nested = runs_of(client, tracked.folder.path)
    units = tracked.prepared.plan.units()
    assert len(nested) == len(units) == 4
    by_label = {run.info.run_name: run for run in nested}
    assert set(by_label) == {unit.label for unit in units}
    for unit in units:
        run = by_label[unit.label]
        run_id, params, tags, metrics = run.info.run_id, run.data.params, run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["cnnlab.state"] == "finished" and "cnnlab.error" not in tags
        assert tags["cnnlab.hardware.device"] == "cpu" and tags["cnnlab.version"] == cnnlab.__version__
        assert params["seed"] == str(unit.seed) and params["model"] == "small" and params["arm"] == unit.arm.name
        assert float(params["learning_rate"]) == unit.arm.recipe.learning_rate
        assert params["epochs"] == str(EPOCHS) and params["optimizer"] == "adam" and params["schedule"] == "none"
        unit_dir = tracked.folder.unit_dir(unit)
        history = json.loads((unit_dir / "history.json").read_text())
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert logged == [(r["epoch"], pytest.approx(r[key])) for r in history], key
        seconds = client.get_metric_history(run_id, "seconds")
        assert [m.step for m in seconds] == list(range(1, EPOCHS + 1))
        final = json.loads((unit_dir / "metrics.json").read_text())
        assert metrics["test_accuracy"] == pytest.approx(final["test_accuracy"])
        assert metrics["test_loss"] == pytest.approx(final["test_loss"])
        assert metrics["final_val_accuracy"] == pytest.approx(final["val_accuracy"])
        assert metrics["train_accuracy"] == pytest.approx(final["train_accuracy"])
        assert metrics["wall_seconds"] > 0 and metrics["samples_per_second"] > 0 and metrics["epochs"] == EPOCHS
        assert "best_epoch" not in metrics  # no best checkpoint in the recipe
        prefix = f"units/{unit.arm.folder}/seed-{unit.seed}"
        artifacts = artifact_paths(client, run_id)
        for name in ("history.csv", "history.json", "metrics.json", "weights.pt", "status.json", "predictions.pt"):
            assert f"{prefix}/{name}" in artifacts, name
        assert f"units/{unit.arm.folder}/spec.toml" in artifacts
        assert not any(path.endswith("checkpoint.pt") for path in artifacts)


def test_resuming_logs_into_the_same_runs_without_duplicates(tracked):
    client = tracked.client
    (parent,), nested = runs_of(client, tracked.folder.path)
    before = {run.info.run_id: len(client.get_metric_history(run.info.run_id, "loss")) for run in nested}
    again = MlflowTracker(tracked.uri)  # a new process: `cnnlab compare --resume RUN_DIR --mlflow`
    again.start(tracked.prepared)
    assert again.run_id == parent.info.run_id
    for unit in tracked.prepared.plan.units():
        again.log_unit(UnitOutcome(unit, "finished", metrics=None))
    again.finish(tracked.summary)
    (parent_after,), nested_after = runs_of(client, tracked.folder.path)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    after = {run.info.run_id: len(client.get_metric_history(run.info.run_id, "loss")) for run in nested_after}
    assert after == before and set(before.values()) == {EPOCHS}
    arm = safe_metric_name(tracked.summary.rows[0].arm)
    assert len(client.get_metric_history(parent.info.run_id, f"test_accuracy.{arm}")) == 1
    assert mlflow.active_run() is None  # the fluent run stack is left alone


def test_a_failed_unit_fails_its_run_and_the_parent_until_resumed(tracked, tmp_path):
    """A copy of the run folder (a quote in its name) with one unit failed, in its own experiment;
    then the unit finishes on resume: the same nested run, FINISHED, its error tag gone."""
    copy = tmp_path / "it's a copy"
    shutil.copytree(tracked.folder.path, copy)
    folder = RunFolder(copy)
    unit = tracked.prepared.plan.units()[-1]
    error = "RuntimeError: loss is NaN"
    metrics = folder.unit_dir(unit) / "metrics.json"
    kept = metrics.read_bytes()
    metrics.unlink()
    folder.set_status(unit, UnitStatus("failed", 1, error))
    prepared = dataclasses.replace(tracked.prepared, folder=folder)
    tracker = MlflowTracker(tracked.uri, experiment="cnnlab-failed")
    tracker.start(prepared)
    tracker.log_unit(UnitOutcome(unit, "failed", error))
    tracker.finish(SimpleNamespace(folder=folder, files=[], rows=[]))
    client = tracked.client
    (parent,), (run,) = runs_of(client, copy, "cnnlab-failed")
    assert run.info.status == "FAILED" and run.data.tags["cnnlab.error"] == error
    assert run.data.tags["cnnlab.state"] == "failed" and "test_accuracy" not in run.data.metrics
    assert f"units/{unit.arm.folder}/seed-{unit.seed}/status.json" in artifact_paths(client, run.info.run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["cnnlab.units_failed"] == "1"

    metrics.write_bytes(kept)  # resumed, and this time it finished
    folder.set_status(unit, UnitStatus("finished", EPOCHS))
    resumed = MlflowTracker(tracked.uri, experiment="cnnlab-failed")
    resumed.start(prepared)
    resumed.log_unit(UnitOutcome(unit, "finished"))
    resumed.finish(SimpleNamespace(folder=folder, files=[], rows=[]))
    (parent_after,), (run_after,) = runs_of(client, copy, "cnnlab-failed")
    assert (parent_after.info.run_id, run_after.info.run_id) == (parent.info.run_id, run.info.run_id)
    assert run_after.info.status == "FINISHED" and "cnnlab.error" not in run_after.data.tags
    assert len(client.get_metric_history(run.info.run_id, "loss")) == EPOCHS
    assert parent_after.info.status == "FINISHED" and parent_after.data.tags["cnnlab.units_failed"] == "0"
    # Artifacts live beside the SQLite database, not in the current folder.
    assert run.info.artifact_uri.startswith(Path(tracked.uri.removeprefix("sqlite:///")).parent.as_uri())


def test_compare_with_mlflow_as_typed(tracked, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    runs_dir = tmp_path / "runs"
    args = ["compare", str(tracked.spec), "--data-dir", str(tracked.data_dir), "--runs-dir", str(runs_dir),
            "--epochs", "1", "--limit-train", "64", "--limit-test", "64", "--seeds", "0,1", "--device", "cpu",
            "--precision", "fp32", "--compile", "off", "--format", "svg", "--mlflow"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    (run_dir,) = runs_dir.iterdir()
    (parent,), nested = runs_of(tracked.client, run_dir)
    assert out.count("MLflow: ") == 1
    flat = "".join(out.split())  # the console wraps long lines
    expected = f"MLflow: experiment cnnlab, run {parent.info.run_id} at {tracked.uri}; see it with `mlflow ui"
    assert "".join(expected.split()) in flat and f"--backend-store-uri{tracked.uri}`" in flat
    assert len(nested) == 2 and {run.info.status for run in nested} == {"FINISHED"}
    assert "report.html" in artifact_paths(tracked.client, parent.info.run_id)
    assert "INFO" not in out + err and "🏃" not in out + err  # no MLflow chatter


def test_default_store_is_sqlite_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _absolute_uri(DEFAULT_URI) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert _absolute_uri("postgresql://host/db") == "postgresql://host/db"


def test_without_mlflow_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ConfigError) as raised:
        MlflowTracker()
    assert str(raised.value) == "--mlflow needs MLflow: pip install 'cnnlab[mlflow]'"


def test_a_store_that_cannot_be_opened_is_one_line_before_training(tracked, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ConfigError) as raised:
        MlflowTracker(f"sqlite:///{blocker}/mlflow.db").start(tracked.prepared)
    message = str(raised.value)
    assert "\n" not in message and "MLflow" in message and str(blocker) in message


def test_mlflow_failing_mid_run_is_a_warning_not_a_stopped_run(tracked, monkeypatch):
    tracker = MlflowTracker(tracked.uri)
    tracker.start(tracked.prepared)

    def locked(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("database is locked")

    monkeypatch.setattr(tracker.client, "log_batch", locked)
    with pytest.warns(UserWarning, match="MLflow could not log .* seed 0: MlflowException: database is locked"):
        tracker.log_unit(UnitOutcome(tracked.prepared.plan.units()[0], "finished"))
