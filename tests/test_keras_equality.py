"""Keras 3 and cnnlab take the same training steps (the issue's proof), step by step.

Each model starts from Keras's own initial weights (moved into cnnlab by the import) and sees the
same batches in the same order, dropout off, fp32. Keras takes 100 Adam steps; before each one,
cnnlab takes Keras's whole state (weights, BatchNormalization's moving statistics, Adam's moments and
step count) and takes the same step with its own engine. Every step's loss must agree within 1e-3
relative and the weights after the last step within 1e-2 relative L2 per variable, moving statistics
included: the issue's tolerances, fixed before measuring.

Why from Keras's state rather than free-running: two free-running trainings part within a few dozen
steps from fp32 rounding alone, cnnlab against itself in another memory layout as fast as against
Keras (benchmarks/keras_equality.py measures both; BENCHMARKS.md has the numbers). The harness is
benchmarks/keras_equality.py, one implementation for this test and for BENCHMARKS.md; Keras runs on
its PyTorch backend, so no TensorFlow is needed. Real MNIST batches come from CNNLAB_DATA_DIR;
without it, synthetic ones (never a skip).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is first imported
pytest.importorskip("keras")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from keras_equality import LOSS_TOLERANCE, MODELS, WEIGHT_TOLERANCE, measure_step_by_step  # noqa: E402

# Keras 3.15 on torch converts tensors with np.array(x, copy=False), which numpy 2 warns about each time.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

STEPS = 100
BATCH_SIZE = 128  # the notebook's


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_keras_and_cnnlab_take_the_same_steps(name: str) -> None:
    data_dir = os.environ.get("CNNLAB_DATA_DIR")
    result = measure_step_by_step(
        name, steps=STEPS, batch_size=BATCH_SIZE, data_dir=Path(data_dir) if data_dir else None
    )
    assert result.initial_difference == 0.0, "the import changed the initial weights"
    compared = result.keras  # cnnlab against Keras
    assert len(compared.losses) == len(compared.reference_losses) == STEPS
    assert {v.variable for v in compared.variables} >= {"kernel", "bias"}
    where = f"{name} ({result.data} data, batch {BATCH_SIZE}): " + "; ".join(compared.failures)
    assert (LOSS_TOLERANCE, WEIGHT_TOLERANCE) == (1e-3, 1e-2)  # the issue's, fixed before measuring
    assert all(d < LOSS_TOLERANCE for d in compared.loss_differences), where
    assert all(v.relative_l2 < WEIGHT_TOLERANCE for v in compared.variables), where
