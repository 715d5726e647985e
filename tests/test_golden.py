"""Golden numbers: the default recipe gives today exactly the losses and accuracies cnnlab 0.1 gave.

`fixtures/v0_1/golden_builtin.json` was written by cnnlab 0.1 (its README says how). Floating-point
results depend on the torch version, the thread count and the CPU's kernels, so the test runs
only where those match the recorded ones and says why it skips elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnlab.api import plan_run, run
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.runfolder import read_json
from synthetic import learnable_arrays, write_dataset_folder

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "v0_1" / "golden_builtin.json").read_text())
HERE = {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
}
DIFFERENT = [f"{key} {GOLDEN[key]} (here {value})" for key, value in HERE.items() if GOLDEN[key] != value]

pytestmark = pytest.mark.skipif(
    bool(DIFFERENT) or torch.cuda.is_available(),
    reason="golden numbers were recorded with " + ", ".join(DIFFERENT or ["no CUDA"]),
)


@pytest.mark.parametrize("precision", sorted(GOLDEN["runs"]))
def test_default_recipe_matches_cnnlab_0_1(precision, tmp_path):
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(512, 128, seed=0))
    plan = plan_run(
        ["convnet3", "convnet5", "convnet7"],
        recipes=[Recipe(epochs=2)],
        data=DataSelection(data_dir=str(data), limit_train=384, limit_test=128),
        hardware=HardwareRequest(precision=precision),
    )
    folder = run(plan, runs_dir=tmp_path / "runs").folder
    for model, expected in GOLDEN["runs"][precision].items():
        metrics = read_json(folder.path / model / "seed-0" / "metrics.json")
        history = read_json(folder.path / model / "seed-0" / "history.json")
        assert metrics["hardware"]["precision"] == expected["precision"]
        got = [{k: r[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")} for r in history]
        assert got == expected["history"], model
        assert (metrics["test_loss"], metrics["test_accuracy"]) == (expected["test_loss"], expected["test_accuracy"])
