"""The run folder: the one module that knows its paths, and reads and writes them.

Layout of `runs/<timestamp>-<name>/`:

    config.toml              the resolved run plan (format_version 2; 0.1's folders have none)
    environment.json         versions, device and its name, threads, git commit, the command
    <arm>/spec.toml          the arm's model spec, as trained
    <arm>/initial_weights.pt (--init-from: the weights every seed of the arm starts from, as a state dict)
    <arm>/seed-<n>/status.json     pending, running, interrupted, failed (with its error) or finished
    <arm>/seed-<n>/history.csv, history.json, metrics.json, weights.pt, best_weights.pt (with a best
                   checkpoint: the best epoch's weights; metrics.json's best_epoch says which), predictions.pt,
                   mistakes.pt (the test images it gets wrong with the highest confidence),
                   augmented.pt (with augmentation: training images and augmented versions of them)
    <arm>/seed-<n>/checkpoint.pt   (while training; removed when the unit is finished)
    comparison.{md,csv,json}, figures, report.{html,md}   (written by the report)
    sources.json             (a run combined from others by `cnnlab report A B -o DIR`: each source
                             run, its data selection, seeds and arms; its units are copies of theirs)

An arm's folder is derived from its name (config.safe_folder_name): no name read from an input
chooses a path. Every file is written atomically (files.py); `metrics.json` is written last for a
unit, so its presence means the unit finished, also in folders written by cnnlab 0.1.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cnnlab.catalog import spec_from_text
from cnnlab.config import (
    FORMAT_VERSION,
    Arm,
    DataSelection,
    Hardware,
    HardwareRequest,
    InitialWeights,
    Recipe,
    RunPlan,
    Unit,
    safe_folder_name,
)
from cnnlab.errors import CnnlabError, RunError
from cnnlab.files import TEMPORARY_SUFFIX, atomic_path, write_json, write_text
from cnnlab.models import load_weights
from cnnlab.results import HISTORY_FIELDS, EpochRecord, UnitResult, UnitStatus
from cnnlab.spec import spec_to_toml

# What the tables and the report read from a finished unit's metrics.json.
METRIC_KEYS = (
    "seed",
    "epochs",
    "train_accuracy",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "wall_seconds",
    "train_seconds",
    "seconds_per_epoch",
    "samples_per_second",
    "params",
    "train_gflops_per_second",
    "hardware",
)
_RETRAIN = "delete the unit's seed-N folder and resume the run (`cnnlab compare --resume RUN_DIR`) to train it again"
_RESTART = "delete it to train this unit from its start, then resume again"
CONFIG = "config.toml"
INITIAL_WEIGHTS = "initial_weights.pt"
ENVIRONMENT = "environment.json"
FINISHED_MARK = "metrics.json"
SOURCES = "sources.json"
# A unit's files copied last, in this order: metrics.json marks the copy finished only once all is there.
_COPIED_LAST = ("status.json", FINISHED_MARK)


class RunFolder:
    """A run folder on disk: its plan, its units' states and results, and the files the report writes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # -- creating and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: Path, name: str) -> RunFolder:
        """Create `runs_dir/<timestamp>-<name>/`, never reusing an existing folder."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{safe_folder_name(name)}"
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
            for suffix in [""] + [f"-{i}" for i in range(2, 100)]:
                path = runs_dir / f"{base}{suffix}"
                try:
                    path.mkdir()
                    return cls(path)
                except FileExistsError:
                    continue
        except OSError as exc:
            raise RunError(
                f"cannot create a run folder in {runs_dir}: {exc.strerror or exc}; "
                "choose a writable folder with --runs-dir"
            ) from None
        raise RunError(f"too many runs named {base} in {runs_dir}")

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """An existing run folder, or a RunError saying what the path is instead."""
        path = Path(path)
        try:
            path.stat()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RunError(f"{path} cannot be opened ({exc.strerror or exc}); give a run folder") from None
        if not path.exists():
            raise RunError(f"{path} does not exist; give a run folder made by `cnnlab train` or `cnnlab compare`")
        if not path.is_dir():
            raise RunError(f"{path} is not a folder; give a run folder made by `cnnlab train` or `cnnlab compare`")
        if not (path / CONFIG).is_file():
            raise RunError(f"{path / CONFIG} is missing; give a run folder made by `cnnlab train` or `cnnlab compare`")
        return cls(path)

    @classmethod
    def create_at(cls, path: Path) -> RunFolder:
        """A new run folder at exactly `path` (`-o DIR`: a combined run, a Keras file's run): refused
        when `path` exists and is not an empty folder, so no run's files are ever mixed with another's."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            kind = "is not empty" if path.is_dir() else "exists and is not a folder"
            raise RunError(f"{path} {kind}; give a new folder for the run with -o")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create {path}: {exc.strerror or exc}; choose a writable folder with -o") from None
        return cls(path)

    # -- the plan --------------------------------------------------------------------------------

    def write_plan(self, plan: RunPlan) -> None:
        """Record the plan, the environment and every arm's spec, before any training."""
        import tomli_w

        write_text(self.path / CONFIG, tomli_w.dumps(plan.to_dict()))
        write_json(self.path / ENVIRONMENT, environment())
        for arm in plan.arms:
            write_text(self.path / arm.folder / "spec.toml", spec_to_toml(arm.spec))

    def read_config(self) -> dict[str, Any]:
        """config.toml as a dict."""
        path = self.path / CONFIG
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{path} is missing; give a run folder made by `cnnlab train` or `cnnlab compare`") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{path} is not valid TOML ({exc}); the run folder is damaged") from None

    def read_plan(self) -> RunPlan:
        """The plan the folder records; folders written by cnnlab 0.1 are read as one arm per model."""
        config = self.read_config()
        try:
            if config.get("format_version", 1) == 1:
                return self._read_plan_v1(config)
            if config["format_version"] != FORMAT_VERSION:
                raise RunError(
                    f"{self.path / CONFIG} has format version {config['format_version']}, newer than "
                    f"this cnnlab reads ({FORMAT_VERSION}); upgrade cnnlab"
                )
            arms = tuple(
                Arm(
                    a["name"],
                    safe_folder_name(a["folder"]),
                    self.read_spec(a["folder"]),
                    Recipe.from_dict(a["recipe"], source=str(self.path / CONFIG)),
                )
                for a in config["arms"]
            )
            return RunPlan(
                arms,
                tuple(config["seeds"]),
                DataSelection(**config["data"]),
                HardwareRequest(**config["hardware_request"]),
                Hardware.from_dict(config["hardware"]),
                initial_weights=InitialWeights(**config["initial_weights"]) if "initial_weights" in config else None,
            )
        except CnnlabError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(
                f"{self.path / CONFIG} is damaged ({type(exc).__name__}: {exc}); restore it or start a new run"
            ) from None

    def _read_plan_v1(self, config: dict[str, Any]) -> RunPlan:
        train = dict(config.get("train", {}))
        request = HardwareRequest(**{k: train.pop(k) for k in ("device", "precision", "compile") if k in train})
        data = DataSelection(
            dataset=config["dataset"],
            data_dir=config.get("data_dir"),
            split="per-seed",  # 0.1 drew the held-out images from each unit's seed
            **{k: train.pop(k) for k in ("limit_train", "limit_test", "val_split") if k in train},
        )
        recipe = Recipe.from_dict(train, source=str(self.path / CONFIG))
        arms = tuple(Arm(name, safe_folder_name(name), self.read_spec(name), recipe) for name in config["models"])
        seeds = tuple(config["seeds"])
        recorded = next(
            (self._metrics(Unit(arm, seed)) for arm in arms for seed in seeds if self._finished(Unit(arm, seed))), None
        )
        hardware = Hardware.from_dict(recorded["hardware"]) if recorded else None
        return RunPlan(arms, seeds, data, request, hardware, format_version=1)

    def read_spec(self, arm_folder: str):
        """An arm's model spec as trained (`<arm>/spec.toml`), or RunError naming the file."""
        path = self.path / safe_folder_name(arm_folder) / "spec.toml"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunError(f"{path} is missing; the run folder is incomplete") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"{path} cannot be read ({exc}); the run folder is damaged") from None
        try:
            return spec_from_text(text, source=str(path), default_name=path.parent.name)
        except CnnlabError as exc:
            raise RunError(f"{exc} (the run folder's saved spec is damaged)") from None

    def write_initial_weights(self, arm: Arm, weights: dict[str, torch.Tensor]) -> None:
        """Keep the weights every seed of `arm` starts from (`--init-from`), so that resuming needs
        nothing outside the run folder."""
        save_torch(self.path / arm.folder / INITIAL_WEIGHTS, {k: v.cpu() for k, v in weights.items()})

    def initial_weights(self, arm: Arm) -> dict[str, torch.Tensor] | None:
        """The weights the arm's units start from, or None when they start from their seeds (the
        plan in config.toml says which: a plan with `--init-from` whose file is gone is a RunError)."""
        if "initial_weights" not in self.read_config():
            return None
        path = self.path / arm.folder / INITIAL_WEIGHTS
        fix = "the run folder is incomplete; start the run again with --init-from"
        if not path.exists():
            raise RunError(f"{path} is missing: {fix}")
        weights = load_tensors(path, fix=fix)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise RunError(f"{path} does not hold a state dict of tensors; the file is damaged: {fix}")
        return weights

    def environment(self) -> dict[str, Any]:
        """environment.json, or {} when it is missing or unreadable (it is informative only)."""
        try:
            return read_json(self.path / ENVIRONMENT)
        except RunError:
            return {}

    def write_sources(self, sources: list[dict[str, Any]]) -> None:
        """Record the runs a combined run was made from (sources.json)."""
        write_json(self.path / SOURCES, sources)

    def read_sources(self) -> list[dict[str, Any]] | None:
        """The runs this run was combined from (sources.json), or None for a run trained here."""
        path = self.path / SOURCES
        if not path.exists():
            return None
        sources = read_json(path)
        if not isinstance(sources, list) or not all(
            isinstance(s, dict) and isinstance(s.get("arms"), dict) and isinstance(s.get("seeds"), list)
            and isinstance(s.get("data"), dict) for s in sources
        ):  # fmt: skip
            raise RunError(f"{path} is not a list of source runs; the run folder is damaged")
        return sources

    # -- units -----------------------------------------------------------------------------------

    def unit_dir(self, unit: Unit) -> Path:
        """The folder of one arm trained with one seed."""
        return self.path / unit.arm.folder / f"seed-{unit.seed}"

    def status(self, unit: Unit) -> UnitStatus:
        """Where the unit stands; a unit left 'running' by a killed process counts as interrupted."""
        folder = self.unit_dir(unit)
        if (folder / FINISHED_MARK).exists():
            return UnitStatus("finished", len(self._history(unit)))
        recorded = None
        if (folder / "status.json").exists():
            try:
                recorded = UnitStatus(**read_json(folder / "status.json"))
            except (RunError, TypeError):
                recorded = None  # a damaged status says nothing the checkpoint does not
        if recorded is not None and recorded.state == "failed":
            return recorded
        if (folder / "checkpoint.pt").exists() or (recorded is not None and recorded.state != "pending"):
            epochs = recorded.epochs_done if recorded else 0
            return UnitStatus("interrupted", epochs)
        return UnitStatus("pending")

    def set_status(self, unit: Unit, status: UnitStatus) -> None:
        write_json(self.unit_dir(unit) / "status.json", asdict(status))

    def checkpoint(self, unit: Unit, device: torch.device) -> UnitCheckpoint:
        """The unit's checkpoint file, loaded onto `device`."""
        return UnitCheckpoint(self.unit_dir(unit) / "checkpoint.pt", device, self, unit)

    def save_result(
        self,
        unit: Unit,
        history: list[EpochRecord],
        metrics: dict[str, Any],
        weights: dict[str, torch.Tensor],
        predictions: dict[str, torch.Tensor],
        mistakes: dict[str, torch.Tensor] | None,
        best_weights: dict[str, torch.Tensor] | None = None,
        augmented: dict[str, torch.Tensor] | None = None,
    ) -> UnitResult:
        """Write a finished unit: history, weights, predictions, mistakes, then metrics.json (last)."""
        folder = self.unit_dir(unit)
        write_text(folder / "history.csv", history_csv(history))
        write_json(folder / "history.json", [asdict(r) for r in history])
        save_torch(folder / "weights.pt", {k: v.cpu() for k, v in weights.items()})
        save_torch(folder / "predictions.pt", predictions)
        if mistakes is not None:
            save_torch(folder / "mistakes.pt", mistakes)
        if best_weights is not None:  # the best epoch's weights (metrics.json says which epoch)
            save_torch(folder / "best_weights.pt", {k: v.cpu() for k, v in best_weights.items()})
        if augmented is not None:
            save_torch(folder / "augmented.pt", augmented)
        write_json(folder / FINISHED_MARK, metrics)
        self.set_status(unit, UnitStatus("finished", len(history)))
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        return UnitResult(unit.arm.name, unit.seed, history, metrics)

    def results(self, plan: RunPlan) -> list[UnitResult]:
        """Every finished unit of the plan, arm by arm, seed by seed."""
        return [
            UnitResult(unit.arm.name, unit.seed, self._history(unit), self._metrics(unit))
            for unit in plan.units()
            if self._finished(unit)
        ]

    def weights(self, unit: Unit) -> dict[str, torch.Tensor]:
        """A finished unit's trained weights (a state dict of tensors)."""
        path = self.unit_dir(unit) / "weights.pt"
        weights = load_tensors(path)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise RunError(f"{path} does not hold a state dict of tensors; the file is damaged: {_RETRAIN}")
        return weights

    def load_weights_into(self, unit: Unit, model: torch.nn.Module) -> torch.nn.Module:
        """Load a finished unit's weights into `model` (built from the unit's spec): the one loader
        every command uses. Weights of another shape or model are a RunError naming the file."""
        path = self.unit_dir(unit) / "weights.pt"
        try:
            load_weights(model, self.weights(unit))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunError(
                f"{path} does not fit model '{unit.arm.spec.name}' ({first_line(exc)}); the file is damaged "
                f"or from another model: {_RETRAIN}"
            ) from None
        return model

    def predictions(self, unit: Unit) -> dict[str, torch.Tensor]:
        """A finished unit's test labels, predictions and confidences."""
        return _tensor_dict(self.unit_dir(unit) / "predictions.pt", ("labels", "predictions", "confidences"))

    def augmented(self, unit: Unit) -> dict[str, torch.Tensor] | None:
        """Training images and augmented versions of them, for units trained with augmentation."""
        path = self.unit_dir(unit) / "augmented.pt"
        return _tensor_dict(path, ("originals", "augmented")) if path.exists() else None

    def mistakes(self, unit: Unit) -> dict[str, torch.Tensor] | None:
        """The test images a finished unit got wrong with the highest confidence, if recorded."""
        path = self.unit_dir(unit) / "mistakes.pt"
        keys = ("images", "labels", "predictions", "confidences")
        return _tensor_dict(path, keys) if path.exists() else None

    def first_finished(self, plan: RunPlan) -> Unit | None:
        """The plan's first finished unit, arm by arm, seed by seed; None when none has finished."""
        return next((unit for unit in plan.units() if self._finished(unit)), None)

    def has_files(self, unit: Unit) -> bool:
        """Whether the unit's folder exists (it started, or was at least given a status)."""
        return self.unit_dir(unit).is_dir()

    def copy_unit(self, source: RunFolder, source_unit: Unit, unit: Unit) -> None:
        """Copy a unit's files from another run folder (the source is left as it is), each atomically,
        metrics.json last; a renamed arm's name is updated in the copy's metrics.json."""
        origin, target = source.unit_dir(source_unit), self.unit_dir(unit)

        def order(path: Path) -> tuple[int, str]:
            relative = path.relative_to(origin).as_posix()
            return (_COPIED_LAST.index(relative) + 1 if relative in _COPIED_LAST else 0, relative)

        files = sorted(
            (p for p in origin.rglob("*") if p.is_file() and not p.name.endswith(TEMPORARY_SUFFIX)), key=order
        )
        for path in files:
            relative = path.relative_to(origin)
            if relative.as_posix() == FINISHED_MARK and unit.arm.name != source_unit.arm.name:
                metrics = read_json(path)
                if isinstance(metrics, dict) and "arm" in metrics:
                    metrics["arm"] = unit.arm.name
                write_json(target / relative, metrics)
                continue
            try:
                with atomic_path(target / relative) as tmp:
                    shutil.copyfile(path, tmp)
            except OSError as exc:
                raise RunError(f"cannot copy {path}: {exc.strerror or exc}") from None

    def _finished(self, unit: Unit) -> bool:
        return (self.unit_dir(unit) / FINISHED_MARK).exists()

    def _metrics(self, unit: Unit) -> dict[str, Any]:
        path = self.unit_dir(unit) / FINISHED_MARK
        metrics = read_json(path)
        missing = [k for k in METRIC_KEYS if not isinstance(metrics, dict) or k not in metrics]
        if missing:
            raise RunError(f"{path} lacks {', '.join(missing)}; the file is damaged: {_RETRAIN}")
        return metrics

    def _history(self, unit: Unit) -> list[EpochRecord]:
        path = self.unit_dir(unit) / "history.json"
        try:
            return [EpochRecord(**r) for r in read_json(path)]
        except TypeError as exc:
            raise RunError(
                f"{path} is not a history of epochs ({first_line(exc)}); the file is damaged: {_RETRAIN}"
            ) from None

    # -- housekeeping and run-level outputs -----------------------------------------------------

    def remove_partial_files(self) -> None:
        """Delete temporary files a killed process left behind (never a finished result)."""
        for tmp in self.path.rglob(f".*{TEMPORARY_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail now, not after an epoch of training, when the folder cannot be written."""
        probe = self.path / f".write-check{TEMPORARY_SUFFIX}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunError(
                f"cannot write into {self.path}: {exc.strerror or exc}; make it writable "
                "(or copy the run folder somewhere writable) and resume again"
            ) from None

    def output(self, name: str) -> Path:
        """A run-level output file (tables, figures, the report)."""
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        path = self.output(name)
        write_text(path, text)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        path = self.output(name)
        write_json(path, data)
        return path


def run_folders(runs_dir: Path) -> list[Path]:
    """The folders directly in `runs_dir`, by name (hidden ones left out): run folders, and whatever else
    is there; RunError when `runs_dir` is not a folder."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        what = "is not a folder" if runs_dir.exists() else "does not exist"
        raise RunError(f"{runs_dir} {what}; give the folder that holds run folders (default: runs)")
    try:
        return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise RunError(f"{runs_dir} cannot be read ({exc.strerror or exc})") from None


CHECKPOINT_KEYS = ("model", "optimizer", "history", "torch_rng", "shuffle_rng")


class UnitCheckpoint:
    """A unit's `checkpoint.pt`: the engine saves its state here after every epoch."""

    def __init__(self, path: Path, device: torch.device, folder: RunFolder, unit: Unit) -> None:
        self.path, self.device, self.folder, self.unit = path, device, folder, unit

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = load_tensors(self.path, self.device, fix=_RESTART)
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunError(f"{self.path} lacks {', '.join(missing)}; the checkpoint is damaged: {_RESTART}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        save_torch(self.path, state)
        self.folder.set_status(self.unit, UnitStatus("running", len(state["history"])))


# ---------------------------------------------------------------------------------------------
# File formats


def save_torch(path: Path, obj: Any) -> None:
    """`torch.save` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: Path, device: torch.device | str = "cpu", fix: str = _RETRAIN) -> Any:
    """A tensor file of a run folder (weights only, never code), or RunError naming it and the fix."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path} is missing; the run folder is incomplete (resume the run to train it again)") from None
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise RunError(
            f"{path} cannot be read ({type(exc).__name__}: {first_line(exc)}); the file is damaged: {fix}"
        ) from None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line, for a one-line error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tensor_dict(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    data = load_tensors(path)
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), torch.Tensor)]
    if missing:
        raise RunError(f"{path} lacks {', '.join(missing)}; the file is damaged: {_RETRAIN}")
    return data


def read_json(path: Path) -> Any:
    """A JSON file of a run folder, or RunError naming it."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; is this a complete cnnlab run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise RunError(f"{path} is not valid JSON ({first_line(exc)}); the run folder is damaged") from None


def history_csv(history: list[EpochRecord]) -> str:
    """A history as CSV text, one row per epoch."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow(asdict(record))
    return out.getvalue()


def environment() -> dict[str, Any]:
    """What ran this: versions, machine, threads, git commit (if the cwd is a git checkout), the command."""
    import numpy

    import cnnlab

    info: dict[str, Any] = {
        "cnnlab": cnnlab.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(["cnnlab"] + sys.argv[1:]),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info
