"""What a run folder shows once its units are trained: statistics per arm, pairwise tests, confusion
matrices, mistakes, costs, each model's best setting in a sweep, and the command that makes the run
again. Also: the listing of a folder of runs (`cnnlab runs`) and the checks before runs are combined
(`cnnlab report A B -o DIR`). Reads run folders, writes nothing.

Tables (tables.py), figures (plots.py) and the report (report.py) present what this computes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.catalog import builtin_name_of
from cnnlab.config import Arm, Hardware, Recipe, RunPlan, Unit, recipe_is_expressible, reproduce_command
from cnnlab.datasets import dataset_classes
from cnnlab.errors import ConfigError, RunError
from cnnlab.models import summarize
from cnnlab.results import UnitResult
from cnnlab.runfolder import RunFolder, first_line, run_folders
from cnnlab.stats import (
    Aggregate,
    ArmStats,
    Choice,
    Comparison,
    against_best,
    aggregate,
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
class SettingArm:
    """One arm of a model in a sweep: its swept settings and its accuracies over its seeds."""

    arm: str
    settings: dict[str, Any]  # swept key's label -> the value, as the arm's name shows it
    test_accuracy: Aggregate
    val_accuracy: Aggregate | None  # with held-out validation images

    def settings_text(self) -> str:
        return ", ".join(f"{key}={_value_text(value)}" for key, value in self.settings.items())


@dataclass(frozen=True)
class ModelSettings:
    """One model's arms in a sweep: its best setting, by the rule against choosing on the test set, and
    the best setting tested against each runner-up (one Holm family per model)."""

    model: str
    swept: tuple[str, ...]  # labels of the recipe keys that differ between the model's arms
    arms: list[SettingArm]  # in the plan's order
    choice: Choice | None
    tests: list[Comparison]  # the best arm against each runner-up, on per-seed test accuracy

    @property
    def best(self) -> SettingArm | None:
        return next((a for a in self.arms if self.choice and a.arm == self.choice.arm), None)

    @property
    def family(self) -> int:
        """How many tests the Holm adjustment is over: this model's testable comparisons."""
        return max((c.family for c in self.tests if c.testable), default=0)

    def along(self, key: str) -> list[SettingArm]:
        """The arms that differ from the best only in `key` (every arm when `key` is the one swept):
        the line a settings plot draws for this model."""
        best = self.best or self.arms[0]
        return [a for a in self.arms if all(a.settings[k] == best.settings[k] for k in self.swept if k != key)]

    def sentence(self) -> str:
        if self.choice is None or self.best is None:
            return f"{self.model}: no best setting (no arm has a valid accuracy)"
        return self.choice.sentence(f"Best setting of {self.model}: {self.best.settings_text()} ({self.best.arm})")


def _value_text(value: Any) -> str:
    return "none" if value is None else (repr(value) if isinstance(value, float) else str(value))


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
    # Per model with several arms that differ in settings (a sweep): its best setting; empty otherwise.
    settings: list[ModelSettings] = field(default_factory=list)
    on_validation: bool = False  # choices are made on validation accuracy
    sources: list[dict[str, Any]] = field(default_factory=list)  # a combined run's source runs


def choice_basis(plan: RunPlan, sources: list[dict[str, Any]] | None) -> tuple[bool, str]:
    """Whether choices use validation accuracy, and if not although some arms held out validation
    images, why: the arms of a combined run validated on different images cannot be chosen between
    by validation accuracy, so the choice is made, and labelled, on the test set."""
    if not sources:
        return plan.data.val_split > 0, ""
    splits = {(s["data"].get("val_split", 0.0), s["data"].get("split_seed", 0), s["data"].get("split", "stratified"))
              for s in sources}  # fmt: skip
    if len(splits) == 1:
        return next(iter(splits))[0] > 0, ""
    if all(split[0] == 0 for split in splits):
        return False, ""
    return (
        False,
        "the combined runs held out different validation images, so their validation accuracies do not compare",
    )


def planned_units(plan: RunPlan, sources: list[dict[str, Any]] | None) -> list[Unit]:
    """The units a run is made of: every arm x seed, or for a combined run each source's arms x its seeds."""
    if not sources:
        return plan.units()
    planned = {(arm, seed) for s in sources for arm in s["arms"].values() for seed in s["seeds"]}
    return [u for u in plan.units() if (u.arm.name, u.seed) in planned]


def analyze(folder: RunFolder) -> RunAnalysis:
    """Read a run folder's plan and finished units and compute what its report shows."""
    plan = folder.read_plan()
    sources = folder.read_sources()
    results = folder.results(plan)
    if not results:
        raise RunError(f"{folder} has no finished unit yet; resume it with `cnnlab compare --resume {folder}`")
    on_validation, reason = choice_basis(plan, sources)
    rows = arm_stats(results)
    classes = class_names(plan)
    units = {(u.arm.name, u.seed): u for u in plan.units()}
    details = [
        arm_details(folder, [units[(r.arm, r.seed)] for r in group], group, classes)
        for group in group_by_arm(results).values()
    ]
    finished = {(r.arm, r.seed) for r in results}
    unfinished = []
    for unit in planned_units(plan, sources):
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
        choice=choose_best(results, on_validation=on_validation, reason=reason),
        command=None if sources else _reproduce(folder, plan),
        environment=folder.environment(),
        config_text=config_path.read_text(encoding="utf-8"),
        settings=model_settings(plan, results, on_validation, reason),
        on_validation=on_validation,
        sources=sources or [],
    )


def class_names(plan: RunPlan) -> tuple[str, ...]:
    """The dataset's class names (the registry's, or a folder dataset's subfolders), then '10', '11', ...
    for any further model outputs."""
    names = dataset_classes(plan.data)
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


# ---------------------------------------------------------------------------------------------
# Sweeps: each model's best setting


# Recipe keys' labels in field order: the order settings are shown in.
_LABELS = [f.metadata["label"] or f.name for f in dataclasses.fields(Recipe)]


def _settings(arm: Arm, others: Sequence[Arm]) -> dict[str, Any]:
    """The arm's value of every recipe key where some other arm of its model differs from it."""
    values: dict[str, Any] = {}
    for other in others:
        values.update(arm.recipe.differences(other.recipe))
    return {label: values[label] for label in _LABELS if label in values}


def model_settings(
    plan: RunPlan, results: Sequence[UnitResult], on_validation: bool, reason: str = ""
) -> list[ModelSettings]:
    """Per model with at least two finished arms that differ in settings: every arm's swept settings
    and accuracies, the best by the rule against choosing on the test set, and Welch's tests of the best
    against each runner-up, Holm-adjusted as one family per model. Empty for a plain comparison."""
    by_arm = group_by_arm(results)
    models: dict[Any, list[Arm]] = {}
    for arm in plan.arms:
        if arm.name in by_arm:
            models.setdefault((arm.spec.name, arm.spec), []).append(arm)
    names = [name for name, _ in models]
    out = []
    for (name, _), arms in models.items():
        if len(arms) < 2 or len({a.recipe for a in arms}) < 2:
            continue
        model = name if names.count(name) == 1 else f"{name} ({arms[0].name})"  # two specs of one name
        units = [u for a in arms for u in by_arm[a.name]]
        rows = []
        for arm in arms:
            group = by_arm[arm.name]
            validation = [u.metrics.get("val_accuracy", u.history[-1].val_accuracy) for u in group]
            rows.append(
                SettingArm(
                    arm.name,
                    _settings(arm, arms),
                    aggregate([u.test_accuracy for u in group]),
                    aggregate(validation) if on_validation else None,
                )
            )
        swept = tuple(label for label in _LABELS if any(label in r.settings for r in rows))
        choice = choose_best(units, on_validation=on_validation, reason=reason)
        tests = against_best(units, choice.arm) if choice is not None else []
        out.append(ModelSettings(model, swept, rows, choice, tests))
    return out


# ---------------------------------------------------------------------------------------------
# A folder of runs (`cnnlab runs`)


@dataclass(frozen=True)
class RunListing:
    """One folder of a runs folder: what it holds, or why it cannot be read."""

    name: str
    state: str  # finished | incomplete | failed | damaged | not a run folder
    started: str | None = None
    dataset: str | None = None
    arms: int | None = None
    finished: int | None = None
    total: int | None = None
    failed: int = 0
    best_arm: str | None = None
    best_test_accuracy: float | None = None
    chosen_on: str | None = None  # "validation" or "test": how the best arm was chosen
    problem: str | None = None  # why a damaged folder cannot be read


def list_runs(runs_dir: Path) -> list[RunListing]:
    """Every folder in `runs_dir`, by name: run folders with their progress and best arm, the rest as
    damaged or not a run folder (never an exception for one folder)."""
    return [describe_run(path) for path in run_folders(runs_dir)]


def describe_run(path: Path) -> RunListing:
    """One folder of a runs folder, for `cnnlab runs`."""
    try:
        folder = RunFolder.open(path)
    except RunError:
        return RunListing(path.name, "not a run folder", problem="no config.toml")
    try:
        return _describe(folder)
    except Exception as exc:  # a listing names a damaged folder and goes on with the next
        return RunListing(path.name, "damaged", problem=first_line(exc).replace(f"{path}{os.sep}", ""))


def _describe(folder: RunFolder) -> RunListing:
    plan = folder.read_plan()
    sources = folder.read_sources()
    units = planned_units(plan, sources)
    states = [folder.status(unit).state for unit in units]
    finished, failed = states.count("finished"), states.count("failed")
    state = "failed" if failed else ("finished" if finished == len(units) else "incomplete")
    results = folder.results(plan)
    on_validation, reason = choice_basis(plan, sources)
    best_arm = best_accuracy = chosen_on = None
    if results:
        choice = choose_best(results, on_validation=on_validation, reason=reason)
        rows = arm_stats(results)
        if choice is not None:
            best_arm, chosen_on = choice.arm, "test" if choice.on_test else "validation"
        else:  # one arm, or none with a valid accuracy
            best_arm = max(
                rows, key=lambda r: -math.inf if math.isnan(r.test_accuracy.mean) else r.test_accuracy.mean
            ).arm
        best_accuracy = next(r.test_accuracy.mean for r in rows if r.arm == best_arm)
    started = folder.environment().get("started")
    return RunListing(
        folder.path.name, state, started=str(started) if started else None, dataset=plan.data.dataset,
        arms=len(plan.arms), finished=finished, total=len(units), failed=failed, best_arm=best_arm,
        best_test_accuracy=best_accuracy, chosen_on=chosen_on,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Before combining runs (`cnnlab report A B -o DIR`)


def check_combinable(folders: Sequence[RunFolder], plans: Sequence[RunPlan]) -> None:
    """Refuse, in one line, runs whose results do not compare: a run without a finished unit, or test
    sets that differ (dataset, --limit-test, or the test labels of each run's first finished unit).
    Different training data or validation splits are allowed: the report then chooses on the test set."""
    first: tuple[RunFolder, RunPlan, Any] | None = None
    for folder, plan in zip(folders, plans):
        unit = folder.first_finished(plan)
        if unit is None:
            raise RunError(f"{folder} has no finished unit; there is nothing of it to combine")
        labels = folder.predictions(unit)["labels"]
        if first is None:
            first = (folder, plan, labels)
            continue
        other, other_plan, other_labels = first
        for key, what in (("dataset", "dataset"), ("limit_test", "--limit-test")):
            mine, theirs = getattr(plan.data, key), getattr(other_plan.data, key)
            if mine != theirs:
                raise ConfigError(
                    f"cannot combine {other} and {folder}: their test sets differ ({what} {theirs} vs {mine}); "
                    "combine runs tested on the same images"
                )
        if labels.shape != other_labels.shape or not bool((labels == other_labels).all()):
            detail = (
                f"{len(other_labels):,} vs {len(labels):,} test images"
                if labels.shape != other_labels.shape
                else "the same number of test images with different labels"
            )
            raise ConfigError(
                f"cannot combine {other} and {folder}: their test sets differ ({detail} in their finished units' "
                "predictions.pt); combine runs tested on the same images"
            )
