"""The `cnnlab` command line: parse options into the run plan's dataclasses, call the library
(`cnnlab.api`) by keyword, render what it returns. Nothing imports this module."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cnnlab import __version__
from cnnlab.errors import CnnlabError

app = typer.Typer(
    name="cnnlab",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Train, evaluate and compare convolutional networks on MNIST, Fashion-MNIST and KMNIST.\n\n"
    "Example: cnnlab compare --epochs 1   (the notebook's three models, side by side)",
)
# Piped output (CI logs) gets wide lines instead of Rich's 80-column default, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DEFAULT_MODELS = ["convnet3", "convnet5", "convnet7"]

# Options shared by `train` and `compare`.
DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset", "-d", help="mnist, fashion-mnist, kmnist, or folder:PATH (one subfolder of images per class)."
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="CNNLAB_DATA_DIR",
        show_envvar=True,
        help="Folder with one sub-folder per dataset (mnist/, fashion-mnist/, kmnist/) of IDX files; no download.",
    ),
]
# Recipe options default to None: unset, they take the --recipe file's value, else the notebook's recipe.
# Repeated (--lr 1e-3 --lr 3e-4), they make one arm per combination of the values given.
EpochsOpt = Annotated[list[int] | None, typer.Option("--epochs", "-e", help="Training epochs. Default: 12.")]
BatchOpt = Annotated[list[int] | None, typer.Option("--batch-size", "-b", help="Training batch size. Default: 128.")]
OptimizerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--optimizer",
        help="adam, sgd, rmsprop or adamw, with Keras 3's update rules and defaults (Adam: betas 0.9/0.999, "
        "epsilon 1e-7). Default: adam.",
    ),
]
LrOpt = Annotated[
    list[float] | None,
    typer.Option("--lr", help="Learning rate (initial, with --schedule). Default: Keras's: 0.01 sgd, 0.001 others."),
]
MomentumOpt = Annotated[list[float] | None, typer.Option("--momentum", help="Momentum of sgd or rmsprop. Default: 0.")]
NesterovOpt = Annotated[bool | None, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (sgd).")]
RhoOpt = Annotated[list[float] | None, typer.Option("--rho", help="rmsprop's discounting factor. Default: 0.9.")]
WeightDecayOpt = Annotated[
    list[float] | None,
    typer.Option("--weight-decay", help="Decoupled weight decay (Keras's weight_decay). Default: 0.004 adamw, 0."),
]
ScheduleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--schedule",
        help="Learning-rate schedule (Keras's): exponential:decay_steps=N,decay_rate=R[,staircase=true] | "
        "piecewise:boundaries=B1/B2,values=V0/V1/V2 | cosine:decay_steps=N[,alpha=A,warmup_target=LR,"
        "warmup_steps=W] | plateau[:factor=0.1,patience=10,cooldown=0,min_lr=0,min_delta=1e-4,monitor=val_loss].",
    ),
]
EarlyStoppingOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--early-stopping",
        help="Keras's EarlyStopping: patience=3[,monitor=val_loss,min_delta=0,mode=auto,baseline=,"
        "restore_best_weights=true,start_from_epoch=0], or on. Needs --val-split.",
    ),
]
BestCheckpointOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--best-checkpoint",
        help="Keep the best epoch's weights (Keras's ModelCheckpoint save_best_only): on, or "
        "monitor=val_accuracy[,mode=max]. Needs --val-split.",
    ),
]
AugmentOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--augment",
        help="Augment training batches on the device (Keras's RandomTranslation, RandomRotation, RandomZoom): "
        "translate=0.1,rotate=0.05,zoom=0.1[,fill_mode=reflect,interpolation=bilinear,fill_value=0].",
    ),
]
KerasNumericsOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--keras-numerics",
        help="Whose numerics train: 3 (Keras 3) or 2 (Keras 2.2.4, the notebook's: BatchNormalization's "
        "unbiased, zero-debiased moving variance, the clipped cross-entropy, RMSprop's epsilon). Default: 3.",
    ),
]
RecipeFileOpt = Annotated[
    Path | None,
    typer.Option("--recipe", help="A TOML file of recipe keys (options given here override it); see README."),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of weights, shuffling and dropout (first seed with --seeds).")
]
SeedsOpt = Annotated[
    str | None,
    typer.Option(
        "--seeds", help="Train each model with several seeds: a count N (seeds S..S+N-1, S = --seed) or a list 0,1,2."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16. bf16's accuracy "
        "against fp32 is unverified: on a CPU, convnet5 is equivalent within 0.15 pp after 4 epochs (32 seeds; 8 on an "
        "AMX CPU) and 12 epochs (16 seeds), convnet7 at 12 epochs (20 seeds), convnet3 after 2 epochs (16 seeds, AMX "
        "too), and convnet3 at "
        "12 epochs is not worse by more than 0.15 pp; on a GPU all three are unresolved after 4 epochs (convnet7 0.7-2.5 pp behind); fp32 for "
        "numbers to publish (BENCHMARKS.md).",
    ),
]
CompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="auto (on CUDA: the training step as one CUDA graph, not compiled; on the CPU: off), "
        "on (torch.compile too; pays in long runs) or off.",
    ),
]
LimitTrainOpt = Annotated[int | None, typer.Option("--limit-train", help="Use only the first N training images.")]
LimitTestOpt = Annotated[int | None, typer.Option("--limit-test", help="Use only the first N test images.")]
ValSplitOpt = Annotated[
    float,
    typer.Option(
        "--val-split",
        help="Hold out this fraction of the training images (stratified, the same for every model and seed) "
        "for validation instead of the test split; the test split is then reported once, at the end.",
    ),
]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the held-out validation images.")]
# How units run (none of it changes a result, except the thread count, which the plan records).
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend", help="local (in this process, --units-at-once at a time) or ray (units in parallel on Ray)."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="A Ray cluster to submit to (HOST:PORT or auto); default: a local Ray instance."
    ),
]
CpusPerUnitOpt = Annotated[
    int | None, typer.Option("--cpus-per-unit", help="CPU cores of each unit, and its torch thread count.")
]
UnitsAtOnceOpt = Annotated[
    int | None,
    typer.Option(
        "--units-at-once",
        help="Units (models x seeds) the local backend trains together, taking turns step by step, each with "
        "the result it gets alone; on CUDA each on its own stream, so the GPU overlaps them (measured for "
        "bare steps: 5 seeds in 2.0-3.2x one seed's time; whole runs not yet). Default 1.",
    ),
]
GpusPerUnitOpt = Annotated[
    float | None, typer.Option("--gpus-per-unit", help="GPUs of each unit on Ray, e.g. 0.25 packs four on a GPU.")
]
MlflowOpt = Annotated[
    bool,
    typer.Option("--mlflow", help="Track the run in MLflow: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."),
]
YesOpt = Annotated[bool, typer.Option("--yes", help="Run a plan of more than 1,000 units.")]
MAX_UNITS = 1000
InitFromOpt = Annotated[
    Path | None,
    typer.Option(
        "--init-from",
        help="Start every seed from this Keras model file's weights (.keras, .h5); seeds still differ in data "
        "order and dropout. With --epochs 0 the weights are only tested.",
    ),
]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run folders are created.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Figure format: png or svg.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"cnnlab {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Train, evaluate and compare convolutional networks on MNIST, Fashion-MNIST and KMNIST."""


# ---------------------------------------------------------------------------------------------
# train and compare


# CLI parameter -> recipe key, for the recipe options.
RECIPE_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer", "lr": "learning_rate",
                  "momentum": "momentum", "nesterov": "nesterov", "rho": "rho", "weight_decay": "weight_decay",
                  "schedule": "schedule", "early_stopping": "early_stopping", "best_checkpoint": "best_checkpoint",
                  "augment": "augmentation", "keras_numerics": "keras_numerics"}  # fmt: skip


def _recipes(recipe_file: Path | None, options: dict[str, object]):
    """The recipes: the --recipe file's keys, then the command line's options; an option given
    several times makes one recipe per combination of its values."""
    import tomllib

    from cnnlab.errors import ConfigError
    from cnnlab.sweep import expand_grid

    base: dict[str, object] = {}
    source = "the command line"
    if recipe_file is not None:
        source = str(recipe_file)
        try:
            base = tomllib.loads(recipe_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--recipe {recipe_file}: cannot be read ({exc}); give a TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{recipe_file}: not valid TOML ({exc}); fix the syntax") from None
    grid: dict[str, list[object]] = {}
    for option, key in RECIPE_OPTIONS.items():
        values = options[option]
        if values is None:
            continue
        if isinstance(values, list) and len(values) > 1:
            grid[key] = values
        else:
            base[key] = values[0] if isinstance(values, list) else values
    return expand_grid(base, grid, source)


def _execution(options: dict[str, object]) -> dict[str, object]:
    """The execution options as `api.execute` takes them."""
    return {"backend": options["backend"], "ray_address": options["ray_address"],
            "gpus_per_unit": options["gpus_per_unit"], "mlflow": options["mlflow"]}  # fmt: skip


def _tracker(mlflow: bool):
    """An MLflow tracker when --mlflow was given (the extra's absence is one clear line)."""
    if not mlflow:
        return None
    from cnnlab.tracking import MlflowTracker

    return MlflowTracker()


def _check_plan(plan, options: dict[str, object]) -> None:
    """What a plan and its execution options can get wrong, told before a run folder is made."""
    from cnnlab.api import check_backend
    from cnnlab.errors import ConfigError

    check_backend(options["backend"], plan.hardware, options["ray_address"], options["gpus_per_unit"])
    units = len(plan.units())
    if units > MAX_UNITS and not options["yes"]:
        raise ConfigError(f"the plan has {units:,} units ({len(plan.arms):,} arms x {len(plan.seeds)} seeds), more "
                          f"than {MAX_UNITS:,}; check the grid, or add --yes to run them all")  # fmt: skip


def _train(*, models: list[str], name: str, options: dict[str, object]) -> None:
    """`train` and `compare`: options into a plan, then prepare, train and report."""
    from cnnlab.api import check_image_format, plan_run, prepare
    from cnnlab.config import DataSelection, HardwareRequest, parse_seeds

    check_image_format(options["image_format"])
    data_dir = options["data_dir"]
    plan = plan_run(
        models,
        recipes=_recipes(options["recipe_file"], options),
        seeds=parse_seeds(options["seed"], options["seeds"]),
        data=DataSelection(
            dataset=options["dataset"],
            data_dir=str(data_dir) if data_dir else None,
            limit_train=options["limit_train"],
            limit_test=options["limit_test"],
            val_split=options["val_split"],
            split_seed=options["split_seed"],
        ),
        hardware=HardwareRequest(
            device=options["device"], precision=options["precision"], compile=options["compile_"],
            threads=options["cpus_per_unit"], units_at_once=options["units_at_once"],
        ),
        init_from=options["init_from"],
    )  # fmt: skip
    _check_plan(plan, options)
    prepared = prepare(plan, runs_dir=options["runs_dir"], name=name, progress=console.is_terminal)
    _execute_and_show(prepared, options["image_format"], _execution(options))


def _resume(run_dir: Path, data_dir: Path | None, image_format: str, execution: dict[str, object]) -> None:
    from cnnlab.api import check_image_format, prepare_resume

    check_image_format(image_format)
    prepared = prepare_resume(run_dir, data_dir=data_dir, progress=console.is_terminal)
    console.print(f"Resuming {prepared.folder}", highlight=False, markup=False)
    _execute_and_show(prepared, image_format, execution)


def _execute_and_show(prepared, image_format: str, execution: dict[str, object]) -> None:
    from cnnlab.api import execute
    from cnnlab.progress import make_reporter

    hardware, data = prepared.hardware, prepared.data
    console.print(
        f"Run folder: {prepared.folder}\nDevice: {hardware.device_name} ({hardware.device}), "
        f"precision {hardware.precision}, compile {'on' if hardware.compiled else 'off'}"
        f"{', one CUDA graph per step' if hardware.cuda_graph else ''}, "
        f"{hardware.threads} threads; {len(data.train_images):,} training / {len(data.test_images):,} "
        f"test images of {prepared.plan.data.dataset}",
        highlight=False,
        markup=False,
    )
    multi_seed = len(prepared.plan.seeds) > 1
    tracker = _tracker(bool(execution["mlflow"]))
    with _sigterm_as_interrupt():
        try:
            outcome = execute(
                prepared,
                make_reporter=lambda unit: make_reporter(
                    unit.label if multi_seed else unit.arm.name, console, live=hardware.units_at_once == 1
                ),  # fmt: skip
                backend=execution["backend"],
                ray_address=execution["ray_address"],
                gpus_per_unit=execution["gpus_per_unit"],
                tracker=tracker,
            )
        except KeyboardInterrupt as exc:
            prepared.folder.remove_partial_files()  # a write the signal cut short
            err_console.print(
                f"Interrupted. The partial run is in {prepared.folder}; finish it with "
                f"`cnnlab compare --resume {prepared.folder}`.",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            raise typer.Exit(143 if isinstance(exc, _Terminated) else 130) from None
    for unit, error in outcome.failed:
        err_console.print(f"error: {unit.label} failed: {error}", highlight=False, markup=False, soft_wrap=True)
    summary = _show_report(prepared.folder.path, image_format)
    if tracker is not None:
        tracker.finish(summary)
        console.print(f"MLflow: {tracker.describe()}", highlight=False, markup=False, soft_wrap=True)
    if outcome.failed:
        raise typer.Exit(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop), handled like Ctrl-C."""


class _sigterm_as_interrupt:
    """Within the block, SIGTERM interrupts training as Ctrl-C does (the unit is marked interrupted)."""

    def __enter__(self) -> None:
        def handler(signum, frame):
            raise _Terminated()

        self.previous = signal.signal(signal.SIGTERM, handler)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)


KerasDatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset", "-d", help="For a Keras model file: the dataset whose test images and classes it uses (mnist)."
    ),
]
RUN_OR_KERAS = "A run folder made by train, compare or sweep, or a Keras model file (.keras, .h5)."


def _is_keras_model(path: Path) -> bool:
    """Whether a command's RUN_DIR argument names a Keras model file rather than a run folder."""
    from cnnlab.keras_files import is_keras_file

    return is_keras_file(path) and path.is_file()


@contextlib.contextmanager
def _as_run(path: Path, dataset: str | None, data_dir: Path | None, out_dir: Path | None = None) -> Iterator[Path]:
    """A run folder as it is; a Keras model file as a one-model run, its weights tested on --dataset."""
    from cnnlab.api import keras_model_run
    from cnnlab.errors import ConfigError

    if not _is_keras_model(path):
        if dataset is not None:
            raise ConfigError(f"--dataset applies to a Keras model file; {path} is a run folder, which records its own")
        yield path
        return
    data = data_dir if data_dir is not None else os.environ.get("CNNLAB_DATA_DIR") or None
    # On stderr: stdout may be --json.
    err_console.print(f"Testing {path} on {dataset or 'mnist'} as a one-model run", highlight=False, markup=False)
    with keras_model_run(path, dataset=dataset or "mnist", data_dir=data, out_dir=out_dir) as run_dir:
        yield run_dir


def _show_report(run_dir: Path, image_format: str):
    from cnnlab.api import report as write_report

    summary = write_report(run_dir, image_format=image_format)
    _print_summary(summary)
    return summary


def _print_summary(summary) -> None:
    """The comparison table, the best arm (and each model's best setting), the verdicts, where the report is."""
    from rich.markup import escape

    from cnnlab.tables import rich_table, statistics_note

    run_dir = summary.folder.path
    console.print(rich_table(summary.rows, title=escape(f"Comparison ({run_dir.name})")))
    console.print(statistics_note(summary.rows, summary.comparisons), highlight=False, markup=False)
    if summary.analysis.choice is not None:
        console.print(summary.analysis.choice.sentence(), highlight=False, markup=False)
    for model in summary.analysis.settings:
        console.print(model.sentence(), highlight=False, markup=False)
    for comparison in summary.comparisons:
        console.print("- " + comparison.sentence(), highlight=False, markup=False)
    console.print(f"Results written to {run_dir}/", highlight=False, markup=False)
    console.print(f"Report: {summary.report}", highlight=False, markup=False)


@app.command()
def train(
    model: Annotated[
        str, typer.Argument(help="A built-in model name or a spec file (.toml, .json, Keras JSON, .keras, .h5).")
    ],
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    optimizer: OptimizerOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    nesterov: NesterovOpt = None,
    rho: RhoOpt = None,
    weight_decay: WeightDecayOpt = None,
    schedule: ScheduleOpt = None,
    early_stopping: EarlyStoppingOpt = None,
    best_checkpoint: BestCheckpointOpt = None,
    augment: AugmentOpt = None,
    keras_numerics: KerasNumericsOpt = None,
    init_from: InitFromOpt = None,
    recipe_file: RecipeFileOpt = None,
    seed: SeedOpt = 0,
    seeds: SeedsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile_: CompileOpt = "auto",
    limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None,
    val_split: ValSplitOpt = 0.0,
    split_seed: SplitSeedOpt = 0,
    runs_dir: RunsDirOpt = Path("runs"),
    image_format: FormatOpt = "png",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    cpus_per_unit: CpusPerUnitOpt = None,
    gpus_per_unit: GpusPerUnitOpt = None,
    units_at_once: UnitsAtOnceOpt = None,
    mlflow: MlflowOpt = False,
    yes: YesOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train one model with the notebook's recipe (Adam, batch 128, 12 epochs) and save a run folder.

    Example: cnnlab train convnet7 --epochs 2 --data-dir ../shared/data
    """
    options = dict(locals())  # every option, by name, for the shared body
    _train(models=[model], name=Path(model).stem, options=options)


@app.command()
def compare(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Built-in model names or spec files; default: the notebook's convnet3 convnet5 convnet7."),
    ] = None,
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    optimizer: OptimizerOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    nesterov: NesterovOpt = None,
    rho: RhoOpt = None,
    weight_decay: WeightDecayOpt = None,
    schedule: ScheduleOpt = None,
    early_stopping: EarlyStoppingOpt = None,
    best_checkpoint: BestCheckpointOpt = None,
    augment: AugmentOpt = None,
    keras_numerics: KerasNumericsOpt = None,
    init_from: InitFromOpt = None,
    recipe_file: RecipeFileOpt = None,
    seed: SeedOpt = 0,
    seeds: SeedsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile_: CompileOpt = "auto",
    limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None,
    val_split: ValSplitOpt = 0.0,
    split_seed: SplitSeedOpt = 0,
    runs_dir: RunsDirOpt = Path("runs"),
    image_format: FormatOpt = "png",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    cpus_per_unit: CpusPerUnitOpt = None,
    gpus_per_unit: GpusPerUnitOpt = None,
    units_at_once: UnitsAtOnceOpt = None,
    mlflow: MlflowOpt = False,
    yes: YesOpt = False,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Finish an interrupted run folder (its own settings are used).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Train several models and compare them: table (terminal, Markdown, CSV, JSON), plots, report, run folder.

    Example: cnnlab compare --epochs 1 --data-dir ../shared/data
    """
    options = dict(locals())  # every option, by name, for the shared body
    if resume is not None:
        _resume(resume, data_dir, image_format, _execution(options))
        return
    _train(models=models or DEFAULT_MODELS, name="compare", options=options)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="A sweep file (TOML): models, a grid of settings, seeds, data.")],
    data_dir: DataDirOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    image_format: FormatOpt = "png",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    cpus_per_unit: CpusPerUnitOpt = None,
    gpus_per_unit: GpusPerUnitOpt = None,
    mlflow: MlflowOpt = False,
    yes: YesOpt = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Finish an interrupted sweep's run folder.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Run a sweep: every model x every combination of the grid's settings x every seed, into one
    run folder, one unit at a time or in parallel on Ray; the report picks each model's best setting.
    Its recipe and grid tables take every recipe key, e.g. keras_numerics = 2 (Keras 2.2.4's numerics).

    Example: cnnlab sweep sweep.toml --backend ray --cpus-per-unit 1 --mlflow
    """
    from cnnlab.api import check_image_format, plan_sweep, prepare

    options = dict(locals())
    if resume is not None:
        _resume(resume, data_dir, image_format, _execution(options))
        return
    check_image_format(image_format)
    plan = plan_sweep(sweep_file, data_dir=data_dir, threads=cpus_per_unit)
    _check_plan(plan, options)
    prepared = prepare(plan, runs_dir=runs_dir, name=sweep_file.stem, progress=console.is_terminal)
    _execute_and_show(prepared, image_format, _execution(options))


# ---------------------------------------------------------------------------------------------
# Run folders


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help=RUN_OR_KERAS)],
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="Evaluate on another dataset (a Keras file: default mnist).")
    ] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Reload a run's saved weights, or a Keras model file's, and report test loss and accuracy.

    Example: cnnlab evaluate runs/20261126-101500-compare
    Example: cnnlab evaluate model.keras --dataset fashion-mnist
    """
    from rich.table import Table
    from rich.text import Text

    from cnnlab.api import evaluate as evaluate_run

    if _is_keras_model(run_dir):
        with _as_run(run_dir, dataset or "mnist", data_dir) as folder:
            name, images, rows = evaluate_run(folder, device=device)
    else:
        name, images, rows = evaluate_run(run_dir, dataset=dataset, data_dir=data_dir, device=device)
    table = Table(title=f"Evaluation on {name} test ({images:,} images)")
    for column in ("Model", "Seed", "Test loss", "Test acc"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(Text(row.arm), str(row.seed), f"{row.loss:.4f}", f"{row.accuracy:.4f}")
    console.print(table)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="A run folder made by train, compare or sweep; or several to combine with -o; or a Keras model "
            "file (.keras, .h5) with -o."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Combine the run folders (or test the Keras file) into a new run folder here."
        ),
    ] = None,
    dataset: KerasDatasetOpt = None,
    data_dir: DataDirOpt = None,
    image_format: FormatOpt = "png",
    debug: DebugOpt = False,
) -> None:
    """(Re)write a run folder's table, plots, report.html and report.md from its saved results; with -o,
    combine several run folders tested on the same images into one new run folder and report it, or
    test a Keras model file's weights and report them as a one-model run.

    Example: cnnlab report runs/20261126-101500-compare
    Example: cnnlab report runs/A runs/B -o runs/A-and-B
    Example: cnnlab report model.keras -o runs/model-keras
    """
    from cnnlab.api import check_image_format, combine
    from cnnlab.errors import ConfigError

    check_image_format(image_format)
    if len(run_dirs) == 1 and _is_keras_model(run_dirs[0]):
        if output is None:
            raise ConfigError(
                f"{run_dirs[0]} is a Keras model file: give a new folder for its run with -o, "
                f"e.g. cnnlab report {run_dirs[0]} -o runs/{run_dirs[0].stem}"
            )
        with _as_run(run_dirs[0], dataset or "mnist", data_dir, out_dir=output) as folder:
            _show_report(folder, image_format)
        return
    if dataset is not None:
        raise ConfigError("--dataset applies to a Keras model file; a run folder records its own")
    if output is None:
        if len(run_dirs) > 1:
            raise ConfigError(
                f"{len(run_dirs)} run folders given: combine them into a new folder with -o DIR, "
                "e.g. cnnlab report RUN_A RUN_B -o runs/combined"
            )
        _show_report(run_dirs[0], image_format)
        return
    _print_summary(combine(run_dirs, output, image_format=image_format))


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help=RUN_OR_KERAS)],
    images: Annotated[list[Path], typer.Argument(help="PNG, JPEG, BMP, TIFF, .npy or IDX files, or folders of them.")],
    arm: Annotated[
        str | None,
        typer.Option("--arm", help="The arm to predict with; default: the one chosen on validation (else on test)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="The arm's seed; default: its first finished one.")] = None,
    all_arms: Annotated[bool, typer.Option("--all", help="Predict with every arm, side by side.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
    no_preprocess: Annotated[
        bool,
        typer.Option("--no-preprocess", help="Take the pixels as they are (28x28 grayscale, light ink on black)."),
    ] = False,
    dataset: KerasDatasetOpt = None,
    data_dir: DataDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Predict the classes of images with a run's trained model: top-k classes with probabilities.

    Images that are not 28x28 grayscale are made like the dataset's own (MNIST, KMNIST: inverted if
    dark on light, cropped, fit to 20x20, centred by centre of mass; Fashion-MNIST: Zalando's steps).

    Example: cnnlab predict runs/20261126-101500-compare digit.png scans/
    Example: cnnlab predict model.keras digit.png
    """
    import json

    from rich.table import Table
    from rich.text import Text

    from cnnlab.predict import predict_files

    with _as_run(run_dir, dataset, data_dir) as folder:
        result = predict_files(
            folder, images, arm=arm, seed=seed, all_arms=all_arms, top_k=top_k, preprocess=not no_preprocess
        )
    if as_json:
        sys.stdout.write(json.dumps([p.to_dict() for p in result.predictions], indent=2) + "\n")
        return
    console.print(result.explanation, highlight=False, markup=False, soft_wrap=True)
    table = Table(title=Text(f"Predictions ({result.dataset})"))
    table.add_column("Image", overflow="fold")
    table.add_column("Arm", overflow="fold")
    for rank in range(1, min(top_k, len(result.predictions[0].top)) + 1):
        table.add_column(f"#{rank}", justify="right")
    for p in result.predictions:
        arm_label = f"{p.arm} (seed {p.seed})" if all_arms else p.arm
        table.add_row(Text(p.image), Text(arm_label), *(Text(f"{c.name} {c.probability:.1%}") for c in p.top))
    console.print(table)


@app.command()
def runs(
    runs_dir: Annotated[Path, typer.Argument(help="The folder that holds run folders.")] = Path("runs"),
    debug: DebugOpt = False,
) -> None:
    """List the run folders in RUNS_DIR: when each started, dataset, arms, units finished, best test accuracy.

    Example: cnnlab runs runs
    """
    from rich.table import Table
    from rich.text import Text

    from cnnlab.analysis import list_runs

    listings = list_runs(runs_dir)
    if not listings:
        console.print(f"No run folders in {runs_dir}", highlight=False, markup=False)
        return
    table = Table(title=Text(f"Runs in {runs_dir}"))
    for column, justify in (
        ("Run", "left"),
        ("Started", "left"),
        ("Dataset", "left"),
        ("Arms", "right"),
        ("Units", "right"),
        ("Best test acc", "right"),
        ("Best arm", "left"),
        ("State", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # fmt: skip
    for r in listings:
        if r.total is None:  # not a run folder, or damaged
            state = r.state if r.problem is None else f"{r.state}: {r.problem}"
            table.add_row(Text(r.name), "", "", "", "", "", "", Text(state))
            continue
        started = r.started.replace("T", " ") if r.started else "–"
        best = "–" if r.best_test_accuracy is None else f"{r.best_test_accuracy:.4f}"
        arm = r.best_arm or "–"
        if r.chosen_on == "validation":
            arm += " (chosen on validation)"
        elif r.chosen_on == "test":
            arm += " (chosen on the test set)"
        state = f"failed ({r.failed} unit{'s' if r.failed > 1 else ''})" if r.state == "failed" else r.state
        table.add_row(Text(r.name), started, Text(r.dataset or "?"), str(r.arms), f"{r.finished}/{r.total}", best,
                      Text(arm), state)  # fmt: skip
    console.print(table)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help=RUN_OR_KERAS)],
    to: Annotated[str, typer.Option("--to", help="onnx (ONNX Runtime), pt2 (torch.export) or keras (Keras 3).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The file to write; default: RUN_DIR/export/<arm>-seed<N>.<onnx|pt2|keras> (a Keras file: beside it).",
        ),
    ] = None,
    arm: Annotated[
        str | None, typer.Option("--arm", help="The arm to export; default: the run's best arm, else its only one.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="The arm's seed; default: its first finished one.")] = None,
    # Not $CNNLAB_DATA_DIR: the verification uses the run's own recorded test images unless told otherwise.
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where the run's dataset is now, if it moved.")
    ] = None,
    dataset: KerasDatasetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Export a trained model, verified on the run's test images before it is written: ONNX and pt2 take
    uint8 pixels [N, 28, 28] and return probabilities [N, classes]; keras writes a Keras 3 .keras file
    (float inputs x/255, NHWC, softmax output) that keras.saving.load_model reads.

    Example: cnnlab export runs/20261126-101500-compare --to onnx
    Example: cnnlab export runs/20261126-101500-compare --to keras
    Example: cnnlab export legacy_model.h5 --to keras
    """
    from cnnlab.export import export_run

    if output is None and _is_keras_model(run_dir):  # beside the Keras file, never over it
        output = run_dir.with_suffix(f".{to}")
        output = output.with_name(f"{run_dir.stem}-export.{to}") if output == run_dir else output
    with _as_run(run_dir, dataset, data_dir) as folder:
        result = export_run(folder, to, output, arm=arm, seed=seed, data_dir=data_dir)
    v = result.verification
    console.print(
        f"Exported {result.arm} seed {result.seed} to {result.path}\n"
        f"Why this model: {result.reason}\n"
        f"Verified on {v.images:,} test images of {result.metadata['dataset']}: max probability difference "
        f"{v.max_abs_difference:.2e} (limit {v.atol:.0e}), same class on {v.agreement:.2%} "
        f"({v.agreeing:,} of {v.images:,}; at least {v.min_agreement:.1%} needed); "
        f"accuracy {v.exported_accuracy:.4f} exported, {v.reference_accuracy:.4f} PyTorch\n"
        f"Exporter: {result.exporter}\n"
        f"Figures: {result.verification_path}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help=RUN_OR_KERAS)],
    host: Annotated[
        str, typer.Option("--host", help="The address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The port to listen on (0: a free one).")] = 8000,
    dataset: KerasDatasetOpt = None,
    data_dir: DataDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Serve a local web page to draw or upload an image and see each arm's top 3 classes, with the
    28x28 image the models saw, and a JSON API (POST /api/predict) for scripts. Needs the serve extra.

    Example: cnnlab serve runs/20261126-101500-compare   (then open http://127.0.0.1:8000/)
    """
    from cnnlab.serve import serve as serve_run

    def announce(url: str) -> None:
        console.print(f"Serving {run_dir} at {url} (Ctrl+C to stop)", highlight=False, markup=False, soft_wrap=True)

    # Ctrl+C is how a server stops: Uvicorn shuts down cleanly, then re-raises the signal, which
    # reaches here as KeyboardInterrupt or, rarely (seen once in CI), not at all; stopped either way.
    with contextlib.suppress(KeyboardInterrupt), _as_run(run_dir, dataset, data_dir) as folder:
        serve_run(folder, host, port, log_level="info" if debug else "warning", announce=announce)
    console.print("Stopped.")


# ---------------------------------------------------------------------------------------------
# Models and datasets


@app.command()
def models(
    show: Annotated[str | None, typer.Option("--show", help="Print a built-in model's spec (TOML).")] = None,
    debug: DebugOpt = False,
) -> None:
    """List the built-in models, or print one's spec to copy and edit.

    Example: cnnlab models --show convnet7 > my_model.toml
    """
    from cnnlab.catalog import builtin_models, builtin_spec_text, load_spec
    from cnnlab.models import summarize

    if show is not None:
        sys.stdout.write(builtin_spec_text(show))
        return
    from rich.table import Table

    table = Table(title="Built-in models")
    for column in ("Name", "Params", "Description"):
        table.add_column(column)
    from rich.text import Text

    for name in builtin_models():
        spec = load_spec(name)
        table.add_row(name, f"{summarize(spec).total_params:,}", Text(spec.description))
    console.print(table)


@app.command()
def summary(
    model: Annotated[
        str, typer.Argument(help="A built-in model name or a spec file (.toml, .json, Keras JSON, .keras, .h5).")
    ],
    debug: DebugOpt = False,
) -> None:
    """Print a Keras-style summary: layers, output shapes, parameters and FLOPs.

    Example: cnnlab summary convnet5
    """
    from cnnlab.catalog import load_spec
    from cnnlab.models import summarize

    console.print(summarize(load_spec(model)).to_text(), highlight=False, markup=False)


@app.command()
def convert(
    source: Annotated[
        str, typer.Argument(help="A Keras model.to_json() file, a cnnlab spec or a built-in model name.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the TOML spec here (default: stdout).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Write the cnnlab TOML spec of a Keras JSON model (or of any spec), ready to edit.

    Example: cnnlab convert model.json -o model.toml
    """
    from cnnlab.catalog import load_spec
    from cnnlab.files import write_text
    from cnnlab.spec import spec_to_toml

    text = spec_to_toml(load_spec(source))
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
        err_console.print(f"Wrote {output}", highlight=False, markup=False)


@app.command()
def datasets(data_dir: DataDirOpt = None, debug: DebugOpt = False) -> None:
    """List the known datasets, their sizes and classes, and whether they are available here."""
    from rich.table import Table

    from cnnlab.datasets import DATASETS, dataset_status, default_cache_dir

    table = Table(title=f"Datasets (cache: {default_cache_dir()})")
    for column in ("Name", "Train", "Test", "Classes", "Status", "Licence"):
        table.add_column(column)
    for name, info in DATASETS.items():
        table.add_row(
            name,
            f"{info.train_size:,}",
            f"{info.test_size:,}",
            ", ".join(info.classes),
            dataset_status(name, data_dir, default_cache_dir()),
            info.licence,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit; --debug shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CNNLAB_DEBUG") == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, category, *rest: err_console.print(
            f"warning: {message}", highlight=False, markup=False, soft_wrap=True
        )
        try:
            app(args=args, prog_name="cnnlab")  # standalone: usage errors print and exit 2
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except CnnlabError as exc:
            if debug:
                traceback.print_exc()
            err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
            return exc.exit_code
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
