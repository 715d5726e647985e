"""MLflow tracking of a run (`--mlflow`): one parent run per run folder, one nested run per unit.

    tracker = MlflowTracker()                      # $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    outcome = execute(prepared, tracker=tracker)   # start(), then log_unit() as each unit ends
    tracker.finish(report(prepared.folder.path))   # the report, arm means and the parent's status
    print(tracker.describe())

What goes where (experiment "cnnlab" unless told otherwise):

- The parent run (name: the run folder's name; tag `cnnlab.run_folder`: its absolute path, which is
  how `--resume` finds it again) gets the plan as params (`data.*`, `hardware_request.*`,
  `hardware.*`, `seeds`, `arms`, `models`), tags (`cnnlab.version`, `cnnlab.git_commit`,
  `cnnlab.device_name`, `cnnlab.precision`, `cnnlab.device`) and config.toml and environment.json as
  artifacts; at the end the report's files (report.html, report.md, comparison.*, figures) as
  artifacts and `test_accuracy.<arm>` / `test_loss.<arm>` (the means over seeds) as metrics.
- Each unit's nested run (tag `mlflow.parentRunId`; name: the unit's label; tag `cnnlab.unit`:
  `<arm folder>/seed-N`) gets params `model`, `arm`, `seed` and every recipe key (an option as its
  command-line text, e.g. `schedule = cosine:decay_steps=100`; an option left unset: `none`),
  per-epoch metrics with `step=epoch` (loss, accuracy, val_loss, val_accuracy, learning_rate,
  seconds = training + validation seconds), final metrics at step 0 (test_loss, test_accuracy,
  final_val_loss, final_val_accuracy — of the final weights, the restored epoch's with a best
  checkpoint —, train_accuracy, train_loss, wall_seconds, train_seconds, seconds_per_epoch,
  samples_per_second, params, train_gflops_per_second, epochs and best/stopped/restored_epoch when
  set), tags (`cnnlab.state`, `cnnlab.error` for a failed unit, the hardware) and its files as
  artifacts under `units/<arm folder>/seed-N/` (the arm's spec under `units/<arm folder>/`).
  Status: FINISHED, or FAILED for a failed unit.
- The parent ends FINISHED when every unit of the plan finished, else FAILED (a unit failed; a
  `--resume` that finishes it sets it back to RUNNING, then FINISHED). A run interrupted by Ctrl-C
  stays RUNNING until it is resumed.

Logging again is idempotent: runs are found by tag before one is made, a param or a metric step
already logged is not logged again, and artifacts are overwritten in place. Only MlflowClient is
used: mlflow's fluent active-run state is never touched, and its INFO logging is turned down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import cnnlab
from cnnlab.config import Recipe
from cnnlab.errors import ConfigError
from cnnlab.options import option_to_text
from cnnlab.runfolder import RunFolder, read_json

if TYPE_CHECKING:
    from cnnlab.api import PreparedRun, ReportSummary
    from cnnlab.config import Unit
    from cnnlab.runner import UnitOutcome

EXPERIMENT = "cnnlab"
DEFAULT_URI = "sqlite:///mlflow.db"
RUN_FOLDER_TAG = "cnnlab.run_folder"
UNIT_TAG = "cnnlab.unit"
PARENT_TAG = "mlflow.parentRunId"
# history.json's keys logged per epoch (seconds: training + validation of the epoch).
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
# metrics.json's keys logged once; val_* get a `final_` prefix (the per-epoch val_* are another series).
FINAL_METRICS = {
    "test_loss": "test_loss",
    "test_accuracy": "test_accuracy",
    "val_loss": "final_val_loss",
    "val_accuracy": "final_val_accuracy",
    "train_accuracy": "train_accuracy",
    "train_loss": "train_loss",
    "wall_seconds": "wall_seconds",
    "train_seconds": "train_seconds",
    "seconds_per_epoch": "seconds_per_epoch",
    "samples_per_second": "samples_per_second",
    "params": "params",
    "train_gflops_per_second": "train_gflops_per_second",
    "epochs": "epochs",
    "best_epoch": "best_epoch",
    "stopped_epoch": "stopped_epoch",
    "restored_epoch": "restored_epoch",
}
# A unit's files that are not logged: the resumable checkpoint (removed once the unit finishes).
SKIPPED_UNIT_FILES = {"checkpoint.pt"}
MAX_PARAM = 6000  # MLflow's limit on a param's value
MAX_TAG = 8000
QUIET_LOGGERS = ("mlflow", "alembic")
_UNSAFE = re.compile(r"[^\w.\- ]")


def safe_metric_name(name: str) -> str:
    """`name` with every character MLflow refuses on some platform replaced by '_'."""
    return _UNSAFE.sub("_", name).strip() or "_"


def _text(value: Any, limit: int = MAX_PARAM) -> str:
    text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """Every recipe key as a param: options as their command-line text, an unset option as `none`."""
    params = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        params[f.name] = _text(option_to_text(value) if dataclasses.is_dataclass(value) else value)
    return params


def plan_params(prepared: PreparedRun) -> dict[str, str]:
    """The plan as the parent run's params."""
    plan = prepared.plan
    params: dict[str, str] = {}
    for prefix, value in (
        ("data", plan.data),
        ("hardware_request", plan.hardware_request),
        ("hardware", prepared.hardware),
    ):
        for key, item in dataclasses.asdict(value).items():
            params[f"{prefix}.{key}"] = _text(item)
    params["seeds"] = ",".join(str(s) for s in plan.seeds)
    params["arms"] = _text(json.dumps([arm.name for arm in plan.arms]))
    params["models"] = _text(",".join(dict.fromkeys(arm.spec.name for arm in plan.arms)))
    if plan.initial_weights is not None:
        params["initial_weights.source"] = _text(plan.initial_weights.source)
        params["initial_weights.sha256"] = plan.initial_weights.sha256
    return params


def _unit_key(unit: Unit) -> str:
    return f"{unit.arm.folder}/seed-{unit.seed}"


def _quoted(value: str) -> str | None:
    """`value` as a string literal of MLflow's search syntax, or None if it holds both quote kinds."""
    for quote in ("'", '"'):
        if quote not in value and "\\" not in value:
            return f"{quote}{value}{quote}"
    return None


def _absolute_uri(uri: str) -> str:
    """A relative SQLite URI made absolute (the database MLflow would open from this folder)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        path, _, query = unquote(uri[len(prefix) :]).partition("?")
        return f"{prefix}{Path(path).resolve()}" + (f"?{query}" if query else "")
    return uri


class MlflowTracker:
    """Tracks a run in MLflow through an explicit MlflowClient (see the module's docstring)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> None:
        try:
            import mlflow  # noqa: F401
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--mlflow needs MLflow: pip install 'cnnlab[mlflow]'") from None
        for name in QUIET_LOGGERS:  # no INFO lines (database migrations, ...) in the user's terminal
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        self.tracking_uri = _absolute_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
        self.experiment_name = experiment
        try:
            with self._quiet():
                self.client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as exc:
            raise ConfigError(
                f"MLflow cannot use {self.tracking_uri} ({_error(exc)}); check MLFLOW_TRACKING_URI"
            ) from None
        self._experiment_id: str | None = None
        self.folder: RunFolder | None = None
        self.run_id: str | None = None
        self.hardware: dict[str, Any] = {}

    # -- the Tracker protocol ---------------------------------------------------------------------

    def start(self, prepared: PreparedRun) -> None:
        """Find (on `--resume`) or create the run folder's parent run and log the plan into it.

        Before any training: a store that cannot be reached or written is a ConfigError, one line."""
        try:
            self._start(prepared)
        except Exception as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"MLflow at {self.tracking_uri} cannot track the run ({_error(exc)}); "
                "check MLFLOW_TRACKING_URI or run without --mlflow"
            ) from None

    def log_unit(self, outcome: UnitOutcome) -> None:
        """The unit's nested run: params, metrics, tags, files and status (again: nothing doubled).

        Training goes on when MLflow fails here: a warning says so (the run folder has everything)."""
        try:
            self._log_unit(outcome)
        except Exception as exc:
            warnings.warn(f"MLflow could not log {outcome.unit.label}: {_error(exc)}", stacklevel=2)

    def finish(self, summary: ReportSummary) -> None:
        """The report's files and each arm's mean test accuracy on the parent, which then ends
        FINISHED, or FAILED while a unit of the plan is not finished (a warning if MLflow fails)."""
        try:
            self._finish(summary)
        except Exception as exc:
            warnings.warn(f"MLflow could not log the report: {_error(exc)}", stacklevel=2)

    def _start(self, prepared: PreparedRun) -> None:
        self.folder = prepared.folder
        self.hardware = dataclasses.asdict(prepared.hardware)
        path = str(Path(prepared.folder.path).resolve())
        environment = prepared.folder.environment()
        with self._quiet():
            run = self._find(f"tags.`{RUN_FOLDER_TAG}` = {{}}", path, lambda r: PARENT_TAG not in r.data.tags)
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=Path(path).name, tags={RUN_FOLDER_TAG: path})
            elif run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")  # resumed
            self.run_id = run.info.run_id
            tags = {
                "cnnlab.version": cnnlab.__version__,
                "cnnlab.git_commit": environment.get("git_commit"),
                "cnnlab.command": environment.get("command"),
                "cnnlab.device": prepared.hardware.device,
                "cnnlab.device_name": prepared.hardware.device_name,
                "cnnlab.precision": prepared.hardware.precision,
                "cnnlab.dataset": prepared.plan.data.dataset,
            }
            self._log(run, params=plan_params(prepared), tags=tags)
            for name in ("config.toml", "environment.json"):
                self._artifact(self.run_id, prepared.folder.path / name, None)

    def _log_unit(self, outcome: UnitOutcome) -> None:
        folder, parent = self._require_start()
        unit = outcome.unit
        unit_dir = folder.unit_dir(unit)
        key = _unit_key(unit)
        with self._quiet():
            run = self._find(f"tags.`{PARENT_TAG}` = {{}}", parent, lambda r: r.data.tags.get(UNIT_TAG) == key)
            if run is None:
                tags = {PARENT_TAG: parent, UNIT_TAG: key, RUN_FOLDER_TAG: str(Path(folder.path).resolve())}
                run = self.client.create_run(self._experiment(), run_name=unit.label, tags=tags)
            elif run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            run_id = run.info.run_id
            params = {"model": unit.arm.spec.name, "arm": unit.arm.name, "seed": str(unit.seed)}
            params.update(recipe_params(unit.arm.recipe))
            finished = outcome.state == "finished"
            metrics = self._unit_metrics(unit_dir, outcome) if finished else []
            hardware = (outcome.metrics or {}).get("hardware") or self.hardware
            tags = {
                "cnnlab.state": outcome.state,
                "cnnlab.version": cnnlab.__version__,
                **{f"cnnlab.hardware.{k}": v for k, v in hardware.items()},
            }
            if outcome.error:
                tags["cnnlab.error"] = outcome.error
            self._log(run, params=params, tags=tags, metrics=metrics)
            if not outcome.error and "cnnlab.error" in run.data.tags:  # failed before, finished now
                self.client.delete_tag(run_id, "cnnlab.error")
            self._artifact(run_id, unit_dir.parent / "spec.toml", f"units/{unit.arm.folder}")
            if unit_dir.is_dir():
                for path in sorted(unit_dir.iterdir()):
                    if path.is_file() and not path.name.startswith(".") and path.name not in SKIPPED_UNIT_FILES:
                        self._artifact(run_id, path, f"units/{key}")
            self.client.set_terminated(run_id, "FINISHED" if finished else "FAILED")

    def _finish(self, summary: ReportSummary) -> None:
        if self.run_id is None:  # not started by this tracker: the parent of the report's folder
            self.start_from_folder(summary.folder)
        folder, parent = self._require_start()
        with self._quiet():
            root = Path(summary.folder.path)
            for path in summary.files:
                path = Path(path)
                try:
                    relative = path.resolve().relative_to(root.resolve())
                except ValueError:
                    relative = Path(path.name)
                parent_path = relative.parent.as_posix()
                self._artifact(parent, path, None if parent_path == "." else parent_path)
            metrics, used = [], set()
            for row in summary.rows:
                name = safe_metric_name(row.arm)
                if name in used:  # two arm names that differ only in unsafe characters
                    name = f"{name}_{len(used)}"
                used.add(name)
                metrics += [
                    (f"test_accuracy.{name}", row.test_accuracy.mean, 0),
                    (f"test_loss.{name}", row.test_loss.mean, 0),
                ]
            plan = folder.read_plan()
            failed = sum(folder.status(unit).state == "failed" for unit in plan.units())
            unfinished = sum(folder.status(unit).state != "finished" for unit in plan.units())
            run = self.client.get_run(parent)
            tags = {"cnnlab.units_failed": failed, "cnnlab.units_unfinished": unfinished}
            self._log(run, metrics=metrics, tags=tags, replace_metrics=True)
            self.client.set_terminated(parent, "FINISHED" if unfinished == 0 else "FAILED")

    def describe(self) -> str:
        """Where to find the run, for the command's last line."""
        where = f"experiment {self.experiment_name}, run {self.run_id or '(none)'} at {self.tracking_uri}"
        if self.tracking_uri.startswith(("http://", "https://")):
            if self.run_id and self._experiment_id:
                base = self.tracking_uri.rstrip("/")
                return f"{where}; see it at {base}/#/experiments/{self._experiment_id}/runs/{self.run_id}"
            return where
        if self.tracking_uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "file:")):
            return f"{where}; see it with `mlflow ui --backend-store-uri {self.tracking_uri}`"
        return where

    # -- helpers ----------------------------------------------------------------------------------

    def start_from_folder(self, folder: RunFolder) -> None:
        """Attach to the parent run of an existing run folder (found by its path), without logging."""
        path = str(Path(folder.path).resolve())
        with self._quiet():
            run = self._find(f"tags.`{RUN_FOLDER_TAG}` = {{}}", path, lambda r: PARENT_TAG not in r.data.tags)
        if run is None:
            raise ConfigError(f"no MLflow run of {path} at {self.tracking_uri}; track the run with --mlflow")
        self.folder, self.run_id = folder, run.info.run_id

    def _require_start(self) -> tuple[RunFolder, str]:
        if self.folder is None or self.run_id is None:
            raise RuntimeError("MlflowTracker.start(prepared) must be called first")
        return self.folder, self.run_id

    @contextlib.contextmanager
    def _quiet(self):
        """MLflow's stdout lines (the "View run" link of a tracking server) and its warnings (its
        dependencies' deprecations) out of the user's terminal."""
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    def _experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            if experiment is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=self._artifact_location()
                )
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _artifact_location(self) -> str | None:
        """Artifacts of a local SQLite store go beside its database (`mlruns/`), not into the cwd."""
        prefix = "sqlite:///"
        if self.tracking_uri.startswith(prefix + "/"):
            database = Path(unquote(self.tracking_uri[len(prefix) :]).partition("?")[0])
            return (database.parent / "mlruns" / self.experiment_name).as_uri()
        return None  # the store's default

    def _find(self, template: str, value: str, keep) -> Any:
        """The first run of the experiment whose tag matches (`template` with `{}` for the quoted
        value) and that `keep` accepts; a value that cannot be quoted is matched here, page by page."""
        quoted = _quoted(value)
        key = template.split("`")[1]
        filter_string = template.format(quoted) if quoted else ""
        token = None
        while True:
            page = self.client.search_runs(
                [self._experiment()], filter_string, max_results=1000, page_token=token, order_by=["start_time ASC"]
            )
            for run in page:
                if run.data.tags.get(key) == value and keep(run):
                    return run
            token = page.token
            if not token:
                return None

    def _log(
        self,
        run: Any,
        *,
        params: dict[str, str] | None = None,
        tags: dict[str, Any] | None = None,
        metrics: list[tuple[str, float, int]] | None = None,
        replace_metrics: bool = False,
    ) -> None:
        """Log what the run lacks: params not yet set (a param cannot change), every tag, and
        metric steps not yet logged (`replace_metrics`: a step with a new value is logged again)."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = run.info.run_id
        new_params = [Param(k, v) for k, v in (params or {}).items() if k not in run.data.params]
        new_tags = [RunTag(k, _text(v, MAX_TAG)) for k, v in (tags or {}).items() if v is not None]
        now = int(time.time() * 1000)
        new_metrics = []
        histories: dict[str, dict[int, float]] = {}
        for key, value, step in metrics or []:
            if key in run.data.metrics and key not in histories:
                histories[key] = {m.step: m.value for m in self.client.get_metric_history(run_id, key)}
            logged = histories.get(key, {})
            if step in logged and not (replace_metrics and not _same(logged[step], value)):
                continue
            new_metrics.append(Metric(key, float(value), now, step))
        for start in range(0, max(len(new_metrics), len(new_params), len(new_tags)), 100):
            self.client.log_batch(
                run_id,
                metrics=new_metrics[start : start + 100],
                params=new_params[start : start + 100],
                tags=new_tags[start : start + 100],
            )

    def _unit_metrics(self, unit_dir: Path, outcome: UnitOutcome) -> list[tuple[str, float, int]]:
        """Per-epoch metrics from history.json (step = epoch), then the final ones from metrics.json."""
        metrics: list[tuple[str, float, int]] = []
        history = read_json(unit_dir / "history.json") if (unit_dir / "history.json").exists() else []
        for record in history:
            step = int(record["epoch"])
            for key in EPOCH_METRICS:
                value = record.get(key)
                if isinstance(value, (int, float)) and not math.isnan(value):
                    metrics.append((key, value, step))
            seconds = record.get("train_seconds", 0.0) + record.get("val_seconds", 0.0)
            metrics.append(("seconds", seconds, step))
        final = read_json(unit_dir / "metrics.json") if (unit_dir / "metrics.json").exists() else outcome.metrics
        for key, name in FINAL_METRICS.items():
            value = (final or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.append((name, value, 0))
        return metrics

    def _artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)


def _error(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
