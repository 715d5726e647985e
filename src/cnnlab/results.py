"""What training produces, as plain data: an epoch's record, a unit's status and a finished unit's results.

The engine makes these, the run folder stores them, and statistics, tables and the report read
them; none of those needs the others to know them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# A unit's life: pending (not started) -> running -> finished, or interrupted (Ctrl-C, SIGTERM,
# a killed process: resumable from its last checkpoint) or failed (an error at run time, recorded).
UNIT_STATES = ("pending", "running", "interrupted", "failed", "finished")


@dataclass(frozen=True)
class EpochRecord:
    """One row of a unit's history, in Keras's names: running training metrics, then validation."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    train_seconds: float
    val_seconds: float
    samples_per_second: float
    learning_rate: float = math.nan  # at the epoch's end, as Keras logs it (NaN in histories of cnnlab 0.1)


HISTORY_FIELDS = list(EpochRecord.__dataclass_fields__)


@dataclass(frozen=True)
class UnitStatus:
    """Where a unit stands; `error` says why a failed unit failed."""

    state: str
    epochs_done: int = 0
    error: str | None = None


@dataclass(frozen=True)
class UnitResult:
    """One finished unit as stored in the run folder: its arm, seed, history and final metrics."""

    arm: str
    seed: int
    history: list[EpochRecord] = field(repr=False)
    metrics: dict[str, Any] = field(repr=False)

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    @property
    def test_loss(self) -> float:
        return self.metrics["test_loss"]
