"""cnnlab from Python: plan a run, run it, resume it, evaluate it, report it.

    from cnnlab.api import plan_run, run
    from cnnlab.config import DataSelection, Recipe

    plan = plan_run(["convnet3", "convnet7"], recipes=[Recipe(epochs=2)], seeds=[0, 1],
                    data=DataSelection(data_dir="../shared/data", limit_train=5000))
    summary = run(plan, runs_dir="runs")
    print(summary.folder, [row.test_accuracy.mean for row in summary.rows])

`combine([run_a, run_b], out_dir)` builds one comparison of several run folders tested on the same
images into a new run folder, and reports it.

The command line does exactly this: it parses options into the same frozen dataclasses, calls
these functions by keyword and renders what they return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from cnnlab.analysis import RunAnalysis, analyze, check_combinable
from cnnlab.catalog import load_spec
from cnnlab.config import (
    IMAGE_FORMATS,
    Arm,
    DataSelection,
    Hardware,
    HardwareRequest,
    InitialWeights,
    Recipe,
    RunPlan,
    Unit,
    check_no_choice_on_test,
    make_arms,
    safe_folder_name,
)
from cnnlab.datasets import Dataset
from cnnlab.engine import DeviceData, Reporter, new_model
from cnnlab.engine import evaluate as evaluate_model
from cnnlab.errors import ConfigError, RunError
from cnnlab.hardware import check_available, resolve_device, resolve_hardware
from cnnlab.image_folders import load_selection
from cnnlab.keras_files import KerasArchive, read_keras_file_and_digest
from cnnlab.keras_weights import state_dict_from_keras
from cnnlab.memory import check_fits_in_memory
from cnnlab.plots import (
    CURVES,
    confusion_figure,
    curve_path,
    has_curves,
    image_grid_figure,
    learning_rate_figure,
    mistakes_figure,
    settings_figure,
    write_plots,
)
from cnnlab.report import Figures, render_html, render_markdown
from cnnlab.runfolder import RunFolder
from cnnlab.runner import RunOutcome, UnitOutcome, check_fits, run_units
from cnnlab.spec import ModelSpec
from cnnlab.stats import ArmStats, Comparison
from cnnlab.sweep import load_sweep
from cnnlab.tables import comparison_csv, comparison_json, comparison_markdown

ReporterFactory = Callable[[Unit], Reporter]
BACKENDS = ("local", "ray")


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
    init_from: Path | str | None = None,
) -> RunPlan:
    """Resolve models (built-in names, spec files, Keras JSON or model files, or specs), recipes, seeds
    and hardware into a plan of arms and units; every check that needs no data happens here.

    `init_from` is a Keras model file (.keras or .h5) whose weights every unit starts from instead of
    its seed's initialisation (seeds then differ in data order, dropout and augmentation); every
    model must have its layers' shapes. With it, `Recipe(epochs=0)` tests the file's weights as they are."""
    specs = [m if isinstance(m, ModelSpec) else load_spec(m) for m in models]
    initial = None
    if init_from is not None:
        archive, digest = _read_initial_weights(init_from)
        for spec in specs:
            state_dict_from_keras(spec, archive.weights, archive.source)  # refused here if a layer does not fit
        initial = InitialWeights(str(init_from), digest)
    seeds = tuple(seeds)
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
    ):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    for recipe in recipes:
        check_no_choice_on_test(recipe, data)
        if recipe.epochs == 0 and initial is None:
            raise ConfigError(
                "--epochs 0 trains nothing: it tests the weights of --init-from FILE; give --init-from too"
            )
    arms = make_arms(specs, tuple(recipes))
    return RunPlan(arms, seeds, data, hardware, resolve_hardware(hardware), initial_weights=initial)


def _read_initial_weights(path: Path | str) -> tuple[KerasArchive, str]:
    """A Keras model file's architecture and weights, and the SHA-256 of its bytes."""
    return read_keras_file_and_digest(path)


def _initial_state_dicts(plan: RunPlan) -> dict[str, dict[str, torch.Tensor]]:
    """Each arm's starting weights from the plan's `--init-from` file, checked to be the file the plan
    was made with (its SHA-256)."""
    if plan.initial_weights is None:
        return {}
    archive, digest = _read_initial_weights(plan.initial_weights.source)
    if digest != plan.initial_weights.sha256:
        raise ConfigError(
            f"--init-from {plan.initial_weights.source}: the file changed since the run was planned; plan it again"
        )
    return {arm.folder: state_dict_from_keras(arm.spec, archive.weights, archive.source) for arm in plan.arms}


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
    """The selection's dataset, from its folder or the download cache; a folder dataset (`folder:PATH`,
    one subfolder of images per class) with its split in `Dataset.recorded`, for the plan to record."""
    return load_selection(selection, progress=progress)


def prepare(
    plan: RunPlan,
    *,
    runs_dir: Path | str = "runs",
    name: str = "compare",
    progress: bool = False,
    out_dir: Path | str | None = None,
) -> PreparedRun:
    """Load and check the data, then create the run folder (`runs_dir/<time>-<name>`, or exactly
    `out_dir`, which must not exist or be empty) and record the plan.

    Everything that can be refused is refused before the folder exists."""
    dataset = load_data(plan.data, progress=progress)
    plan = dataclasses.replace(plan, data=dataset.recorded or plan.data)  # a folder dataset's split, recorded
    check_fits(plan, dataset)
    check_fits_in_memory(plan, dataset)
    initial = _initial_state_dicts(plan)
    data = DeviceData(dataset, plan.data, check_available(plan.hardware))
    folder = RunFolder.create(Path(runs_dir), name) if out_dir is None else RunFolder.create_at(Path(out_dir))
    folder.write_plan(plan)
    for arm in plan.arms:
        if arm.folder in initial:
            folder.write_initial_weights(arm, initial[arm.folder])
    return PreparedRun(folder, plan, plan.hardware, dataset, data)


def prepare_resume(run_dir: Path | str, *, data_dir: Path | str | None = None, progress: bool = False) -> PreparedRun:
    """Open an interrupted run folder with the hardware it recorded (0.1 folders: resolved now)."""
    folder = RunFolder.open(Path(run_dir))
    plan = folder.read_plan()
    if folder.read_sources() is not None:
        raise RunError(f"{folder} combines other run folders' results and trains nothing; resume those instead")
    folder.check_writable()
    hardware = plan.hardware or resolve_hardware(plan.hardware_request)
    selection = _recorded_data(plan.data, data_dir)
    plan = dataclasses.replace(plan, data=selection)  # workers (Ray) read the data from the same folder
    dataset = load_data(selection, progress=progress)
    check_fits(plan, dataset)
    check_fits_in_memory(plan, dataset, hardware)
    data = DeviceData(dataset, plan.data, check_available(hardware))
    return PreparedRun(folder, plan, hardware, dataset, data)


def _recorded_data(recorded: DataSelection, data_dir: Path | str | None) -> DataSelection:
    """A run's data selection, from the folder it recorded; `data_dir` (an option or $CNNLAB_DATA_DIR)
    only where the run recorded none or its folder is gone (moved): a set environment variable
    never silently swaps a run's data for other files."""
    if data_dir is None or (recorded.data_dir is not None and Path(recorded.data_dir).is_dir()):
        return recorded
    return dataclasses.replace(recorded, data_dir=str(data_dir))


class Tracker(Protocol):
    """Follows a run as it goes (tracking.MlflowTracker); only the driver process calls it."""

    def start(self, prepared: PreparedRun) -> None: ...
    def log_unit(self, outcome: UnitOutcome) -> None: ...
    def finish(self, summary: ReportSummary) -> None: ...


def check_backend(
    backend: str, hardware: Hardware, ray_address: str | None = None, gpus_per_unit: float | None = None
) -> None:
    """The execution options' user errors (a ConfigError each), found before a run folder is made."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be {' or '.join(BACKENDS)}, got '{backend}'")
    if backend == "local" and (ray_address is not None or gpus_per_unit is not None):
        raise ConfigError("--ray-address and --gpus-per-unit need --backend ray")
    if backend == "ray" and hardware.units_at_once > 1:
        raise ConfigError("--units-at-once is the local backend's; on Ray, share a GPU with --gpus-per-unit 0.25")


def execute(
    prepared: PreparedRun,
    *,
    make_reporter: ReporterFactory | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    gpus_per_unit: float | None = None,
    tracker: Tracker | None = None,
) -> RunOutcome:
    """Train every unit of the prepared run that is not finished yet: in this process
    (`backend="local"`, `hardware.units_at_once` at a time), or in parallel on Ray (`"ray"`: a local
    instance sized to the machine, or the cluster at `ray_address`), with `hardware.threads` CPU
    threads and `gpus_per_unit` GPUs each.
    Workers write into the run folder and return their outcome; only this process calls `tracker`."""
    check_backend(backend, prepared.hardware, ray_address, gpus_per_unit)
    if tracker is not None:
        tracker.start(prepared)
    on_outcome = tracker.log_unit if tracker is not None else None
    if backend == "ray":
        from cnnlab.ray_backend import run_units_on_ray

        return run_units_on_ray(prepared.folder, prepared.plan, prepared.hardware, address=ray_address,
                                gpus_per_unit=gpus_per_unit, on_outcome=on_outcome)  # fmt: skip
    return run_units(prepared.folder, prepared.plan, prepared.data, prepared.hardware, make_reporter, on_outcome)


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


def plan_sweep(path: Path | str, *, data_dir: Path | str | None = None, threads: int | None = None) -> RunPlan:
    """The plan of a sweep file (sweep.py): its models x grid x seeds; `data_dir` is where the
    datasets are when the file does not say, and `threads` (CPU threads per unit) overrides the file's."""
    sweep = load_sweep(Path(path))
    data = sweep.data
    if data_dir is not None and sweep.data.data_dir is None:
        data = dataclasses.replace(sweep.data, data_dir=str(data_dir))
    hardware = sweep.hardware if threads is None else dataclasses.replace(sweep.hardware, threads=threads)
    return plan_run(list(sweep.models), recipes=sweep.recipes, seeds=sweep.seeds, data=data, hardware=hardware)


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
# A Keras model file as a run


@contextlib.contextmanager
def keras_model_run(
    path: Path | str,
    *,
    dataset: str = "mnist",
    data_dir: Path | str | None = None,
    limit_test: int | None = None,
    out_dir: Path | str | None = None,
) -> Iterator[Path]:
    """A Keras model file (.keras or .h5) as a one-model run folder, so that every command that reads
    runs (evaluate, predict, report, export, serve) reads it too: its weights are tested as they are
    (0 epochs, CPU, fp32) on `dataset`'s test split. The folder is `out_dir` (new or empty), else a
    temporary one that is deleted on leaving the `with` block."""
    spec = load_spec(path)
    plan = plan_run(
        [spec], recipes=[Recipe(epochs=0)], data=DataSelection(dataset=dataset, data_dir=_text(data_dir),
        limit_test=limit_test), hardware=HardwareRequest(device="cpu", precision="fp32", compile="off"),
        init_from=path,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        target = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        prepared = prepare(plan, out_dir=target)
        outcome = execute(prepared)
        if outcome.failed:
            unit, error = outcome.failed[0]
            raise RunError(f"{path}: testing {unit.arm.name} failed ({error})")
        yield prepared.folder.path


def _text(value: Path | str | None) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Reporting and evaluating


def report(run_dir: Path | str, *, image_format: str = "png") -> ReportSummary:
    """(Re)write a run folder's tables, figures, report.html and report.md from its saved results."""
    check_image_format(image_format)
    folder = RunFolder.open(Path(run_dir))
    analysis = analyze(folder)
    rows, comparisons, choice, settings = analysis.rows, analysis.comparisons, analysis.choice, analysis.settings
    files = [
        folder.write_text("comparison.md", comparison_markdown(rows, comparisons, choice, settings)),
        folder.write_text("comparison.csv", comparison_csv(rows)),
        folder.write_json("comparison.json", comparison_json(rows, comparisons, choice, settings)),
    ]
    folders = {d.name: d.folder for d in analysis.details}
    files += write_plots(folder.path, analysis.results, folders, image_format)
    trained = {d.name for d in analysis.details if has_curves(d.units)}  # 0 epochs (--init-from): no curves
    figures = Figures(overlay=folder.output(f"curves_all.{image_format}") if trained else None)
    for d in analysis.details:
        arm = {curve: curve_path(folder.path, curve, d.folder, image_format) for curve in CURVES if d.name in trained}
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
    figures.settings.update(_settings_figures(folder, analysis, image_format))
    files += list(figures.settings.values())
    files.append(folder.write_text("report.html", render_html(analysis, figures)))
    files.append(folder.write_text("report.md", render_markdown(analysis, figures)))
    return ReportSummary(folder, analysis.rows, analysis.comparisons, files, analysis)


def _settings_figures(folder: RunFolder, analysis: RunAnalysis, image_format: str) -> dict[str, Path]:
    """In a sweep, one figure per swept setting: accuracy against it, one line per model that sweeps it."""
    figures = {}
    for key in dict.fromkeys(key for model in analysis.settings for key in model.swept):
        lines = {
            m.model: [(a.settings[key], a.test_accuracy, a.val_accuracy) for a in m.along(key)]
            for m in analysis.settings
            if key in m.swept
        }
        path = folder.output(f"settings_{safe_folder_name(key)}.{image_format}")
        figures[key] = settings_figure(key, lines, path)
    return figures


def combine(run_dirs: Sequence[Path | str], out_dir: Path | str, *, image_format: str = "png") -> ReportSummary:
    """One comparison of several run folders: a new run folder at `out_dir` whose plan holds every arm
    of every input (an arm name that several inputs share is prefixed with its run folder's name), with
    each unit's files copied from its input (the inputs are left as they are), then its report.

    Refused in one line, before anything is written: inputs whose test sets differ (dataset,
    --limit-test, the test labels of their first finished units), an input without a finished unit, an
    input given twice, and an `out_dir` that exists and is not empty. Inputs with different validation
    splits are allowed; the report then chooses on the test set and says so."""
    check_image_format(image_format)
    if not run_dirs:
        raise ConfigError("give the run folders to combine, e.g. cnnlab report RUN_A RUN_B -o runs/combined")
    folders = [RunFolder.open(Path(d)) for d in run_dirs]
    resolved = [f.path.resolve() for f in folders]
    if len(set(resolved)) != len(resolved):
        raise ConfigError("a run folder is given twice; give each run folder once")
    target = Path(out_dir).resolve()
    if any(target == r or r in target.parents for r in resolved):
        raise ConfigError(f"-o {out_dir} is inside a run folder being combined; give a folder outside them")
    plans = [f.read_plan() for f in folders]
    check_combinable(folders, plans)
    inputs_per_name = Counter(a.name for plan in plans for a in plan.arms)  # names are unique within a plan
    shared = {name for name, count in inputs_per_name.items() if count > 1}
    arms: list[Arm] = []
    mappings: list[dict[str, str]] = []
    for folder, plan in zip(folders, plans):
        mapping = {a.name: f"{folder.path.name}/{a.name}" if a.name in shared else a.name for a in plan.arms}
        arms += [Arm(mapping[a.name], safe_folder_name(mapping[a.name]), a.spec, a.recipe) for a in plan.arms]
        mappings.append(mapping)
    if len({a.folder for a in arms}) != len(arms):
        raise ConfigError("two run folders to combine have the same name and arms; rename one of the folders")
    first = plans[0]
    seeds = tuple(dict.fromkeys(seed for plan in plans for seed in plan.seeds))
    combined = RunPlan(tuple(arms), seeds, first.data, first.hardware_request, first.hardware)
    folder = RunFolder.create_at(Path(out_dir))
    folder.write_plan(combined)
    folder.write_sources(
        [
            {"run": source.path.name, "path": str(source.path.resolve()), "data": dataclasses.asdict(plan.data),
             "seeds": list(plan.seeds), "arms": mapping, "started": source.environment().get("started")}
            for source, plan, mapping in zip(folders, plans, mappings)
        ]
    )  # fmt: skip
    for source, plan, mapping in zip(folders, plans, mappings):
        for unit in plan.units():
            if source.has_files(unit):
                folder.copy_unit(source, unit, Unit(combined.arm(mapping[unit.arm.name]), unit.seed))
    return report(folder.path, image_format=image_format)


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
    if dataset is None:  # the run's own data, its recorded split checked
        selection = _recorded_data(plan.data, data_dir)
    else:
        selection = DataSelection(
            dataset=dataset, data_dir=str(data_dir) if data_dir is not None else plan.data.data_dir
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
        result = evaluate_model(model, images, labels, hardware, numerics=unit.arm.recipe.keras_numerics)
        rows.append(UnitEvaluation(unit.arm.name, unit.seed, result.loss, result.accuracy))
    return selection.dataset, len(images), rows
