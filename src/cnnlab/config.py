"""The run plan: what a run trains, as typed frozen data, resolved once and written to the run folder.

Configuration is split by meaning:

- `Recipe`: how one arm trains (epochs, batch size, optimizer settings). Every key is defined
  once, as a field with its default (the notebook's recipe), its check and its command-line
  flag; unknown keys are refused.
- `DataSelection`: the data of the whole run (dataset, folder, limits, validation split), shared by
  every arm.
- `HardwareRequest`: what the user asked for (`auto`, a device, a precision, compilation);
  `Hardware` is what that resolved to on the machine that ran it (see `hardware.py`).

An `Arm` is one model spec with one recipe; a `Unit` is one arm trained with one seed; a `RunPlan`
holds the arms, the seeds, the data selection and the hardware. This module is pure data: it
imports neither torch nor the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import shlex
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnnlab.errors import ConfigError
from cnnlab.options import (
    OPTION_FLAGS,
    Augmentation,
    BestCheckpoint,
    EarlyStopping,
    ReduceLROnPlateau,
    Schedule,
    option_from_dict,
    option_to_dict,
    option_to_text,
)
from cnnlab.spec import ModelSpec

FORMAT_VERSION = 2  # config.toml's layout; 0.1's had none and is read as version 1
IMAGE_FORMATS = ("png", "svg")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unit_interval(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)


# Keras 3's optimizers and their default learning rates (keras.optimizers.SGD defaults to 0.01).
OPTIMIZERS = {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3, "adamw": 1e-3}
ADAMW_WEIGHT_DECAY = 0.004  # keras.optimizers.AdamW's default; the others default to none
# Recipe keys that hold an option of options.py, and its type.
OPTION_KEYS = {"schedule": Schedule, "early_stopping": EarlyStopping, "best_checkpoint": BestCheckpoint,
               "augmentation": Augmentation}  # fmt: skip


def _key(
    default: Any, check: Callable[[Any], bool], must: str, flag: str | None = None, label: str | None = None
) -> Any:
    """A recipe key: its default, its check and the words of its error, its CLI flag, its short label."""
    return field(default=default, metadata={"check": check, "must": must, "flag": flag, "label": label})


@dataclass(frozen=True)
class Recipe:
    """How one arm trains: the notebook's recipe by default (Adam, batch 128, 12 epochs)."""

    # 0 only with --init-from (api.plan_run checks): the imported weights, tested as they are.
    epochs: int = _key(12, _non_negative_int, "be an integer >= 0", "--epochs", "epochs")
    batch_size: int = _key(128, _positive_int, "be an integer >= 1", "--batch-size", "batch")
    optimizer: str = _key("adam", lambda v: v in OPTIMIZERS, "be adam, sgd, rmsprop or adamw", "--optimizer", "opt")
    # None takes the optimizer's Keras default (resolved when the recipe is made).
    learning_rate: float | None = _key(None, _positive, "be a positive number", "--lr", "lr")
    beta_1: float = _key(0.9, _unit_interval, "be in (0, 1)", label="beta_1")
    beta_2: float = _key(0.999, _unit_interval, "be in (0, 1)", label="beta_2")
    epsilon: float = _key(1e-7, _positive, "be a positive number", label="epsilon")  # Keras's (PyTorch: 1e-8)
    momentum: float = _key(0.0, _fraction, "be in [0, 1)", "--momentum", "momentum")  # sgd, rmsprop
    nesterov: bool = _key(False, lambda v: isinstance(v, bool), "be true or false", "--nesterov", "nesterov")
    rho: float = _key(0.9, _unit_interval, "be in (0, 1)", "--rho", "rho")  # rmsprop
    # Decoupled weight decay (Keras's `weight_decay`); None: 0.004 for adamw, none for the others.
    weight_decay: float | None = _key(None, _non_negative, "be a number >= 0", "--weight-decay", "wd")
    schedule: Schedule | None = _key(None, lambda v: True, "", "--schedule", "schedule")
    early_stopping: EarlyStopping | None = _key(None, lambda v: True, "", "--early-stopping", "early_stopping")
    best_checkpoint: BestCheckpoint | None = _key(None, lambda v: True, "", "--best-checkpoint", "best")
    augmentation: Augmentation | None = _key(None, lambda v: True, "", "--augment", "augment")
    eval_batch_size: int = _key(1000, _positive_int, "be an integer >= 1", label="eval_batch")
    # Whose numerics train: Keras 3's, or Keras 2.2.4's (the notebook's): batch normalisation's moving
    # variance, the clipped cross-entropy, RMSprop's epsilon, bias fans (engine, models, optim).
    keras_numerics: int = _key(
        3, lambda v: v in (2, 3) and isinstance(v, int) and not isinstance(v, bool),
        "be 2 (Keras 2.2.4, the notebook's) or 3 (Keras 3)", "--keras-numerics", "keras",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.learning_rate is None and self.optimizer in OPTIMIZERS:
            object.__setattr__(self, "learning_rate", OPTIMIZERS[self.optimizer])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", ADAMW_WEIGHT_DECAY if self.optimizer == "adamw" else 0.0)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in OPTION_KEYS:
                if value is not None and not isinstance(
                    value, typing.get_args(OPTION_KEYS[f.name]) or OPTION_KEYS[f.name]
                ):
                    raise ConfigError(f"{_where(f)} must be a {f.name.replace('_', ' ')} option, got {value!r}")
            elif not f.metadata["check"](value):
                raise ConfigError(f"{_where(f)} must {f.metadata['must']}, got {value!r}")
        if self.momentum and self.optimizer not in ("sgd", "rmsprop"):
            raise ConfigError(f"--momentum applies to sgd and rmsprop, not {self.optimizer}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError(f"--nesterov applies to sgd, not {self.optimizer}")
        if self.rho != 0.9 and self.optimizer != "rmsprop":
            raise ConfigError(f"--rho applies to rmsprop, not {self.optimizer}")
        missing = self._missing_in_keras2() if self.keras_numerics == 2 else []
        if missing:
            raise ConfigError(
                f"--keras-numerics 2 trains as Keras 2.2.4, which has no {', '.join(missing)}; "
                f"remove {'it' if len(missing) == 1 else 'them'} or use --keras-numerics 3"
            )

    def _missing_in_keras2(self) -> list[str]:
        """What this recipe uses that Keras 2.2.4 lacks, or means otherwise than the Keras 3 meaning
        cnnlab gives it (keras/optimizers.py, keras/callbacks.py of Keras 2.2.4)."""
        missing = []
        if self.optimizer == "adamw":
            missing.append("AdamW (--optimizer adamw)")
        elif self.weight_decay:
            missing.append("weight decay (--weight-decay)")
        if self.optimizer == "rmsprop" and self.momentum:
            missing.append("RMSprop momentum (--momentum)")
        stopping, best = self.early_stopping, self.best_checkpoint
        if stopping is not None and stopping.baseline is not None:  # Keras 2.2.4: the initial best
            missing.append("EarlyStopping baseline as Keras 3 means it (--early-stopping baseline=)")
        if stopping is not None and stopping.start_from_epoch:
            missing.append("EarlyStopping start_from_epoch (--early-stopping start_from_epoch=)")
        if best is not None and best.initial_value_threshold is not None:
            missing.append("ModelCheckpoint initial_value_threshold (--best-checkpoint initial_value_threshold=)")
        return missing

    @property
    def chooses_on(self) -> list[tuple[str, str]]:
        """(flag, monitor) of every option that chooses an epoch or a learning rate by a validation
        metric: with the test split as validation, each would be choosing on the test set."""
        chosen = [(OPTION_FLAGS["early_stopping"], self.early_stopping),
                  (OPTION_FLAGS["best_checkpoint"], self.best_checkpoint)]  # fmt: skip
        if isinstance(self.schedule, ReduceLROnPlateau):
            chosen.append(("--schedule plateau", self.schedule))
        return [
            (flag, option.monitor)
            for flag, option in chosen
            if option is not None and option.monitor.startswith("val_")
        ]

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value (the run folder records them all); options as tables, None left out."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            data[f.name] = option_to_dict(value) if f.name in OPTION_KEYS else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Recipe:
        """The recipe of a mapping; unknown keys are refused, missing keys take their default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown recipe key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
        values = {k: option_from_dict(v, k, source) if k in OPTION_KEYS else v for k, v in data.items()}
        return cls(**values)

    def differences(self, other: Recipe) -> list[tuple[str, Any]]:
        """(label, value) of every key where this recipe differs from `other`, in field order."""
        return [
            (f.metadata["label"] or f.name, _show(getattr(self, f.name)))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _show(value: Any) -> Any:
    """A recipe value as an arm's name shows it: options as their command-line text."""
    if dataclasses.is_dataclass(value):
        return option_to_text(value)
    return value


def _where(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or f"recipe key '{f.name}'"


@dataclass(frozen=True)
class DataSelection:
    """The data of a whole run: every arm and seed trains and is tested on the same images."""

    dataset: str = "mnist"
    data_dir: str | None = None  # a local folder of IDX files; None downloads into the cache
    limit_train: int | None = None  # the first N training images
    limit_test: int | None = None  # the first N test images
    val_split: float = 0.0  # > 0: validate on this fraction of the training split, not on the test split
    split_seed: int = 0  # draws the held-out images, once per run: the same for every arm and seed
    # "stratified": each class held out in proportion, drawn once per run from split_seed (0.2);
    # "per-seed": cnnlab 0.1's split, a random draw from each unit's seed (its run folders keep it).
    split: str = "stratified"
    # A folder dataset (dataset = "folder:PATH", PATH made absolute here; data_dir does not apply):
    # the fraction of each class's images held out as its test split (None: 0.2), and, recorded by the
    # first load (image_folders), its class names, number of files and their digest, which every later
    # load (resume, report, export) checks, so a changed folder is refused rather than tested on.
    test_fraction: float | None = None
    classes: tuple[str, ...] | None = None
    folder_files: int | None = None
    folder_digest: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str):
            raise ConfigError(f"the dataset must be a name or folder:PATH, got {self.dataset!r}")
        if self.dataset.startswith("folder:"):
            raw = self.dataset.removeprefix("folder:")
            if not raw.strip():
                raise ConfigError("--dataset folder:PATH needs the folder's path, e.g. folder:images/")
            from os.path import abspath, expanduser  # here: only DataSelection of this module needs it

            object.__setattr__(self, "dataset", "folder:" + abspath(expanduser(raw)))
        else:
            recorded = [
                k for k in ("test_fraction", "classes", "folder_files", "folder_digest") if getattr(self, k) is not None
            ]
            if recorded:
                raise ConfigError(f"{', '.join(recorded)} apply to folder:PATH datasets only, not {self.dataset!r}")
        if self.classes is not None:
            if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
                raise ConfigError(f"classes must be a list of class names, got {self.classes!r}")
            object.__setattr__(self, "classes", tuple(self.classes))
        fraction = self.test_fraction
        if fraction is not None and not (
            isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1
        ):
            raise ConfigError(f"test_fraction must be in (0, 1), e.g. 0.2, got {fraction!r}")
        if self.folder_files is not None and not _positive_int(self.folder_files):
            raise ConfigError(f"folder_files must be an integer >= 1, got {self.folder_files!r}")
        if self.folder_digest is not None and not isinstance(self.folder_digest, str):
            raise ConfigError(f"folder_digest must be a string, got {self.folder_digest!r}")
        if self.split not in ("stratified", "per-seed"):
            raise ConfigError(f"the validation split must be stratified or per-seed, got {self.split!r}")
        if not (isinstance(self.split_seed, int) and not isinstance(self.split_seed, bool) and self.split_seed >= 0):
            raise ConfigError(f"--split-seed must be an integer >= 0, got {self.split_seed!r}")
        for name, flag in (("limit_train", "--limit-train"), ("limit_test", "--limit-test")):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            raise ConfigError(f"--val-split must be in [0, 1), e.g. 0.1, got {self.val_split!r}")


@dataclass(frozen=True)
class HardwareRequest:
    """What the user asked for; `auto` is resolved once per run (hardware.resolve_hardware)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16
    compile: str = "auto"  # auto | on | off
    threads: int | None = None  # CPU threads per unit (--cpus-per-unit); None: PyTorch's default
    units_at_once: int | None = None  # units trained together on the device (--units-at-once); None: auto

    def __post_init__(self) -> None:
        if self.threads is not None and not _positive_int(self.threads):
            raise ConfigError(f"--cpus-per-unit must be an integer >= 1, got {self.threads!r}")
        if self.units_at_once is not None and not _positive_int(self.units_at_once):
            raise ConfigError(f"--units-at-once must be an integer >= 1, got {self.units_at_once!r}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"--device must be {DEVICES_HELP}, got '{self.device}'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got '{self.precision}'")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"--compile must be auto, on or off, got '{self.compile}'")


@dataclass(frozen=True)
class Hardware:
    """What a run's `HardwareRequest` resolved to, recorded in the run folder and reused on resume."""

    device: str
    device_name: str
    precision: str
    compiled: bool
    channels_last: bool
    threads: int
    cuda_graph: bool = False  # each full-batch training step captured as one CUDA graph
    units_at_once: int = 1  # the local backend trains this many units together, taking turns step by step
    # Convolutions with a few output pixels computed as one matrix product (models.MatmulConv2d); False
    # in runs recorded before it existed, so that they resume with the kernels they started with.
    small_convs_as_matmul: bool = False
    # CPU dropout masks from only the random bits their rate needs, in the activations' memory order
    # (models.FastDropout); False in runs recorded before it existed, which resume with their old masks.
    compact_dropout_masks: bool = False
    # With small_convs_as_matmul, also those small convolutions that pad their input themselves (where
    # the CPU has AMX); False in runs recorded before it existed.
    padded_small_convs_as_matmul: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hardware:
        """Read a recorded resolution; keys of older or newer versions that this one lacks are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Arm:
    """One model spec trained with one recipe: a row of the comparison table."""

    name: str  # shown in tables and the report, e.g. "convnet3" or "convnet3@lr=0.0003"
    folder: str  # its folder in the run folder, derived from the name (safe_folder_name)
    spec: ModelSpec
    recipe: Recipe


@dataclass(frozen=True)
class Unit:
    """One arm trained with one seed: the unit of work, with its own folder and status."""

    arm: Arm
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"


@dataclass(frozen=True)
class InitialWeights:
    """Weights every unit starts from instead of its seed's initialisation (`--init-from`): the Keras
    file as the user named it and its SHA-256, which the run folder checks before it copies them."""

    source: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"initial_weights.source must be a file's path, got {self.source!r}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError(f"initial_weights.sha256 must be 64 hexadecimal digits, got {self.sha256!r}")


@dataclass(frozen=True)
class RunPlan:
    """Everything a run trains, resolved: the arms, the seeds, the data and the hardware; and the
    weights every unit starts from, when not from its seed (`--init-from`)."""

    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    data: DataSelection
    hardware_request: HardwareRequest
    hardware: Hardware
    format_version: int = FORMAT_VERSION
    initial_weights: InitialWeights | None = None

    def units(self) -> list[Unit]:
        """Every unit, arm by arm, seed by seed (the order they train in)."""
        return [Unit(arm, seed) for arm in self.arms for seed in self.seeds]

    def arm(self, name: str) -> Arm:
        """The arm called `name`."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The plan as config.toml records it (specs are saved beside it, one per arm folder)."""
        return {
            "format_version": self.format_version,
            "seeds": list(self.seeds),
            "data": {k: v for k, v in dataclasses.asdict(self.data).items() if v is not None},
            "hardware_request": {k: v for k, v in dataclasses.asdict(self.hardware_request).items() if v is not None},
            "hardware": dataclasses.asdict(self.hardware),
            "arms": [
                {"name": a.name, "folder": a.folder, "model": a.spec.name, "recipe": a.recipe.to_dict()}
                for a in self.arms
            ],
        } | ({"initial_weights": dataclasses.asdict(self.initial_weights)} if self.initial_weights else {})


# ---------------------------------------------------------------------------------------------
# Seeds and arms


def check_no_choice_on_test(recipe: Recipe, data: DataSelection) -> None:
    """The rule against choosing on the test set: an option that picks an epoch or a learning rate by
    a validation metric needs validation data other than the test split."""
    if data.val_split > 0:
        return
    for flag, monitor in recipe.chooses_on:
        raise ConfigError(
            f"{flag} chooses by {monitor}, and without --val-split the validation data is the test split: that "
            "would be choosing on the test set; hold out part of the training images with --val-split 0.1"
        )


def parse_seeds(seed: int, seeds: str | None) -> tuple[int, ...]:
    """`--seed S` alone, or `--seeds N` (S..S+N-1) or `--seeds 0,1,2`: distinct non-negative seeds."""
    if seeds is None:
        values = [seed]
    else:
        try:
            values = (
                [int(s) for s in seeds.split(",") if s.strip()]
                if "," in seeds
                else list(range(seed, seed + int(seeds)))
            )
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: give a count like 3 or a list like 0,1,2") from None
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"--seeds {seeds!r}: give a positive count or a list of distinct non-negative seeds")
    if any(v < 0 for v in values):
        raise ConfigError(
            f"seeds must be non-negative, got {', '.join(str(v) for v in values if v < 0)}; "
            "use --seed 0 or --seeds 0,1,2"
        )
    return tuple(values)


_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED_SUFFIXES = (".toml", ".json", ".csv", ".md", ".html", ".png", ".svg", ".pt", ".tmp")
MAX_FOLDER_NAME = 64


def safe_folder_name(name: str) -> str:
    """A folder name derived from any name, never a path: letters, digits, '-', '_' and '.' only, at
    most 64 characters, never '.' or '..' or hidden, never a run-level file's name. When anything had
    to change, a short hash of the original is appended, so two different names never share a folder."""
    safe = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", "-", _SAFE.sub("-", name))).strip("-").lstrip(".")
    changed = safe != name or not safe or safe.lower().endswith(_RESERVED_SUFFIXES)
    if not changed and len(safe) <= MAX_FOLDER_NAME:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem = safe[: MAX_FOLDER_NAME - len(digest) - 1].rstrip("-.") or "arm"
    return f"{stem}-{digest}"


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def make_arms(specs: Sequence[ModelSpec], recipes: Sequence[Recipe]) -> tuple[Arm, ...]:
    """One arm per (model, recipe), model-major. With one recipe an arm is named after its model
    (0.1's layout); otherwise the name adds what differs from the first recipe, e.g. `convnet3@lr=0.0003`."""
    if not specs:
        raise ConfigError("no model to train; name at least one built-in model or spec file")
    if not recipes:
        raise ConfigError("no recipe to train with")
    if len(set(recipes)) != len(recipes):
        raise ConfigError("two recipes are the same; every setting combination must differ")
    arms: list[Arm] = []
    for spec in specs:
        for recipe in recipes:
            changes = recipe.differences(recipes[0])
            name = (
                spec.name
                if not changes
                else (spec.name + "@" + ",".join(f"{label}={_format_value(value)}" for label, value in changes))
            )
            arms.append(Arm(name, safe_folder_name(name), spec, recipe))
    seen: dict[str, Arm] = {}
    for arm in arms:
        twin = seen.get(arm.folder)
        if twin is not None:
            raise ConfigError(
                f"two models are named '{arm.spec.name}' ({twin.spec.source} and {arm.spec.source}); "
                "give one a different `name` in its spec"
            )
        seen[arm.folder] = arm
    return tuple(arms)


# ---------------------------------------------------------------------------------------------
# The command line that makes a plan again


ALWAYS_SHOWN = ("epochs", "batch_size", "learning_rate")


def reproduce_args(plan: RunPlan, model_args: Sequence[str]) -> list[str]:
    """The `cnnlab compare` arguments that make this plan again (`model_args`: how to name each model)."""
    recipe = plan.arms[0].recipe
    args = ["cnnlab", "compare", *model_args, "--dataset", plan.data.dataset]
    seeds = [str(s) for s in plan.seeds]
    args += ["--seed", seeds[0]] if len(seeds) == 1 else ["--seeds", ",".join(seeds)]
    defaults = Recipe(optimizer=recipe.optimizer)  # the optimizer's own defaults need no flag
    for f in dataclasses.fields(Recipe):
        flag, value = f.metadata["flag"], getattr(recipe, f.name)
        default = getattr(Recipe() if f.name == "optimizer" else defaults, f.name)
        if not flag or (f.name not in ALWAYS_SHOWN and value == default):
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, option_to_text(value) if dataclasses.is_dataclass(value) else _format_value(value)]
    request = plan.hardware_request
    args += ["--device", request.device, "--precision", request.precision, "--compile", request.compile]
    if plan.data.limit_train is not None:
        args += ["--limit-train", str(plan.data.limit_train)]
    if plan.data.limit_test is not None:
        args += ["--limit-test", str(plan.data.limit_test)]
    if plan.data.val_split:
        args += ["--val-split", repr(plan.data.val_split), "--split-seed", str(plan.data.split_seed)]
    if plan.data.data_dir:
        args += ["--data-dir", plan.data.data_dir]
    if plan.initial_weights is not None:
        args += ["--init-from", plan.initial_weights.source]
    return args


def reproduce_command(plan: RunPlan, model_args: Sequence[str]) -> str:
    """`reproduce_args` as one shell-quoted line."""
    return shlex.join(reproduce_args(plan, model_args))


def recipe_is_expressible(plan: RunPlan) -> bool:
    """Whether the command line can say this plan: one recipe, with default values for keys without a flag."""
    recipes = {a.recipe for a in plan.arms}
    if len(recipes) != 1 or (plan.data.val_split and plan.data.split != "stratified"):
        return False
    recipe, default = next(iter(recipes)), Recipe()
    return all(
        getattr(recipe, f.name) == getattr(default, f.name)
        for f in dataclasses.fields(Recipe)
        if not f.metadata["flag"]
    )
