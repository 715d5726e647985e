"""The tests' one way to run the `cnnlab` command line in a fresh process, as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cnnlab_command(*args: str) -> list[str]:
    """The command line of `cnnlab ARGS` with this interpreter (the venv need not be on PATH)."""
    return [sys.executable, "-m", "cnnlab.cli", *args]


def run_cnnlab(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `cnnlab ARGS` in a fresh process as a user would, without CNNLAB_DATA_DIR unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k not in ("CNNLAB_DATA_DIR", "CNNLAB_DEBUG")}
    return subprocess.run(
        cnnlab_command(*args),
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
        timeout=timeout,
    )
