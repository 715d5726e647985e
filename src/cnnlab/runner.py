"""Running a plan: every unit not finished yet is trained and its results written to the run folder.

A unit's state is recorded as it goes (running, then finished; interrupted on Ctrl-C or SIGTERM;
failed, with its error, when training raises at run time), so `--resume` knows what is left: a
finished unit is kept, an interrupted or failed one continues from its last checkpoint, and the
rest run as they would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cnnlab.augment import augmented_examples
from cnnlab.config import Hardware, RunPlan, Unit
from cnnlab.datasets import Dataset
from cnnlab.engine import CheckpointMismatch, DeviceData, Reporter, TrainJob, TrainResult, train, train_together
from cnnlab.errors import CnnlabError, ConfigError, RunError
from cnnlab.hardware import keep_freed_memory_for_reuse
from cnnlab.models import summarize
from cnnlab.results import UnitResult, UnitStatus
from cnnlab.runfolder import RunFolder, first_line

MISTAKES_KEPT = 16
EXAMPLES = 8  # training images shown with their augmented versions


@dataclass(frozen=True)
class RunOutcome:
    """What a run (or a resumed run) left: its finished units and the units that failed."""

    results: list[UnitResult]
    failed: list[tuple[Unit, str]]


def check_fits(plan: RunPlan, dataset: Dataset) -> None:
    """Every arm's model takes the dataset's images and has an output per class (else a ConfigError)."""
    image_shape = tuple(dataset.train_images.shape[1:]) + ((1,) if dataset.train_images.dim() == 3 else ())
    for arm in plan.arms:
        spec = arm.spec
        if tuple(spec.input_shape) != image_shape:
            raise ConfigError(
                f"{spec.source}: model '{spec.name}' expects input_shape {list(spec.input_shape)} but "
                f"{plan.data.dataset} images are {list(image_shape)}; set input_shape = "
                f"{list(image_shape)} in the spec"
            )
        if spec.num_classes < len(dataset.classes):
            raise ConfigError(
                f"{spec.source}: model '{spec.name}' has {spec.num_classes} outputs but "
                f"{plan.data.dataset} has {len(dataset.classes)} classes; end the spec with "
                f"Dense(units = {len(dataset.classes)})"
            )


@dataclass(frozen=True)
class UnitOutcome:
    """How one unit's training ended: finished (with its metrics) or failed (with its error)."""

    unit: Unit
    state: str  # "finished" or "failed"
    error: str | None = None
    metrics: dict[str, Any] | None = None


def pending_units(folder: RunFolder, plan: RunPlan) -> list[Unit]:
    """The plan's units that are not finished (pending, interrupted or failed), in plan order."""
    folder.remove_partial_files()
    return [unit for unit in plan.units() if folder.status(unit).state != "finished"]


def train_unit(
    folder: RunFolder, unit: Unit, data: DeviceData, hardware: Hardware, reporter: Reporter | None = None
) -> UnitOutcome:
    """Train one unit into the run folder with `hardware.threads` threads and record how it ended.

    A failure at run time (out of memory, a diverging loss) is recorded as the unit's state and
    returned; Ctrl-C marks the unit interrupted and propagates; a damaged file is a RunError."""
    return train_units_together(folder, [unit], data, hardware, lambda _: reporter)[0]


def train_units_together(
    folder: RunFolder,
    units: list[Unit],
    data: DeviceData,
    hardware: Hardware,
    make_reporter: Callable[[Unit], Reporter | None] | None = None,
) -> list[UnitOutcome]:
    """Train `units` into the run folder: one alone with `engine.train`, several with
    `engine.train_together` (taking turns step by step, each unit's result the same as alone).
    Each unit's end is recorded as `train_unit` records it."""
    device = torch.device(hardware.device)
    before = [folder.status(unit) for unit in units]
    jobs = []
    for unit, status in zip(units, before):
        folder.set_status(unit, UnitStatus("running", status.epochs_done))
        # --init-from: every seed of the arm starts from its initial weights
        jobs.append(TrainJob(unit.arm.spec, unit.arm.recipe, unit.seed, data.splits(unit.seed),
                             reporter=make_reporter(unit) if make_reporter else None,
                             checkpoint=folder.checkpoint(unit, device),
                             initial_weights=folder.initial_weights(unit.arm)))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(hardware.threads)  # the thread count is part of a CPU result's bits
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    try:
        if len(jobs) == 1:  # alone: engine.train on the default stream, the path measured on GPUs
            try:
                outcomes: list[TrainResult | Exception] = [train(hardware=hardware, **vars(jobs[0]))]
            except Exception as exc:  # noqa: BLE001 - sorted out below, as train_together's outcomes are
                outcomes = [exc]
        else:
            outcomes = train_together(jobs, hardware)
    except KeyboardInterrupt:
        for unit in units:
            folder.set_status(unit, UnitStatus("interrupted", folder.status(unit).epochs_done))
        raise
    finally:
        torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [_recorded(folder, unit, status, job, outcome, data, hardware)
            for unit, status, job, outcome in zip(units, before, jobs, outcomes)]  # fmt: skip


def _recorded(
    folder: RunFolder,
    unit: Unit,
    before: UnitStatus,
    job: TrainJob,
    outcome: TrainResult | Exception,
    data: DeviceData,
    hardware: Hardware,
) -> UnitOutcome:
    """A unit's training outcome written to the run folder: its results, or its failure recorded."""
    if isinstance(outcome, CheckpointMismatch):
        folder.set_status(unit, before)
        raise RunError(
            f"{job.checkpoint.path} does not fit {unit.label} ({first_line(outcome)}); delete it to train "
            "this unit from its start, then resume again"
        ) from None
    if isinstance(outcome, CnnlabError):
        folder.set_status(unit, before)  # a damaged file: the unit stays as it was
        raise outcome
    if isinstance(outcome, (RuntimeError, FloatingPointError, MemoryError)):  # out of memory, divergence
        message = f"{type(outcome).__name__}: {first_line(outcome)}"
        folder.set_status(unit, UnitStatus("failed", folder.status(unit).epochs_done, message))
        return UnitOutcome(unit, "failed", message)
    if isinstance(outcome, Exception):
        raise outcome  # a bug, not the unit's failure
    saved = _save(folder, unit, outcome, data, hardware)
    return UnitOutcome(unit, "finished", metrics=saved.metrics)


def run_units(
    folder: RunFolder,
    plan: RunPlan,
    data: DeviceData,
    hardware: Hardware,
    make_reporter: Callable[[Unit], Reporter] | None = None,
    on_outcome: Callable[[UnitOutcome], None] | None = None,
) -> RunOutcome:
    """Train every unit of the plan that is not finished, in this process: `hardware.units_at_once`
    at a time (one after another by default), in plan order."""
    pending = pending_units(folder, plan)
    size = hardware.units_at_once
    for group in (pending[i : i + size] for i in range(0, len(pending), size)):
        for outcome in train_units_together(folder, group, data, hardware, make_reporter):
            if on_outcome is not None:
                on_outcome(outcome)
    return outcome_of(folder, plan)


def outcome_of(folder: RunFolder, plan: RunPlan) -> RunOutcome:
    """The run's finished results and its failed units, as the folder records them."""
    failed = []
    for unit in plan.units():
        status = folder.status(unit)
        if status.state == "failed":
            failed.append((unit, status.error or "failed"))
    return RunOutcome(folder.results(plan), failed)


def _save(folder: RunFolder, unit: Unit, result: TrainResult, data: DeviceData, hardware: Hardware) -> UnitResult:
    labels = data.test_labels.cpu()
    test = result.test
    wrong = torch.nonzero(test.predictions != labels).flatten()
    worst = wrong[test.confidences[wrong].argsort(descending=True, stable=True)[:MISTAKES_KEPT]]
    mistakes = {
        "indices": worst,
        "images": data.test_images[worst.to(data.test_images.device)].cpu(),
        "labels": labels[worst],
        "predictions": test.predictions[worst],
        "confidences": test.confidences[worst],
    }
    predictions = {"labels": labels, "predictions": test.predictions, "confidences": test.confidences}
    examples = None
    if unit.arm.recipe.augmentation is not None:  # what augmentation does, for the report
        originals = data.splits(unit.seed).train_images[:EXAMPLES].cpu()
        augmented = augmented_examples(originals.repeat(2, *([1] * (originals.dim() - 1))),
                                       unit.arm.recipe.augmentation, 2 * len(originals), seed=unit.seed)  # fmt: skip
        examples = {"originals": originals, "augmented": augmented}
    return folder.save_result(
        unit, result.history, unit_metrics(unit, result, hardware), result.model.state_dict(), predictions, mistakes,
        best_weights=result.best_weights, augmented=examples,
    )  # fmt: skip


def unit_metrics(unit: Unit, result: TrainResult, hardware: Hardware) -> dict[str, Any]:
    """A finished unit's final numbers, as the notebook's table reports them and more."""
    summary = summarize(unit.arm.spec)
    history = result.history
    untrained = result.untrained_validation  # 0 epochs (--init-from): the given weights, tested as they are
    final = untrained if untrained is not None else history[(result.restored_epoch or len(history)) - 1]
    val_loss, val_accuracy = (
        (final.loss, final.accuracy) if untrained is not None else (final.val_loss, final.val_accuracy)
    )
    train_time = sum(r.train_seconds for r in history)
    samples = sum(r.samples_per_second * r.train_seconds for r in history)
    throughput = samples / train_time if train_time else 0.0
    return {
        "arm": unit.arm.name,
        "model": unit.arm.spec.name,
        "seed": unit.seed,
        "epochs": len(history),
        # The notebook reports the best running training accuracy of any epoch.
        "train_accuracy": max((r.accuracy for r in history), default=math.nan),
        "train_loss": history[-1].loss if history else math.nan,
        # Validation of the final weights (the restored epoch's with restore_best_weights).
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "test_loss": result.test.loss,
        "test_accuracy": result.test.accuracy,
        "wall_seconds": result.wall_seconds,
        "train_seconds": train_time,
        "seconds_per_epoch": result.wall_seconds / len(history) if history else 0.0,
        "samples_per_second": throughput,
        "params": summary.total_params,
        "train_flops_per_sample": summary.training_flops,
        "inference_flops_per_sample": summary.forward_flops,
        "train_gflops_per_second": throughput * summary.training_flops / 1e9,
        "hardware": asdict(hardware),
        # What the recipe's epoch-end options decided (None where the recipe has none).
        "best_epoch": result.best_epoch,
        "stopped_epoch": result.stopped_epoch,
        "stop_reason": result.stop_reason,
        "restored_epoch": result.restored_epoch,
    }
