"""End to end: a real `cnnlab compare` killed mid-epoch, then `cnnlab compare --resume RUN_DIR`.

The interrupted run has seed 0 finished and seed 1 killed (SIGKILL, no chance to clean up) inside
a later epoch, after its first epoch's checkpoint was written. The resumed run must keep seed 0
untouched, continue seed 1 from its last checkpoint rather than from scratch, and end with the same
numbers as an uninterrupted run of seed 1: on the CPU with a fixed seed, the same floats exactly.

Needs the real data: CNNLAB_DATA_DIR pointing at a folder with mnist/ (CI: ../shared/data).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnlab.runs import read_json

pytestmark = pytest.mark.slow

# convnet7 is the cheapest built-in model; 4 steps per epoch keep the test short. Three epochs leave
# room to kill seed 1 inside epoch 2 or 3 even if the poll is late. fp32 and no compilation make the
# CPU run bit-for-bit repeatable.
EPOCHS = 3
SETTINGS = ["--epochs", str(EPOCHS), "--limit-train", "128", "--limit-test", "100", "--batch-size", "32",
            "--device", "cpu", "--precision", "fp32", "--compile", "off"]
ARGS = ["compare", "convnet7", "--seeds", "0,1", *SETTINGS]
HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
METRIC_KEYS = ("epochs", "train_accuracy", "train_loss", "test_loss", "test_accuracy")


def cnnlab(*args: str) -> list[str]:
    """The command line of `cnnlab ARGS` with this interpreter (the venv need not be on PATH)."""
    return [sys.executable, "-m", "cnnlab.cli", *args]


def environment(data_dir: Path) -> dict[str, str]:
    # One thread: every run the test compares computes with the same thread count (a condition of
    # bit-for-bit equality), and on shared CI cores two spinning OpenMP threads are several times slower.
    env = dict(os.environ, CNNLAB_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("CNNLAB_DEBUG", None)
    return env


def run_cnnlab(args: list[str], data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cnnlab(*args), capture_output=True, text=True, timeout=timeout,
                            env=environment(data_dir))
    assert result.returncode == 0, f"cnnlab {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def only_run_dir(runs_dir: Path) -> Path:
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run_dir


def kill_during_second_epoch_of_seed_1(runs_dir: Path, data_dir: Path) -> Path:
    """Start `cnnlab compare`, SIGKILL it once seed 1's first-epoch checkpoint exists; return its run folder."""
    process = subprocess.Popen(cnnlab(*ARGS, "--runs-dir", str(runs_dir)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment(data_dir))
    deadline = time.monotonic() + 300
    try:
        while True:
            checkpoints = list(runs_dir.glob("*/convnet7/seed-1/checkpoint.pt"))
            if checkpoints:
                process.send_signal(signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(f"cnnlab exited ({process.returncode}) before seed 1's first checkpoint:\n"
                            f"{process.stdout.read() if process.stdout else ''}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint of seed 1 within 300 s")
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        if process.stdout:
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    return only_run_dir(runs_dir)


def history(unit: Path) -> list[dict]:
    """A model/seed's history without its timings."""
    return [{k: r[k] for k in HISTORY_KEYS} for r in read_json(unit / "history.json")]


def test_killed_compare_resumes_to_the_same_result(tmp_path: Path, real_data_dir: Path) -> None:
    killed = kill_during_second_epoch_of_seed_1(tmp_path / "killed", real_data_dir)
    seed_0, seed_1 = killed / "convnet7" / "seed-0", killed / "convnet7" / "seed-1"
    assert (seed_0 / "metrics.json").is_file() and not (seed_0 / "checkpoint.pt").exists()
    assert not (seed_1 / "metrics.json").exists(), "seed 1 finished before it was killed; the test needs longer epochs"
    checkpoint = torch.load(seed_1 / "checkpoint.pt", weights_only=True)
    done = len(checkpoint["history"])
    assert 1 <= done < EPOCHS  # killed inside epoch done + 1
    assert not (killed / "report.html").exists()
    seed_0_metrics = (seed_0 / "metrics.json").read_bytes()

    resumed = run_cnnlab(["compare", "--resume", str(killed)], real_data_dir)
    assert f"Resuming {killed}" in resumed.stdout
    assert "seed 0 epoch" not in resumed.stdout  # a finished seed is not trained again...
    assert (seed_0 / "metrics.json").read_bytes() == seed_0_metrics  # ...and is kept as it was
    trained = [f"convnet7 seed 1 epoch {e}/{EPOCHS}" in resumed.stdout for e in range(1, EPOCHS + 1)]
    assert trained == [e > done for e in range(1, EPOCHS + 1)], resumed.stdout  # only the unfinished epochs
    assert not list(killed.glob("*/seed-*/checkpoint.pt"))
    assert not list(killed.rglob(".*.tmp"))

    # Seed 1 without interruption (seed 0 never was interrupted: no need to train it again).
    run_cnnlab(["compare", "convnet7", "--seed", "1", *SETTINGS, "--runs-dir", str(tmp_path / "reference")],
               real_data_dir)
    uninterrupted = only_run_dir(tmp_path / "reference") / "convnet7" / "seed-1"
    resumed_seed_1 = killed / "convnet7" / "seed-1"
    assert history(resumed_seed_1) == history(uninterrupted)
    metrics, expected = read_json(resumed_seed_1 / "metrics.json"), read_json(uninterrupted / "metrics.json")
    assert {k: metrics[k] for k in METRIC_KEYS} == {k: expected[k] for k in METRIC_KEYS}
    predictions = torch.load(resumed_seed_1 / "predictions.pt", weights_only=True)
    expected_predictions = torch.load(uninterrupted / "predictions.pt", weights_only=True)
    for key in ("labels", "predictions", "confidences"):
        assert torch.equal(predictions[key], expected_predictions[key]), key
    weights = torch.load(resumed_seed_1 / "weights.pt", weights_only=True)
    expected_weights = torch.load(uninterrupted / "weights.pt", weights_only=True)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)

    # The final table and report are complete: both seeds, with an interval.
    comparison = json.loads((killed / "comparison.json").read_text())
    (row,) = comparison["models"]
    accuracies = [read_json(killed / "convnet7" / f"seed-{s}" / "metrics.json")["test_accuracy"] for s in (0, 1)]
    assert row["seeds"] == 2 and row["test_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    assert row["test_accuracy_ci_low"] is not None
    for name in ("report.html", "report.md", "comparison.md", "mistakes_convnet7.png", "confusion_convnet7.png"):
        assert (killed / name).is_file(), name
    assert "incomplete" not in (killed / "report.html").read_text(encoding="utf-8")
