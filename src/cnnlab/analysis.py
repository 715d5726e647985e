"""What a run folder shows once its units are trained: statistics per arm, pairwise tests, confusion
matrices, mistakes, costs, and the command that makes the run again. Reads the folder, writes nothing.

Tables (tables.py), figures (plots.py) and the report (report.py) present what this computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnlab.catalog import builtin_name_of
from cnnlab.config import Hardware, RunPlan, Unit, recipe_is_expressible, reproduce_command
from cnnlab.datasets import DATASETS
from cnnlab.errors import RunError
from cnnlab.models import summarize
from cnnlab.results import UnitResult
from cnnlab.runfolder import RunFolder
from cnnlab.stats import (
    ArmStats,
    Choice,
    Comparison,
    arm_stats,
    choose_best,
    confusion_matrix,
    group_by_arm,
    pairwise,
    per_class_accuracy,
)


@dataclass(frozen=True)
class Mistakes:
    """The test images one unit got wrong with the highest confidence (from mistakes.pt)."""

    seed: int
    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray


@dataclass(frozen=True)
class ArmDetails:
    """What the report shows of one arm beyond the comparison table."""

    name: str
    folder: str
    units: list[UnitResult]
    forward_flops: int
    training_flops: int
    confusion: np.ndarray  # (classes, classes) counts summed over seeds; rows are true classes
    mistakes: Mistakes | None  # of the first seed that recorded them
    augmented: tuple[np.ndarray, np.ndarray] | None = None  # (originals, augmented) uint8, with augmentation
    scheduled: bool = False  # the learning rate changes (a schedule): the report plots it

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Accuracy on each true class; over several seeds, the mean (each seed sees the same images)."""
        return per_class_accuracy(self.confusion)

    def mean_metric(self, key: str) -> float:
        return float(np.mean([u.metrics[key] for u in self.units]))


@dataclass(frozen=True)
class UnfinishedUnit:
    """A unit without results: interrupted, failed (with its error) or not started."""

    label: str
    state: str
    error: str | None


@dataclass(frozen=True)
class RunAnalysis:
    """Everything the tables, figures and report of one run folder present."""

    folder: RunFolder
    plan: RunPlan
    results: list[UnitResult]
    rows: list[ArmStats]
    comparisons: list[Comparison]
    details: list[ArmDetails]
    classes: tuple[str, ...]
    unfinished: list[UnfinishedUnit]
    hardware: Hardware | None
    choice: Choice | None  # the best arm, by the rule against choosing on the test set
    command: str | None  # `cnnlab compare ...` that makes the plan again; None if the CLI cannot say it
    environment: dict[str, Any]
    config_text: str


def analyze(folder: RunFolder) -> RunAnalysis:
    """Read a run folder's plan and finished units and compute what its report shows."""
    plan = folder.read_plan()
    results = folder.results(plan)
    if not results:
        raise RunError(f"{folder} has no finished unit yet; resume it with `cnnlab compare --resume {folder}`")
    rows = arm_stats(results)
    classes = class_names(plan)
    units = {(u.arm.name, u.seed): u for u in plan.units()}
    details = [
        arm_details(folder, [units[(r.arm, r.seed)] for r in group], group, classes)
        for group in group_by_arm(results).values()
    ]
    finished = {(r.arm, r.seed) for r in results}
    unfinished = []
    for unit in plan.units():
        if (unit.arm.name, unit.seed) not in finished:
            status = folder.status(unit)
            unfinished.append(UnfinishedUnit(unit.label, status.state, status.error))
    hardware = plan.hardware or Hardware.from_dict(results[0].metrics["hardware"])
    config_path = folder.path / "config.toml"
    return RunAnalysis(
        folder=folder,
        plan=plan,
        results=results,
        rows=rows,
        comparisons=pairwise(results) if len(rows) > 1 else [],
        details=details,
        classes=classes,
        unfinished=unfinished,
        hardware=hardware,
        choice=choose_best(results, on_validation=plan.data.val_split > 0),
        command=_reproduce(folder, plan),
        environment=folder.environment(),
        config_text=config_path.read_text(encoding="utf-8"),
    )


def class_names(plan: RunPlan) -> tuple[str, ...]:
    """The dataset's class names from the registry, then '10', '11', ... for any further model outputs."""
    dataset = plan.data.dataset
    names = DATASETS[dataset].classes if dataset in DATASETS else ()
    count = max([len(names)] + [arm.spec.num_classes for arm in plan.arms])
    return tuple(names) + tuple(str(i) for i in range(len(names), count))


def arm_details(
    folder: RunFolder, units: Sequence[Unit], results: Sequence[UnitResult], classes: Sequence[str]
) -> ArmDetails:
    """One arm's FLOPs, its confusion matrix over its seeds and its most confident mistakes."""
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    mistakes = None
    for unit in units:
        predicted = folder.predictions(unit)
        confusion += confusion_matrix(predicted["labels"].numpy(), predicted["predictions"].numpy(), len(classes))
        stored = folder.mistakes(unit) if mistakes is None else None
        if stored is not None:
            mistakes = Mistakes(
                unit.seed, *(stored[k].numpy() for k in ("images", "labels", "predictions", "confidences"))
            )
    arm = units[0].arm
    summary = summarize(arm.spec)
    examples = folder.augmented(units[0])
    augmented = (examples["originals"].numpy(), examples["augmented"].numpy()) if examples else None
    return ArmDetails(
        arm.name, arm.folder, list(results), summary.forward_flops, summary.training_flops, confusion, mistakes,
        augmented, scheduled=arm.recipe.schedule is not None,
    )  # fmt: skip


def _reproduce(folder: RunFolder, plan: RunPlan) -> str | None:
    if not recipe_is_expressible(plan):
        return None
    models: list[str] = []
    for arm in plan.arms:
        model = builtin_name_of(arm.spec) or str(folder.path / arm.folder / "spec.toml")
        if model not in models:
            models.append(model)
    return reproduce_command(plan, models)
