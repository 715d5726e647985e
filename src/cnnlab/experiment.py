"""A comparison: several models, each trained with one or more seeds, on one dataset, into one run folder.

`train` is a comparison of one model. The run folder records the resolved configuration first,
so `--resume RUN_DIR` can rebuild the same experiment: finished model/seed pairs are kept, an
unfinished one continues from its last completed epoch, and the rest run as they would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cnnlab.datasets import Dataset
from cnnlab.engine import Reporter, TrainConfig, make_splits, resolve_device, train
from cnnlab.errors import ConfigError, RunError
from cnnlab.models import summarize
from cnnlab.runs import (
    UnitResult, environment, load_units, read_config, read_spec, remove_partial_files, save_torch, save_unit, unit_dir, write_config, write_json,
    write_text,
)
from cnnlab.spec import ModelSpec, spec_to_toml


@dataclass
class Experiment:
    """What to run: models x seeds on a dataset with one training config."""

    specs: list[ModelSpec]
    dataset: str
    seeds: list[int]
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_config(self) -> dict[str, Any]:
        """The resolved configuration written to config.toml."""
        return {
            "dataset": self.dataset, "models": [s.name for s in self.specs], "seeds": self.seeds,
            "train": asdict(self.train),
        }


def check_unique_names(specs: list[ModelSpec]) -> None:
    """Two models with one name would share a folder in the run."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise RunError(f"two models are named '{spec.name}' ({seen[spec.name]} and {spec.source}); "
                           "give one a different `name` in its spec")
        seen[spec.name] = spec.source


def start_run(run_dir: Path, experiment: Experiment, data_dir: Path | None) -> None:
    """Write config.toml, environment.json and each model's spec before any training."""
    check_unique_names(experiment.specs)
    config = experiment.to_config()
    config["data_dir"] = str(data_dir) if data_dir else None
    write_config(run_dir, config)
    write_json(run_dir / "environment.json", environment())
    for spec in experiment.specs:
        write_text(run_dir / spec.name / "spec.toml", spec_to_toml(spec))


def load_experiment(run_dir: Path) -> tuple[Experiment, Path | None]:
    """Rebuild the experiment of an existing run folder (for --resume and `report`)."""
    config = read_config(run_dir)
    specs = [read_spec(run_dir / name / "spec.toml") for name in config.get("models", [])]
    train_config = TrainConfig(**config.get("train", {}))
    data_dir = Path(config["data_dir"]) if config.get("data_dir") else None
    return Experiment(specs, config["dataset"], list(config["seeds"]), train_config), data_dir


def check_fits(experiment: Experiment, dataset: Dataset) -> None:
    """Every model takes the dataset's images and has an output per class (else a ConfigError)."""
    image_shape = tuple(dataset.train_images.shape[1:]) + ((1,) if dataset.train_images.dim() == 3 else ())
    for spec in experiment.specs:
        if tuple(spec.input_shape) != image_shape:
            raise ConfigError(f"{spec.source}: model '{spec.name}' expects input_shape {list(spec.input_shape)} but "
                              f"{experiment.dataset} images are {list(image_shape)}; set input_shape = "
                              f"{list(image_shape)} in the spec")
        if spec.num_classes < len(dataset.classes):
            raise ConfigError(f"{spec.source}: model '{spec.name}' has {spec.num_classes} outputs but "
                              f"{experiment.dataset} has {len(dataset.classes)} classes; end the spec with "
                              f"Dense(units = {len(dataset.classes)})")


def run_experiment(run_dir: Path, experiment: Experiment, dataset: Dataset,
                   make_reporter: Callable[[str, int], Reporter] | None = None) -> list[UnitResult]:
    """Train every model with every seed not finished yet; return all finished results."""
    device = resolve_device(experiment.train.device)
    remove_partial_files(run_dir)
    done = {(u.model, u.seed) for u in load_units(run_dir)}
    check_fits(experiment, dataset)
    for spec in experiment.specs:
        summary = summarize(spec)
        for seed in experiment.seeds:
            if (spec.name, seed) in done:
                continue
            splits = make_splits(dataset.train_images, dataset.train_labels, dataset.test_images,
                                 dataset.test_labels, experiment.train, device, seed)
            reporter = make_reporter(spec.name, seed) if make_reporter else None
            folder = unit_dir(run_dir, spec.name, seed)
            result = train(spec, splits, experiment.train, seed=seed, reporter=reporter,
                           checkpoint_path=folder / "checkpoint.pt", save_checkpoint=save_torch)
            save_unit(run_dir, spec.name, seed, result, summary.total_params, summary.training_flops,
                      splits.test_labels, test_images=splits.test_images)
            del splits
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return load_units(run_dir)

