"""Sweeps: models x a grid of recipe settings x seeds, from a TOML file or from repeated options.

A sweep file names the models, the fixed recipe keys, a grid (each key a list of values; every
combination is an arm), the seeds, the data and the hardware:

    models = ["convnet3", "convnet7"]   # built-in names, spec files (relative to this file), Keras JSON
    seeds = 3                           # a count (seeds 0..2) or a list [0, 1, 2]

    [data]                              # DataSelection's keys
    dataset = "mnist"
    val_split = 0.1

    [recipe]                            # fixed recipe keys
    epochs = 12

    [grid]                              # each key a list: every combination is one arm
    learning_rate = [1e-3, 3e-4]
    schedule = ["plateau:factor=0.5,patience=2", "cosine:decay_steps=2000"]

    [hardware]                          # HardwareRequest's keys
    device = "auto"
    units_at_once = 1                   # units trained together by the local backend

This module is pure data: it reads the file and expands the grid; `api.plan_sweep` resolves it.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cnnlab.config import OPTION_KEYS, DataSelection, HardwareRequest, Recipe
from cnnlab.errors import ConfigError
from cnnlab.options import option_to_dict, parse_option

SECTIONS = {"models", "seeds", "data", "recipe", "grid", "hardware"}


@dataclass(frozen=True)
class Sweep:
    """A sweep file, read and checked: everything but the hardware's resolution."""

    models: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    seeds: tuple[int, ...]
    data: DataSelection
    hardware: HardwareRequest


def expand_grid(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], source: str) -> list[Recipe]:
    """One recipe per combination of the grid's values over the base keys, in the grid's order.
    Options may be given as command-line text (`"plateau:patience=2"`) or as tables."""
    known = {f.name for f in fields(Recipe)}
    for key, values in grid.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting '{key}' in the grid; known: {', '.join(sorted(known))}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{source}: grid setting '{key}' needs a non-empty list of values, e.g. [0.001, 0.0003]")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{source}: grid setting '{key}' repeats a value")
    recipes = []
    for combination in itertools.product(*grid.values()):
        raw = dict(base)
        raw.update(zip(grid.keys(), combination))
        try:
            recipes.append(Recipe.from_dict({k: _option(k, v) for k, v in raw.items()}, source=source))
        except ConfigError as exc:  # name the file the bad value came from
            raise ConfigError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    return recipes


def _option(key: str, value: Any) -> Any:
    """A recipe value as Recipe.from_dict takes it: options given as text become tables."""
    if key in OPTION_KEYS and isinstance(value, str):
        return option_to_dict(parse_option(value, key))
    return value


def seeds_of(value: Any, source: str) -> tuple[int, ...]:
    """`seeds = 3` (0, 1, 2) or `seeds = [0, 4, 7]`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(range(value))
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):  # fmt: skip
        return tuple(value)
    raise ConfigError(
        f"{source}: seeds must be a count like 3 or a list of distinct seeds like [0, 1, 2], got {value!r}"
    )


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file (see the module's docstring); errors name the file and the key."""
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); give a TOML sweep file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}'; a sweep file has {', '.join(sorted(SECTIONS))}")
    models = data.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f'{source}: models must be a non-empty list of model names or spec files, e.g. ["convnet7"]')
    resolved = [m if not m.endswith((".toml", ".json")) else str(path.parent / m) for m in models]
    for section in ("data", "recipe", "grid", "hardware"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
    recipes = expand_grid(data.get("recipe", {}), data.get("grid", {}), source)
    try:
        selection = DataSelection(**data.get("data", {}))
        hardware = HardwareRequest(**data.get("hardware", {}))
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}".replace("__init__() ", "")) from None
    return Sweep(tuple(resolved), tuple(recipes), seeds_of(data.get("seeds", 1), source), selection, hardware)
