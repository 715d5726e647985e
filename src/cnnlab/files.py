"""Atomic file writes: a file is either whole or absent, never half-written.

Everything cnnlab writes goes through here: to a temporary name in the same folder, then renamed
onto the final name. An unwritable folder or a full disk is a `RunError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnlab.errors import RunError

TEMPORARY_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp_path = Path(tmp)
    try:  # everything after mkstemp: an interrupt anywhere here leaves no temporary file
        os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: OSError) -> RunError:
    return RunError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose a writable folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """JSON, indented, atomically; NaN (no value, e.g. the interval of one seed) becomes null."""
    write_text(path, json.dumps(without_nan(data), indent=2, default=_json_default, allow_nan=False) + "\n")


def without_nan(value: Any) -> Any:
    """The same data with every float NaN replaced by None (JSON's null)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors and arrays
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
