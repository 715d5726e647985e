"""The `cnnlab` command line: parse, call the library, render. Nothing imports this module."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cnnlab.errors import CnnlabError, ConfigError

app = typer.Typer(
    name="cnnlab", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Train, evaluate and compare convolutional networks on MNIST, Fashion-MNIST and KMNIST.\n\n"
         "Example: cnnlab compare --epochs 1   (the seed notebook's three models, side by side)",
)
# Piped output (CI logs) gets wide lines instead of Rich's 80-column default, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Options shared by `train` and `compare`.
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="mnist, fashion-mnist or kmnist.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="CNNLAB_DATA_DIR", show_envvar=True,
    help="Folder with one sub-folder per dataset (mnist/, fashion-mnist/, kmnist/) of IDX files; no download.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", min=1, help="Training epochs.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Training batch size.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Adam learning rate.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of weights, shuffling and dropout (first seed with --seeds).")]
SeedsOpt = Annotated[Optional[str], typer.Option(
    "--seeds", help="Train each model with several seeds: a count N (seeds S..S+N-1, S = --seed) or a list 0,1,2.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16.")]
CompileOpt = Annotated[str, typer.Option(
    "--compile", help="auto (on CUDA: torch.compile and the training step as one CUDA graph; off on the CPU), on or off.")]
LimitTrainOpt = Annotated[Optional[int], typer.Option("--limit-train", min=1, help="Use only the first N training images.")]
LimitTestOpt = Annotated[Optional[int], typer.Option("--limit-test", min=1, help="Use only the first N test images.")]
ValSplitOpt = Annotated[float, typer.Option(
    "--val-split", min=0.0, max=0.99, help="Validate on this fraction of the training split instead of the test split.")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run folders are created.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Plot format: png or svg.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]


def _cache_dir() -> Path:
    from cnnlab.datasets import default_cache_dir

    return default_cache_dir()


def _parse_seeds(seed: int, seeds: str | None) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        if "," in seeds:
            values = [int(s) for s in seeds.split(",") if s.strip()]
        else:
            values = list(range(seed, seed + int(seeds)))
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: give a count like 3 or a list like 0,1,2") from None
    if not values or len(set(values)) != len(values) or any(v < 0 for v in values):
        raise ConfigError(f"--seeds {seeds!r}: give a positive count or a list of distinct non-negative seeds")
    return values


def _load_data(name: str, data_dir: Path | None):
    from cnnlab.datasets import load_dataset

    return load_dataset(name, data_dir=data_dir, cache_dir=_cache_dir(), progress=console.is_terminal)


def _run(models: list[str], name: str, dataset: str, data_dir: Path | None, epochs: int, batch_size: int,
         lr: float, seed: int, seeds: str | None, device: str, precision: str, compile_: str,
         limit_train: int | None, limit_test: int | None, val_split: float, runs_dir: Path,
         image_format: str, resume: Path | None) -> None:
    """Shared body of `train` and `compare`: run the experiment into a run folder and show the results."""
    from cnnlab.engine import TrainConfig, resolve_hardware
    from cnnlab.experiment import Experiment, check_fits, load_experiment, run_experiment, start_run
    from cnnlab.models import resolve_model
    from cnnlab.progress import make_reporter
    from cnnlab.runs import new_run_dir

    if image_format not in ("png", "svg"):
        raise ConfigError(f"--format must be png or svg, got '{image_format}'")
    if resume is not None:
        experiment, data_dir_used = load_experiment(resume)
        run_dir, data_dir = resume, data_dir or data_dir_used
        console.print(f"Resuming {run_dir}")
    else:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=lr, device=device,
                             precision=precision, compile=compile_, limit_train=limit_train,
                             limit_test=limit_test, val_split=val_split)
        config.validate()
        experiment = Experiment([resolve_model(m) for m in models], dataset, _parse_seeds(seed, seeds), config)
        resolve_hardware(config)  # fail on --device cuda without CUDA before creating anything
        data = _load_data(dataset, data_dir)
        check_fits(experiment, data)  # before anything is written
        run_dir = new_run_dir(runs_dir, name)
        start_run(run_dir, experiment, data_dir)
    if resume is not None:
        data = _load_data(experiment.dataset, data_dir)
    hardware = resolve_hardware(experiment.train)
    console.print(f"Run folder: {run_dir}\nDevice: {hardware.device_name} ({hardware.device}), "
                  f"precision {hardware.precision}, compile {'on' if hardware.compiled else 'off'}, "
                  f"{hardware.threads} threads; {_used(len(data.train_images), experiment.train.limit_train):,} "
                  f"training / {_used(len(data.test_images), experiment.train.limit_test):,} test images of "
                  f"{experiment.dataset}", highlight=False)
    multi_seed = len(experiment.seeds) > 1
    try:
        run_experiment(run_dir, experiment, data,
                       lambda model, s: make_reporter(f"{model} seed {s}" if multi_seed else model, console))
    except KeyboardInterrupt:
        err_console.print(f"Interrupted. The partial run is in {run_dir}; finish it with "
                          f"`cnnlab compare --resume {run_dir}`.", soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    _show_results(run_dir, image_format)


def _used(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _show_results(run_dir: Path, image_format: str) -> None:
    from cnnlab.report import finish_run
    from cnnlab.tables import rich_table

    summary = finish_run(run_dir, image_format)
    console.print(rich_table(summary.rows, title=f"Comparison ({run_dir.name})"))
    for comparison in summary.comparisons:
        console.print("- " + comparison.sentence(), highlight=False)
    console.print(f"Results written to {run_dir}/", highlight=False)
    if summary.report is not None:
        console.print(f"Report: {summary.report}", highlight=False)


@app.command()
def models(show: Annotated[Optional[str], typer.Option("--show", help="Print a built-in model's spec (TOML).")] = None,
           debug: DebugOpt = False) -> None:
    """List the built-in models, or print one's spec to copy and edit.

    Example: cnnlab models --show convnet7 > my_model.toml
    """
    from cnnlab.models import builtin_models, builtin_spec_text, resolve_model, summarize

    if show is not None:
        sys.stdout.write(builtin_spec_text(show))
        return
    from rich.table import Table

    table = Table(title="Built-in models")
    for column in ("Name", "Params", "Description"):
        table.add_column(column)
    for name in builtin_models():
        spec = resolve_model(name)
        table.add_row(name, f"{summarize(spec).total_params:,}", spec.description)
    console.print(table)


@app.command()
def summary(model: Annotated[str, typer.Argument(help="A built-in model name or a spec file (.toml, .json, Keras JSON).")],
            debug: DebugOpt = False) -> None:
    """Print a Keras-style summary: layers, output shapes, parameters and FLOPs.

    Example: cnnlab summary convnet5
    """
    from cnnlab.models import resolve_model, summarize

    console.print(summarize(resolve_model(model)).to_text(), highlight=False, markup=False)


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A Keras model.to_json() file, a cnnlab spec or a built-in model name.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the TOML spec here (default: stdout).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Write the cnnlab TOML spec of a Keras JSON model (or of any spec), ready to edit.

    Example: cnnlab convert model.json -o model.toml
    """
    from cnnlab.models import resolve_model
    from cnnlab.runs import write_text
    from cnnlab.spec import spec_to_toml

    text = spec_to_toml(resolve_model(source))
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
        err_console.print(f"Wrote {output}", highlight=False)


@app.command()
def datasets(data_dir: DataDirOpt = None, debug: DebugOpt = False) -> None:
    """List the known datasets, their sizes and classes, and whether they are available here."""
    from rich.table import Table

    from cnnlab.datasets import DATASETS, dataset_status

    table = Table(title=f"Datasets (cache: {_cache_dir()})")
    for column in ("Name", "Train", "Test", "Classes", "Status", "Licence"):
        table.add_column(column)
    for name, info in DATASETS.items():
        table.add_row(name, f"{info.train_size:,}", f"{info.test_size:,}", ", ".join(info.classes),
                      dataset_status(name, data_dir, _cache_dir()), info.licence)
    console.print(table)


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="A built-in model name or a spec file (.toml, .json, Keras JSON).")],
    dataset: DatasetOpt = "mnist", data_dir: DataDirOpt = None, epochs: EpochsOpt = 12, batch_size: BatchOpt = 128,
    lr: LrOpt = 1e-3, seed: SeedOpt = 0, seeds: SeedsOpt = None, device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto", compile_: CompileOpt = "auto", limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None, val_split: ValSplitOpt = 0.0, runs_dir: RunsDirOpt = Path("runs"),
    image_format: FormatOpt = "png", debug: DebugOpt = False,
) -> None:
    """Train one model with the seed's recipe (Adam, batch 128, 12 epochs) and save a run folder.

    Example: cnnlab train convnet7 --epochs 2 --data-dir ../shared/data
    """
    _run([model], Path(model).stem, dataset, data_dir, epochs, batch_size, lr, seed, seeds, device, precision,
         compile_, limit_train, limit_test, val_split, runs_dir, image_format, None)


@app.command()
def compare(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Built-in model names or spec files; default: the seed's convnet3 convnet5 convnet7.")] = None,
    dataset: DatasetOpt = "mnist", data_dir: DataDirOpt = None, epochs: EpochsOpt = 12, batch_size: BatchOpt = 128,
    lr: LrOpt = 1e-3, seed: SeedOpt = 0, seeds: SeedsOpt = None, device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto", compile_: CompileOpt = "auto", limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None, val_split: ValSplitOpt = 0.0, runs_dir: RunsDirOpt = Path("runs"),
    image_format: FormatOpt = "png",
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Finish an interrupted run folder (its own settings are used).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Train several models and compare them: table (terminal, Markdown, CSV, JSON), plots, run folder.

    Example: cnnlab compare --epochs 1 --data-dir ../shared/data
    """
    names = models or ["convnet3", "convnet5", "convnet7"]
    _run(names, "compare", dataset, data_dir, epochs, batch_size, lr, seed, seeds, device, precision, compile_,
         limit_train, limit_test, val_split, runs_dir, image_format, resume)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder made by train or compare.")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Evaluate on another dataset.")] = None,
    data_dir: DataDirOpt = None, device: DeviceOpt = "auto", debug: DebugOpt = False,
) -> None:
    """Reload a run's saved weights and report test loss and accuracy.

    Example: cnnlab evaluate runs/20261126-101500-compare
    """
    import torch
    from rich.table import Table

    from cnnlab.engine import Hardware, evaluate as evaluate_model, resolve_device
    from cnnlab.experiment import load_experiment
    from cnnlab.models import build_model
    from cnnlab.runs import load_units, unit_dir

    experiment, stored_data_dir = load_experiment(run_dir)
    name = dataset or experiment.dataset
    data = _load_data(name, data_dir or stored_data_dir)
    target = resolve_device(device)
    hardware = Hardware(str(target), "", "fp32", False, False, torch.get_num_threads())
    specs = {s.name: s for s in experiment.specs}
    table = Table(title=f"Evaluation on {name} test ({len(data.test_images):,} images)")
    for column in ("Model", "Seed", "Test loss", "Test acc"):
        table.add_column(column, justify="right")
    for unit in load_units(run_dir):
        model = build_model(specs[unit.model]).to(target)
        weights = torch.load(unit_dir(run_dir, unit.model, unit.seed) / "weights.pt", map_location=target,
                             weights_only=True)
        model.load_state_dict(weights)
        result = evaluate_model(model, data.test_images.to(target), data.test_labels.to(target), hardware)
        table.add_row(unit.model, str(unit.seed), f"{result.loss:.4f}", f"{result.accuracy:.4f}")
    console.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder made by train or compare.")],
    image_format: FormatOpt = "png", debug: DebugOpt = False,
) -> None:
    """(Re)write a run folder's table, plots, report.html and report.md from its saved results.

    Example: cnnlab report runs/20261126-101500-compare
    """
    _show_results(run_dir, image_format)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit; --debug shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CNNLAB_DEBUG") == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, category, *rest: err_console.print(
            f"warning: {message}", highlight=False, markup=False, soft_wrap=True)
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
