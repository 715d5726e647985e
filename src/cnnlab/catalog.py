"""Where model specs come from: one way from a name or a path to a `ModelSpec`.

A model is named by a built-in name (the spec files in `cnnlab/zoo/`), or by the path of a spec
file: cnnlab's own TOML or JSON, Keras's `model.to_json()` (recognised by its `class_name` and
`config` keys), or a Keras model file (`.keras`, legacy `.h5`/`.hdf5`), whose architecture is read
and weights left alone. Everything that reads a spec (the CLI, the run folder, the report) comes here.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from cnnlab.errors import SpecError
from cnnlab.keras_files import is_keras_file, read_keras_spec
from cnnlab.keras_json import spec_from_keras_json
from cnnlab.spec import ModelSpec, SpecLocation, parse_spec

SPEC_SUFFIXES = ".toml/.json spec or a Keras .keras/.h5"


def builtin_models() -> list[str]:
    """Names of the built-in models, sorted."""
    return sorted(p.name[:-5] for p in resources.files("cnnlab.zoo").iterdir() if p.name.endswith(".toml"))


def builtin_spec_text(name: str) -> str:
    """The TOML text of a built-in model's spec."""
    if name not in builtin_models():
        raise SpecError(_unknown(name))
    return resources.files("cnnlab.zoo").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """A built-in model by name, or a spec file by path (.toml, .json, Keras JSON, .keras, .h5 or .hdf5)."""
    text = str(name_or_path)
    if isinstance(name_or_path, str) and text in builtin_models():
        return spec_from_text(builtin_spec_text(text), source=f"cnnlab/zoo/{text}.toml", default_name=text)
    path = Path(name_or_path)
    if path.suffix.lower() not in (".toml", ".json") and not is_keras_file(path) and not path.exists():
        raise SpecError(_unknown(text))
    if not path.is_file():
        raise SpecError(
            f"{path}: no such spec file; give a built-in model name (see `cnnlab models`) or the path of a "
            f"{SPEC_SUFFIXES} file"
        )
    if is_keras_file(path):
        return read_keras_spec(path)
    try:
        content = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    return spec_from_text(
        content, source=str(path), default_name=path.stem, syntax="json" if path.suffix.lower() == ".json" else "toml"
    )


def spec_from_text(text: str, source: str, default_name: str, syntax: str = "toml") -> ModelSpec:
    """Parse spec text (TOML or JSON; Keras JSON is recognised) and validate it."""
    try:
        data: Any = json.loads(text) if syntax == "json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecLocation(source).error(f"not valid {syntax.upper()} ({exc}); fix the syntax") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting thousands deep
        raise SpecLocation(source).error(
            f"cannot be read ({type(exc).__name__}: {str(exc).split(';')[0][:120]}); fix the file"
        ) from None
    if isinstance(data, dict) and "class_name" in data and "config" in data:
        return spec_from_keras_json(data, source=source, default_name=default_name)
    return parse_spec(data, source=source, default_name=default_name)


def builtin_name_of(spec: ModelSpec) -> str | None:
    """The built-in model this spec is (same name and layers), or None."""
    if spec.name not in builtin_models():
        return None
    return spec.name if load_spec(spec.name) == spec else None


def _unknown(name: str) -> str:
    return (
        f"unknown model '{name}'; built-in models: {', '.join(builtin_models())} "
        f"(or give the path of a {SPEC_SUFFIXES} file)"
    )
