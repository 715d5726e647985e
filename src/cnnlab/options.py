"""Keras-style training options of a recipe, as frozen data (Keras 3.15 names, defaults and meaning).

- Learning-rate schedules: `ExponentialDecay`, `PiecewiseConstantDecay`, `CosineDecay` (step-wise,
  `keras.optimizers.schedules`) and `ReduceLROnPlateau` (per epoch, `keras.callbacks`).
- `EarlyStopping` and `BestCheckpoint` (Keras's `ModelCheckpoint(save_best_only=True)`).
- `Augmentation`: Keras's `RandomTranslation`, `RandomRotation` and `RandomZoom`, applied in that order.

Each option reads from text as the command line gives it (`"cosine:decay_steps=2000,alpha=0.1"`,
`"patience=3,restore_best_weights=true"`, `"on"` for the defaults; a list or a pair is written
with `/`, e.g. `boundaries=1000/2000`) and from a TOML table, and writes back to both, so a
recorded recipe can be given again. This module is pure data.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from cnnlab.errors import ConfigError

MONITORS = ("val_loss", "val_accuracy", "loss", "accuracy")
MODES = ("auto", "min", "max")
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
INTERPOLATIONS = ("bilinear", "nearest")


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def monitor_mode(monitor: str, mode: str) -> str:
    """Keras's `mode="auto"`: maximise accuracies, minimise losses."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith("accuracy") else "min"


def _check_monitor(where: str, monitor: str, mode: str) -> None:
    _require(monitor in MONITORS, where, f"monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    _require(mode in MODES, where, f"mode must be auto, min or max, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


@dataclass(frozen=True)
class ExponentialDecay:
    """lr(step) = learning_rate * decay_rate ** (step / decay_steps), the exponent floored when
    `staircase` (keras.optimizers.schedules.ExponentialDecay)."""

    KIND: ClassVar[str] = "exponential"
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self) -> None:
        where = "--schedule exponential"
        _require(_whole(self.decay_steps) and self.decay_steps >= 1, where, "decay_steps must be an integer >= 1")
        _require(_number(self.decay_rate) and self.decay_rate > 0, where, "decay_rate must be a positive number")


@dataclass(frozen=True)
class PiecewiseConstantDecay:
    """values[0] up to boundaries[0] (inclusive), values[1] up to boundaries[1], ..., the last value
    after the last boundary (keras.optimizers.schedules.PiecewiseConstantDecay). Replaces --lr."""

    KIND: ClassVar[str] = "piecewise"
    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        where = "--schedule piecewise"
        _require(
            len(self.boundaries) >= 1 and all(_whole(b) and b >= 0 for b in self.boundaries),
            where,
            "boundaries must be step numbers >= 0, e.g. boundaries=1000/2000",
        )
        _require(list(self.boundaries) == sorted(set(self.boundaries)), where, "boundaries must increase")
        _require(
            len(self.values) == len(self.boundaries) + 1,
            where,
            f"needs one more value than boundaries ({len(self.boundaries) + 1}), got {len(self.values)}",
        )
        _require(all(_number(v) and v > 0 for v in self.values), where, "values must be positive learning rates")


@dataclass(frozen=True)
class CosineDecay:
    """Optional linear warm-up from the recipe's learning rate to `warmup_target` over `warmup_steps`,
    then cosine decay over `decay_steps` down to `alpha` times the peak
    (keras.optimizers.schedules.CosineDecay)."""

    KIND: ClassVar[str] = "cosine"
    decay_steps: int
    alpha: float = 0.0
    warmup_target: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        where = "--schedule cosine"
        _require(_whole(self.decay_steps) and self.decay_steps >= 1, where, "decay_steps must be an integer >= 1")
        _require(_number(self.alpha) and 0 <= self.alpha <= 1, where, "alpha must be in [0, 1]")
        _require(_whole(self.warmup_steps) and self.warmup_steps >= 0, where, "warmup_steps must be >= 0")
        _require(
            self.warmup_target is None or (_number(self.warmup_target) and self.warmup_target > 0),
            where,
            "warmup_target must be a positive learning rate",
        )


@dataclass(frozen=True)
class ReduceLROnPlateau:
    """Multiply the learning rate by `factor` when `monitor` has not improved by `min_delta` for
    `patience` epochs, then wait `cooldown` epochs; never below `min_lr` (keras.callbacks)."""

    KIND: ClassVar[str] = "plateau"
    monitor: str = "val_loss"
    factor: float = 0.1
    patience: int = 10
    mode: str = "auto"
    min_delta: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        where = "--schedule plateau"
        _check_monitor(where, self.monitor, self.mode)
        _require(_number(self.factor) and 0 < self.factor < 1, where, "factor must be in (0, 1)")
        _require(_whole(self.patience) and self.patience >= 0, where, "patience must be an integer >= 0")
        _require(_whole(self.cooldown) and self.cooldown >= 0, where, "cooldown must be an integer >= 0")
        _require(_number(self.min_delta) and self.min_delta >= 0, where, "min_delta must be >= 0")
        _require(_number(self.min_lr) and self.min_lr >= 0, where, "min_lr must be >= 0")


Schedule = ExponentialDecay | PiecewiseConstantDecay | CosineDecay | ReduceLROnPlateau
SCHEDULES: dict[str, type] = {
    cls.KIND: cls for cls in (ExponentialDecay, PiecewiseConstantDecay, CosineDecay, ReduceLROnPlateau)
}


# ---------------------------------------------------------------------------------------------
# Callbacks


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs, counting from
    `start_from_epoch`; optionally restore the best epoch's weights (keras.callbacks.EarlyStopping)."""

    monitor: str = "val_loss"
    min_delta: float = 0.0
    patience: int = 0
    mode: str = "auto"
    baseline: float | None = None
    restore_best_weights: bool = False
    start_from_epoch: int = 0

    def __post_init__(self) -> None:
        where = "--early-stopping"
        _check_monitor(where, self.monitor, self.mode)
        _require(_number(self.min_delta), where, "min_delta must be a number")
        _require(_whole(self.patience) and self.patience >= 0, where, "patience must be an integer >= 0")
        _require(self.baseline is None or _number(self.baseline), where, "baseline must be a number")
        _require(isinstance(self.restore_best_weights, bool), where, "restore_best_weights must be true or false")
        _require(_whole(self.start_from_epoch) and self.start_from_epoch >= 0, where, "start_from_epoch must be >= 0")


@dataclass(frozen=True)
class BestCheckpoint:
    """Keep the weights of the epoch with the best `monitor`, as Keras's
    `ModelCheckpoint(save_best_only=True)`; the run folder says which epoch it was."""

    monitor: str = "val_loss"
    mode: str = "auto"
    initial_value_threshold: float | None = None

    def __post_init__(self) -> None:
        where = "--best-checkpoint"
        _check_monitor(where, self.monitor, self.mode)
        _require(
            self.initial_value_threshold is None or _number(self.initial_value_threshold),
            where,
            "initial_value_threshold must be a number",
        )


# ---------------------------------------------------------------------------------------------
# Augmentation


def _pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(_number(v) for v in value) and value[0] <= value[1]


@dataclass(frozen=True)
class Augmentation:
    """Random translation, rotation and zoom of each training image, on the device, with Keras's
    layers' meaning: each range (lower, upper) is drawn uniformly per image. Shifts are fractions
    of the height and width (RandomTranslation), rotation a fraction of a full turn
    (RandomRotation), zoom a fraction where negative zooms in (RandomZoom; `zoom_width` None keeps
    the aspect ratio). Shorthands: translate=F, rotate=F, zoom=F give the ranges (-F, F)."""

    height_shift: tuple[float, float] = (0.0, 0.0)
    width_shift: tuple[float, float] = (0.0, 0.0)
    rotation: tuple[float, float] = (0.0, 0.0)
    zoom_height: tuple[float, float] = (0.0, 0.0)
    zoom_width: tuple[float, float] | None = None
    fill_mode: str = "reflect"
    interpolation: str = "bilinear"
    fill_value: float = 0.0

    SHORTHANDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "translate": ("height_shift", "width_shift"),
        "rotate": ("rotation",),
        "zoom": ("zoom_height",),
    }

    def __post_init__(self) -> None:
        where = "--augment"
        for name in ("height_shift", "width_shift", "rotation", "zoom_height"):
            value = getattr(self, name)
            _require(_pair(value), where, f"{name} must be a range lower/upper, got {value!r}")
        _require(self.zoom_width is None or _pair(self.zoom_width), where, "zoom_width must be a range lower/upper")
        _require(
            all(-1 <= v <= 1 for v in self.height_shift + self.width_shift), where, "shifts must be within [-1, 1]"
        )
        _require(
            all(v > -1 for v in self.zoom_height + (self.zoom_width or (0.0,))),
            where,
            "zoom must be above -1 (a factor of -1 would zoom in infinitely)",
        )
        _require(self.fill_mode in FILL_MODES, where, f"fill_mode must be one of {', '.join(FILL_MODES)}")
        _require(self.interpolation in INTERPOLATIONS, where, "interpolation must be bilinear or nearest")
        _require(_number(self.fill_value), where, "fill_value must be a number")
        _require(self.active, where, "no transformation is set; give e.g. translate=0.1,rotate=0.05,zoom=0.1")

    @property
    def active(self) -> bool:
        """Whether any transformation is set."""
        ranges = (self.height_shift, self.width_shift, self.rotation, self.zoom_height, self.zoom_width or (0.0, 0.0))
        return any(v != 0 for pair in ranges for v in pair)


OPTION_TYPES = (ExponentialDecay, PiecewiseConstantDecay, CosineDecay, ReduceLROnPlateau, EarlyStopping,
                BestCheckpoint, Augmentation)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Text and TOML


def _convert(value: Any, annotation: Any, where: str, key: str) -> Any:
    """A value from text or TOML as the field's type wants it."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        choices = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, choices[0], where, key)
    if origin is tuple:
        items = value.split("/") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        item_type = typing.get_args(annotation)[0]
        return tuple(_convert(item, item_type, where, key) for item in items)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or number != int(number):
                raise ValueError(value)
            return int(number)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{where}: {key} must be {name}, got {value!r}") from None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    arguments: dict[str, Any] = {}
    for key, value in values.items():
        targets = getattr(cls, "SHORTHANDS", {}).get(key)
        if targets:
            number = _convert(value, float, where, key)
            for target in targets:
                arguments[target] = (-abs(number), abs(number))
            continue
        if key not in fields:
            known = sorted(list(fields) + list(getattr(cls, "SHORTHANDS", {})))
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
        arguments[key] = _convert(value, hints[key], where, key)
    try:
        return cls(**arguments)
    except TypeError as exc:
        missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.name not in arguments]
        raise ConfigError(f"{where}: needs {', '.join(missing) or 'other keys'}") from exc


def parse_option(text: str, option: str) -> Any:
    """An option from command-line text: `option` is "schedule", "early_stopping", "best_checkpoint"
    or "augmentation"; schedules start with their kind (`cosine:decay_steps=2000`)."""
    flag = OPTION_FLAGS[option]
    text = text.strip()
    if option == "schedule":
        kind, _, rest = text.partition(":")
        if kind not in SCHEDULES:
            raise ConfigError(
                f"{flag} {text!r}: start with one of {', '.join(SCHEDULES)}, e.g. 'cosine:decay_steps=2000'"
            )
        cls, body = SCHEDULES[kind], rest
    else:
        cls, body = OPTION_CLASSES[option], ("" if text.lower() in ("on", "true", "yes") else text)
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {text!r}: write key=value pairs separated by commas, got {item!r}")
        values[key.strip()] = value.strip()
    return _build(cls, values, f"{flag} {text!r}")


def option_to_dict(value: Any) -> dict[str, Any]:
    """An option as a TOML table: every field but None, tuples as lists, schedules with their kind."""
    data: dict[str, Any] = {"kind": value.KIND} if hasattr(value, "KIND") else {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if item is not None:
            data[f.name] = list(item) if isinstance(item, tuple) else item
    return data


def option_from_dict(data: Any, option: str, source: str) -> Any:
    """An option from a TOML table (as `option_to_dict` writes it)."""
    where = f"{source}: [{option}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table of keys")
    values = dict(data)
    if option == "schedule":
        kind = values.pop("kind", None)
        if kind not in SCHEDULES:
            raise ConfigError(f"{where}: kind must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        return _build(SCHEDULES[kind], values, where)
    return _build(OPTION_CLASSES[option], values, where)


def option_to_text(value: Any) -> str:
    """An option as command-line text that `parse_option` reads back to the same option."""
    defaults = {f.name: f.default for f in dataclasses.fields(value)}
    parts = []
    for name, item in option_to_dict(value).items():
        if name == "kind" or item == (list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name]):
            continue
        text = "/".join(repr(v) if isinstance(v, float) else str(v) for v in item) if isinstance(item, list) else item
        parts.append(f"{name}={str(text).lower() if isinstance(item, bool) else text}")
    body = ",".join(parts)
    if hasattr(value, "KIND"):
        return f"{value.KIND}:{body}" if body else value.KIND
    return body or "on"


OPTION_CLASSES: dict[str, type] = {
    "early_stopping": EarlyStopping,
    "best_checkpoint": BestCheckpoint,
    "augmentation": Augmentation,
}
OPTION_FLAGS = {
    "schedule": "--schedule",
    "early_stopping": "--early-stopping",
    "best_checkpoint": "--best-checkpoint",
    "augmentation": "--augment",
}
