"""End to end on real MNIST (CNNLAB_DATA_DIR): the seed comparison as a user runs it, and each seed
model learning to better than 80% test accuracy.

The notebook's recipe makes convnet5 and convnet7 slow starters (in the notebook, after a whole 60,000
image epoch they stood at 11% and 46% validation accuracy; Keras 3 on the same 9,600 samples as our
check gives the same 16% for convnet7 that cnnlab does). So the whole-pipeline run is short and
checks the files and the table, and each model's accuracy is checked with a budget it needs.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from cnnlab_cli import run_cnnlab

pytestmark = pytest.mark.slow


def cnnlab_ok(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = run_cnnlab(*args, cwd=cwd, timeout=900)
    assert result.returncode == 0, f"cnnlab {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_compare_the_seed_models_on_real_mnist(real_data_dir, tmp_path):
    result = cnnlab_ok(
        "compare",
        "--data-dir",
        str(real_data_dir),
        "--epochs",
        "1",
        "--limit-train",
        "3200",
        "--limit-test",
        "1000",
        "--runs-dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    out = result.stdout
    # The table: every model with its Keras parameter count.
    for name, params in (("convnet3", "4,060,426"), ("convnet5", "1,083,918"), ("convnet7", "379,014")):
        assert any(name in line and params in line for line in out.splitlines()), out
    assert "Test acc" in out and "Train acc" in out
    assert "do not match the canonical checksums" in result.stderr  # the offline training split is partial
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in (
        "config.toml",
        "environment.json",
        "comparison.md",
        "comparison.csv",
        "comparison.json",
        "curves_all.png",
        "report.html",
        "report.md",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    table = json.loads((run_dir / "comparison.json").read_text())
    assert [m["model"] for m in table["models"]] == ["convnet3", "convnet5", "convnet7"]
    for model in ("convnet3", "convnet5", "convnet7"):
        for name in (
            f"loss_{model}.png",
            f"accuracy_{model}.png",
            f"{model}/seed-0/weights.pt",
            f"{model}/seed-0/history.csv",
            f"{model}/seed-0/metrics.json",
        ):
            assert (run_dir / name).stat().st_size > 0, name
        metrics = json.loads((run_dir / model / "seed-0" / "metrics.json").read_text())
        assert metrics["arm"] == metrics["model"] == model and metrics["seed"] == 0
        history = json.loads((run_dir / model / "seed-0" / "history.json").read_text())
        assert metrics["epochs"] == len(history) == 1
        # Validated on the test split (the notebook's recipe): the test score is the last validation.
        assert metrics["test_accuracy"] == history[-1]["val_accuracy"]
        status = json.loads((run_dir / model / "seed-0" / "status.json").read_text())
        assert status == {"state": "finished", "epochs_done": 1, "error": None}
        assert math.isfinite(metrics["test_loss"]) and metrics["test_loss"] == history[-1]["val_loss"]
    convnet3 = json.loads((run_dir / "convnet3" / "seed-0" / "metrics.json").read_text())
    assert convnet3["test_accuracy"] > 0.80


# Budgets (training images, epochs, batch size) under which each of the notebook's models passes 80% on the
# first 2,000 real test images, with the notebook's optimiser settings otherwise.
BUDGETS = {
    "convnet3": ("4000", "1", "128"),
    "convnet5": ("4800", "1", "32"),
    "convnet7": ("22699", "4", "128"),
}


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_each_seed_model_learns_real_mnist(model, real_data_dir, tmp_path):
    images, epochs, batch = BUDGETS[model]
    cnnlab_ok(
        "train",
        model,
        "--data-dir",
        str(real_data_dir),
        "--limit-train",
        images,
        "--epochs",
        epochs,
        "--batch-size",
        batch,
        "--limit-test",
        "2000",
        "--runs-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    (metrics_path,) = tmp_path.glob(f"*/{model}/seed-0/metrics.json")
    assert json.loads(metrics_path.read_text())["test_accuracy"] > 0.80
