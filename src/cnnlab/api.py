"""cnnlab from Python: plan a run, run it, resume it, evaluate it, report it.

    from cnnlab.api import plan_run, run
    from cnnlab.config import DataSelection, Recipe

    plan = plan_run(["convnet3", "convnet7"], recipes=[Recipe(epochs=2)], seeds=[0, 1],
                    data=DataSelection(data_dir="../shared/data", limit_train=5000))
    summary = run(plan, runs_dir="runs")
    print(summary.folder, [row.test_accuracy.mean for row in summary.rows])

The command line does exactly this: it parses options into the same frozen dataclasses, calls
these functions by keyword and renders what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.analysis import RunAnalysis, analyze
from cnnlab.catalog import load_spec
from cnnlab.config import (
    IMAGE_FORMATS,
    DataSelection,
    Hardware,
    HardwareRequest,
    Recipe,
    RunPlan,
    Unit,
    check_no_choice_on_test,
    make_arms,
)
from cnnlab.datasets import Dataset, default_cache_dir, load_dataset
from cnnlab.engine import DeviceData, Reporter, new_model
from cnnlab.engine import evaluate as evaluate_model
from cnnlab.errors import ConfigError
from cnnlab.hardware import check_available, resolve_device, resolve_hardware
from cnnlab.memory import check_fits_in_memory
from cnnlab.plots import (
    CURVES,
    confusion_figure,
    curve_path,
    image_grid_figure,
    learning_rate_figure,
    mistakes_figure,
    write_plots,
)
from cnnlab.report import Figures, render_html, render_markdown
from cnnlab.runfolder import RunFolder
from cnnlab.runner import RunOutcome, check_fits, run_units
from cnnlab.spec import ModelSpec
from cnnlab.stats import ArmStats, Comparison
from cnnlab.tables import comparison_csv, comparison_json, comparison_markdown

ReporterFactory = Callable[[Unit], Reporter]


def check_image_format(image_format: str) -> str:
    """The one check of a figure format, for every command that draws."""
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"--format must be {' or '.join(IMAGE_FORMATS)}, got '{image_format}'")
    return image_format


# ---------------------------------------------------------------------------------------------
# Planning


def plan_run(
    models: Sequence[str | Path | ModelSpec],
    *,
    recipes: Sequence[Recipe] = (Recipe(),),
    seeds: Sequence[int] = (0,),
    data: DataSelection = DataSelection(),
    hardware: HardwareRequest = HardwareRequest(),
) -> RunPlan:
    """Resolve models (built-in names, spec files, Keras JSON, or specs), recipes, seeds and hardware
    into a plan of arms and units; every check that needs no data happens here."""
    specs = [m if isinstance(m, ModelSpec) else load_spec(m) for m in models]
    seeds = tuple(seeds)
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
    ):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    for recipe in recipes:
        check_no_choice_on_test(recipe, data)
    return RunPlan(make_arms(specs, tuple(recipes)), seeds, data, hardware, resolve_hardware(hardware))


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class PreparedRun:
    """A run folder ready to train into: its plan, its data on the device and the hardware it uses."""

    folder: RunFolder
    plan: RunPlan
    hardware: Hardware
    dataset: Dataset
    data: DeviceData


def load_data(selection: DataSelection, *, progress: bool = False) -> Dataset:
    """The selection's dataset, from its folder or the download cache."""
    data_dir = Path(selection.data_dir) if selection.data_dir else None
    return load_dataset(selection.dataset, data_dir=data_dir, cache_dir=default_cache_dir(), progress=progress)


def prepare(
    plan: RunPlan, *, runs_dir: Path | str = "runs", name: str = "compare", progress: bool = False
) -> PreparedRun:
    """Load and check the data, then create the run folder and record the plan.

    Everything that can be refused is refused before the folder exists."""
    dataset = load_data(plan.data, progress=progress)
    check_fits(plan, dataset)
    check_fits_in_memory(plan, dataset)
    data = DeviceData(dataset, plan.data, check_available(plan.hardware))
    folder = RunFolder.create(Path(runs_dir), name)
    folder.write_plan(plan)
    return PreparedRun(folder, plan, plan.hardware, dataset, data)


def prepare_resume(run_dir: Path | str, *, data_dir: Path | str | None = None, progress: bool = False) -> PreparedRun:
    """Open an interrupted run folder with the hardware it recorded (0.1 folders: resolved now)."""
    folder = RunFolder.open(Path(run_dir))
    plan = folder.read_plan()
    folder.check_writable()
    hardware = plan.hardware or resolve_hardware(plan.hardware_request)
    selection = plan.data if data_dir is None else DataSelection(**{**plan.data.__dict__, "data_dir": str(data_dir)})
    dataset = load_data(selection, progress=progress)
    check_fits(plan, dataset)
    check_fits_in_memory(plan, dataset, hardware)
    data = DeviceData(dataset, plan.data, check_available(hardware))
    return PreparedRun(folder, plan, hardware, dataset, data)


def execute(prepared: PreparedRun, *, make_reporter: ReporterFactory | None = None) -> RunOutcome:
    """Train every unit of the prepared run that is not finished yet."""
    return run_units(prepared.folder, prepared.plan, prepared.data, prepared.hardware, make_reporter)


@dataclass
class ReportSummary:
    """What `report` computed and wrote."""

    folder: RunFolder
    rows: list[ArmStats]
    comparisons: list[Comparison]
    files: list[Path]
    analysis: RunAnalysis

    @property
    def report(self) -> Path:
        return self.folder.output("report.html")


def run(
    plan: RunPlan,
    *,
    runs_dir: Path | str = "runs",
    name: str = "compare",
    make_reporter: ReporterFactory | None = None,
    image_format: str = "png",
) -> ReportSummary:
    """Prepare, train every unit and write the tables, figures and report."""
    check_image_format(image_format)
    prepared = prepare(plan, runs_dir=runs_dir, name=name)
    execute(prepared, make_reporter=make_reporter)
    return report(prepared.folder.path, image_format=image_format)


def resume(
    run_dir: Path | str,
    *,
    data_dir: Path | str | None = None,
    make_reporter: ReporterFactory | None = None,
    image_format: str = "png",
) -> ReportSummary:
    """Finish an interrupted run folder: finished units are kept, the rest train; then the report."""
    check_image_format(image_format)
    prepared = prepare_resume(run_dir, data_dir=data_dir)
    execute(prepared, make_reporter=make_reporter)
    return report(prepared.folder.path, image_format=image_format)


# ---------------------------------------------------------------------------------------------
# Reporting and evaluating


def report(run_dir: Path | str, *, image_format: str = "png") -> ReportSummary:
    """(Re)write a run folder's tables, figures, report.html and report.md from its saved results."""
    check_image_format(image_format)
    folder = RunFolder.open(Path(run_dir))
    analysis = analyze(folder)
    files = [
        folder.write_text("comparison.md", comparison_markdown(analysis.rows, analysis.comparisons, analysis.choice)),
        folder.write_text("comparison.csv", comparison_csv(analysis.rows)),
        folder.write_json("comparison.json", comparison_json(analysis.rows, analysis.comparisons, analysis.choice)),
    ]
    folders = {d.name: d.folder for d in analysis.details}
    files += write_plots(folder.path, analysis.results, folders, image_format)
    figures = Figures(overlay=folder.output(f"curves_all.{image_format}"))
    for d in analysis.details:
        arm = {curve: curve_path(folder.path, curve, d.folder, image_format) for curve in CURVES}
        seeds = f" ({len(d.units)} seeds)" if len(d.units) > 1 else ""
        arm["confusion"] = confusion_figure(
            d.confusion,
            analysis.classes,
            f"{d.name}: confusion matrix{seeds}",
            folder.output(f"confusion_{d.folder}.{image_format}"),
        )
        if d.mistakes is not None and len(d.mistakes.images):
            seed_note = f", seed {d.mistakes.seed}" if len(d.units) > 1 else ""
            m = d.mistakes
            arm["mistakes"] = mistakes_figure(
                m.images,
                m.labels,
                m.predictions,
                m.confidences,
                analysis.classes,
                f"{d.name}: most confident mistakes{seed_note}",
                folder.output(f"mistakes_{d.folder}.{image_format}"),
            )
        if d.scheduled:
            arm["learning_rate"] = learning_rate_figure(d.units, folder.output(f"lr_{d.folder}.{image_format}"))
        if d.augmented is not None:
            arm["augmented"] = image_grid_figure(
                *d.augmented, f"{d.name}: augmentation", folder.output(f"augmented_{d.folder}.{image_format}")
            )
        files += [path for key, path in arm.items() if key not in CURVES]
        figures.arms[d.name] = arm
    files.append(folder.write_text("report.html", render_html(analysis, figures)))
    files.append(folder.write_text("report.md", render_markdown(analysis, figures)))
    return ReportSummary(folder, analysis.rows, analysis.comparisons, files, analysis)


@dataclass(frozen=True)
class UnitEvaluation:
    """A finished unit's saved weights, evaluated again."""

    arm: str
    seed: int
    loss: float
    accuracy: float


def evaluate(
    run_dir: Path | str, *, dataset: str | None = None, data_dir: Path | str | None = None, device: str = "auto"
) -> tuple[str, int, list[UnitEvaluation]]:
    """Reload every finished unit's weights and evaluate them on a dataset's test split (fp32).

    Returns the dataset's name, its number of test images and one evaluation per unit."""
    folder = RunFolder.open(Path(run_dir))
    plan = folder.read_plan()
    selection = DataSelection(
        dataset=dataset or plan.data.dataset, data_dir=str(data_dir) if data_dir is not None else plan.data.data_dir
    )
    data = load_data(selection)
    target = resolve_device(device)
    hardware = Hardware(str(target), "", "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
    images, labels = data.test_images.to(target), data.test_labels.long().to(target)
    rows = []
    for unit in plan.units():
        if folder.status(unit).state != "finished":
            continue
        model = folder.load_weights_into(unit, new_model(unit.arm.spec, None, hardware))
        result = evaluate_model(model, images, labels, hardware)
        rows.append(UnitEvaluation(unit.arm.name, unit.seed, result.loss, result.accuracy))
    return selection.dataset, len(images), rows
