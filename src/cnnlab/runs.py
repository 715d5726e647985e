"""The run folder: configuration, environment, per-model histories, metrics, weights and checkpoints.

Layout of `runs/<timestamp>-<name>/`:

    config.toml              the resolved configuration and the command that made the run
    environment.json         versions, device and its name, threads, git commit
    <model>/spec.toml        the model's spec, as trained
    <model>/seed-<n>/history.csv, history.json, metrics.json, weights.pt, predictions.pt,
                     mistakes.pt (the test images it gets wrong with the highest confidence)
    <model>/seed-<n>/checkpoint.pt   (while training; removed when the model/seed is finished)
    comparison.{md,csv,json}, *.png, report.{html,md}   (written by `report`)

Every file is written atomically: to a temporary name in the same folder, then renamed, so an
interrupted run never leaves a half-written file that looks complete. `metrics.json` is written
last for a model/seed, so its presence means that run finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from cnnlab.engine import EpochRecord, Hardware, TrainResult
from cnnlab.errors import RunError
from cnnlab.spec import ModelSpec, parse_spec

HISTORY_FIELDS = [f for f in EpochRecord.__dataclass_fields__]


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_partial_files(run_dir: Path) -> None:
    """Delete temporary files a killed process left behind (never a finished result)."""
    for tmp in run_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write text atomically; a full disk or an unwritable folder is a RunError naming the file."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose "
                       "another folder with --runs-dir") from None


def write_json(path: Path, data: Any) -> None:
    """JSON, indented, atomically; NaN (no value, e.g. the interval of one seed) becomes null."""
    write_text(path, json.dumps(_without_nan(data), indent=2, default=_json_default, allow_nan=False) + "\n")


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_torch(path: Path, obj: Any) -> None:
    """`torch.save` atomically."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose "
                       "another folder with --runs-dir") from None


def read_json(path: Path) -> Any:
    """Read a JSON file of a run folder, or raise RunError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; is this a complete cnnlab run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); the run folder is damaged") from None


# ---------------------------------------------------------------------------------------------
# The run folder


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """Create `runs_dir/<timestamp>-<name>/` (never reusing an existing folder)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(2, 100)]:
            path = runs_dir / f"{stamp}-{name}{suffix}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise RunError(f"cannot create a run folder in {runs_dir}: {exc.strerror or exc}; "
                       "choose a writable folder with --runs-dir") from None
    raise RunError(f"too many runs named {stamp}-{name} in {runs_dir}")


def unit_dir(run_dir: Path, model_name: str, seed: int) -> Path:
    """The folder of one model trained with one seed."""
    return run_dir / model_name / f"seed-{seed}"


def environment() -> dict[str, Any]:
    """What ran this: versions, machine, device, threads, git commit (if the cwd is a git checkout)."""
    import numpy

    import cnnlab

    info: dict[str, Any] = {
        "cnnlab": cnnlab.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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


def history_csv(history: list[EpochRecord]) -> str:
    """A history as CSV text, one row per epoch."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow(asdict(record))
    return out.getvalue()


@dataclass
class UnitResult:
    """One finished model/seed as stored in the run folder (what tables, stats and reports read)."""

    model: str
    seed: int
    history: list[EpochRecord]
    metrics: dict[str, Any]

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    @property
    def test_loss(self) -> float:
        return self.metrics["test_loss"]


def save_unit(run_dir: Path, model_name: str, seed: int, result: TrainResult, params: int,
              train_flops: int, test_labels: torch.Tensor, test_images: torch.Tensor | None = None,
              mistakes: int = 16) -> UnitResult:
    """Write a finished model/seed: history, weights, predictions, then metrics.json (last).

    With `test_images`, the `mistakes` test images the model gets wrong with the highest confidence
    are kept too (uint8, with true and predicted label), so a report needs only the run folder.
    """
    folder = unit_dir(run_dir, model_name, seed)
    write_text(folder / "history.csv", history_csv(result.history))
    write_json(folder / "history.json", [asdict(r) for r in result.history])
    save_torch(folder / "weights.pt", {k: v.cpu() for k, v in result.model.state_dict().items()})
    labels = test_labels.cpu()
    save_torch(folder / "predictions.pt", {"labels": labels, "predictions": result.test.predictions,
                                           "confidences": result.test.confidences})
    if test_images is not None:
        wrong = torch.nonzero(result.test.predictions != labels).flatten()
        worst = wrong[result.test.confidences[wrong].argsort(descending=True, stable=True)[:mistakes]]
        save_torch(folder / "mistakes.pt", {
            "indices": worst, "images": test_images[worst.to(test_images.device)].cpu(),
            "labels": labels[worst], "predictions": result.test.predictions[worst],
            "confidences": result.test.confidences[worst]})
    metrics = metrics_of(model_name, seed, result, params, train_flops)
    write_json(folder / "metrics.json", metrics)
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    return UnitResult(model_name, seed, result.history, metrics)


def metrics_of(model_name: str, seed: int, result: TrainResult, params: int, train_flops: int) -> dict[str, Any]:
    """The final numbers of a model/seed, as the seed's table reports them and more."""
    history = result.history
    train_time = sum(r.train_seconds for r in history)
    samples = sum(r.samples_per_second * r.train_seconds for r in history)
    throughput = samples / train_time if train_time else 0.0
    return {
        "model": model_name, "seed": seed, "epochs": len(history),
        "train_accuracy": max(r.accuracy for r in history),  # the seed reports the best running accuracy
        "train_loss": history[-1].loss,
        "test_loss": result.test.loss, "test_accuracy": result.test.accuracy,
        "wall_seconds": result.wall_seconds, "train_seconds": train_time,
        "seconds_per_epoch": result.wall_seconds / len(history),
        "samples_per_second": throughput,
        "params": params, "train_flops_per_sample": train_flops, "inference_flops_per_sample": train_flops // 3,
        "train_gflops_per_second": throughput * train_flops / 1e9,
        "hardware": asdict(result.hardware),
    }


def load_units(run_dir: Path) -> list[UnitResult]:
    """Every finished model/seed of a run folder, in the order of its config."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a folder; give a run folder made by `cnnlab train` or `cnnlab compare`")
    units = []
    for metrics_path in sorted(run_dir.glob("*/seed-*/metrics.json")):
        metrics = read_json(metrics_path)
        history = [EpochRecord(**r) for r in read_json(metrics_path.parent / "history.json")]
        units.append(UnitResult(metrics["model"], metrics["seed"], history, metrics))
    order = {name: i for i, name in enumerate(read_config(run_dir).get("models", []))}
    units.sort(key=lambda u: (order.get(u.model, len(order)), u.model, u.seed))
    return units


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.toml as a dict."""
    import tomllib

    path = run_dir / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; give a run folder made by `cnnlab train` or `cnnlab compare`") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{path} is not valid TOML ({exc}); the run folder is damaged") from None


def read_spec(path: Path) -> ModelSpec:
    """A model's spec as saved in the run folder (`<model>/spec.toml`), or RunError naming the file."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; the run folder is incomplete") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{path} is not valid TOML ({exc}); the run folder is damaged") from None
    return parse_spec(data, source=str(path), default_name=path.parent.name)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the resolved configuration as TOML (None values are left out: TOML has no null)."""
    import tomli_w

    clean = {k: v for k, v in config.items() if v is not None}
    clean = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
             for k, v in clean.items()}
    write_text(run_dir / "config.toml", tomli_w.dumps(clean))


def hardware_of(metrics: dict[str, Any]) -> Hardware:
    """The Hardware record stored in a unit's metrics."""
    return Hardware(**metrics["hardware"])

