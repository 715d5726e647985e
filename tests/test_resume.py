"""End to end: a real `cnnlab compare` killed mid-epoch, then `cnnlab compare --resume RUN_DIR`; and
run folders written by cnnlab 0.1 (tests/fixtures/v0_1/) resumed, evaluated and reported by this one.

The interrupted run has seed 0 finished and seed 1 killed (SIGKILL, no chance to clean up) inside
a later epoch, after its first epoch's checkpoint was written. The resumed run must keep seed 0
untouched, continue seed 1 from its last checkpoint rather than from scratch, and end with the same
numbers as an uninterrupted run of seed 1: on the CPU with a fixed seed, the same floats exactly.

The killed-run test needs the real data: CNNLAB_DATA_DIR pointing at a folder with mnist/ (CI:
../shared/data). The 0.1 fixtures were made on synthetic data that `synthetic.py` writes again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cnnlab.api import evaluate
from cnnlab.cli import main
from cnnlab.errors import DataWarning
from cnnlab.results import UnitStatus
from cnnlab.runfolder import RunFolder, read_json
from cnnlab_cli import cnnlab_command, run_cnnlab
from synthetic import learnable_arrays, write_dataset_folder

# convnet7 is the cheapest built-in model; 4 steps per epoch keep the test short. Three epochs leave
# room to kill seed 1 inside epoch 2 or 3 even if the poll is late. fp32 and no compilation make the
# CPU run bit-for-bit repeatable.
EPOCHS = 3
SETTINGS = [
    "--epochs",
    str(EPOCHS),
    "--limit-train",
    "128",
    "--limit-test",
    "100",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "--compile",
    "off",
]
HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
METRIC_KEYS = ("epochs", "train_accuracy", "train_loss", "test_loss", "test_accuracy")
# One thread: every run the test compares computes with the same thread count (a condition of
# bit-for-bit equality), and on shared CI cores two spinning OpenMP threads are several times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"
# The fixtures were made with 2 threads; with 1 the resumed unit's floats differ in the last bits.
FIXTURE_THREADS = {"OMP_NUM_THREADS": "2"}


def cnnlab_ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = run_cnnlab(*args, env=env, timeout=300)
    assert result.returncode == 0, f"cnnlab {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def only_run_dir(runs_dir: Path) -> Path:
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run_dir


def kill_during_second_epoch_of_seed_1(runs_dir: Path, data_dir: Path) -> Path:
    """Start `cnnlab compare`, SIGKILL it once seed 1's first-epoch checkpoint exists; return its run folder."""
    args = [
        "compare",
        "convnet7",
        "--seeds",
        "0,1",
        *SETTINGS,
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(runs_dir),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNLAB_")} | ONE_THREAD
    process = subprocess.Popen(
        cnnlab_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    deadline = time.monotonic() + 300
    try:
        while True:
            checkpoints = list(runs_dir.glob("*/convnet7/seed-1/checkpoint.pt"))
            if checkpoints:
                process.send_signal(signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(
                    f"cnnlab exited ({process.returncode}) before seed 1's first checkpoint:\n"
                    f"{process.stdout.read() if process.stdout else ''}"
                )
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
    """A unit's history without its timings."""
    return [{k: r[k] for k in HISTORY_KEYS} for r in read_json(unit / "history.json")]


def statuses(run_dir: Path) -> dict[tuple[str, int], UnitStatus]:
    folder = RunFolder.open(run_dir)
    return {(u.arm.name, u.seed): folder.status(u) for u in folder.read_plan().units()}


@pytest.mark.slow
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

    # The states as the killed process left them: seed 1 still says "running" (SIGKILL left no chance
    # to say otherwise), which the run folder reads as interrupted.
    assert read_json(seed_0 / "status.json") == {"state": "finished", "epochs_done": EPOCHS, "error": None}
    recorded = read_json(seed_1 / "status.json")
    assert recorded["state"] == "running" and recorded["error"] is None
    assert recorded["epochs_done"] <= done  # written just after each checkpoint
    before = statuses(killed)
    assert before[("convnet7", 0)] == UnitStatus("finished", EPOCHS)
    assert before[("convnet7", 1)].state == "interrupted"
    assert before[("convnet7", 1)].epochs_done == recorded["epochs_done"]

    resumed = cnnlab_ok("compare", "--resume", str(killed), env=ONE_THREAD)
    assert f"Resuming {killed}" in resumed.stdout
    assert "seed 0 epoch" not in resumed.stdout  # a finished seed is not trained again...
    assert (seed_0 / "metrics.json").read_bytes() == seed_0_metrics  # ...and is kept as it was
    trained = [f"convnet7 seed 1 epoch {e}/{EPOCHS}" in resumed.stdout for e in range(1, EPOCHS + 1)]
    assert trained == [e > done for e in range(1, EPOCHS + 1)], resumed.stdout  # only the unfinished epochs
    assert not list(killed.glob("*/seed-*/checkpoint.pt"))
    assert not list(killed.rglob(".*.tmp"))
    assert statuses(killed) == {
        ("convnet7", 0): UnitStatus("finished", EPOCHS),
        ("convnet7", 1): UnitStatus("finished", EPOCHS),
    }
    for seed in (seed_0, seed_1):
        assert read_json(seed / "status.json") == {"state": "finished", "epochs_done": EPOCHS, "error": None}

    # Seed 1 without interruption (seed 0 never was interrupted: no need to train it again).
    cnnlab_ok(
        "compare",
        "convnet7",
        "--seed",
        "1",
        *SETTINGS,
        "--data-dir",
        str(real_data_dir),
        "--runs-dir",
        str(tmp_path / "reference"),
        env=ONE_THREAD,
    )
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
    comparison = read_json(killed / "comparison.json")
    (row,) = comparison["models"]
    accuracies = [read_json(killed / "convnet7" / f"seed-{s}" / "metrics.json")["test_accuracy"] for s in (0, 1)]
    assert row["seeds"] == 2 and row["test_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    assert row["test_accuracy_ci_low"] is not None
    for name in ("report.html", "report.md", "comparison.md", "mistakes_convnet7.png", "confusion_convnet7.png"):
        assert (killed / name).is_file(), name
    assert "incomplete" not in (killed / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Run folders written by cnnlab 0.1


def fixture_data(tmp_path: Path) -> Path:
    """The synthetic data the 0.1 fixtures were trained on, as a --data-dir folder."""
    data_dir = tmp_path / "data"
    write_dataset_folder(data_dir / "mnist", learnable_arrays(512, 128, seed=0))
    return data_dir


def copy_fixture(name: str, tmp_path: Path) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, run_dir)
    return run_dir


def test_an_interrupted_run_folder_of_cnnlab_0_1_resumes_to_the_result_0_1_got(tmp_path: Path) -> None:
    run_dir, data_dir = copy_fixture("interrupted", tmp_path), fixture_data(tmp_path)
    finished = FIXTURES / "finished"
    unit = run_dir / "tiny_b" / "seed-1"
    assert not (unit / "metrics.json").exists() and (unit / "checkpoint.pt").is_file()
    before = statuses(run_dir)
    assert before[("tiny_b", 1)].state == "interrupted"
    assert [before[unit].state for unit in (("tiny_a", 0), ("tiny_a", 1), ("tiny_b", 0))] == ["finished"] * 3
    kept = {path: path.read_bytes() for path in run_dir.glob("tiny_*/seed-*/*") if "tiny_b/seed-1" not in str(path)}

    resumed = cnnlab_ok("compare", "--resume", str(run_dir), "--data-dir", str(data_dir), env=FIXTURE_THREADS)
    assert f"Resuming {run_dir}" in resumed.stdout
    epochs = [line.split(" - ")[0] for line in resumed.stdout.splitlines() if " epoch " in line]
    assert epochs == ["tiny_b seed 1 epoch 2/2"], resumed.stdout  # only the epoch the checkpoint lacks
    assert not (unit / "checkpoint.pt").exists()
    assert all(path.read_bytes() == content for path, content in kept.items())  # finished units untouched

    # The numbers of the run 0.1 finished without interruption, within rounding: the resumed epoch
    # runs 0.2's fused CPU Adam, which rounds differently (test_golden.py; measured 2.9e-6 relative at most).
    resumed_history, expected_history = history(unit), history(finished / "tiny_b" / "seed-1")
    assert [r["epoch"] for r in resumed_history] == [r["epoch"] for r in expected_history]
    flat = lambda rows: [r[k] for r in rows for k in HISTORY_KEYS if k != "epoch"]  # noqa: E731
    assert flat(resumed_history) == pytest.approx(flat(expected_history), rel=1e-4)
    metrics, expected = read_json(unit / "metrics.json"), read_json(finished / "tiny_b" / "seed-1" / "metrics.json")
    assert [metrics[k] for k in METRIC_KEYS] == pytest.approx([expected[k] for k in METRIC_KEYS], rel=1e-4)
    assert metrics["arm"] == metrics["model"] == "tiny_b"
    assert all(s == UnitStatus("finished", 2) for s in statuses(run_dir).values())
    assert (run_dir / "report.html").is_file() and "incomplete" not in (run_dir / "report.html").read_text()
    assert "format_version" not in (run_dir / "config.toml").read_text()  # the 0.1 folder keeps its config


def test_a_finished_run_folder_of_cnnlab_0_1_is_evaluated_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, data_dir = copy_fixture("finished", tmp_path), fixture_data(tmp_path)
    units = [(arm, seed) for arm in ("tiny_a", "tiny_b") for seed in (0, 1)]
    saved = {(arm, seed): read_json(run_dir / arm / f"seed-{seed}" / "metrics.json") for arm, seed in units}

    with pytest.warns(DataWarning, match="do not match the canonical checksums"):  # synthetic data
        name, images, rows = evaluate(run_dir, data_dir=data_dir, device="cpu")
    assert (name, images) == ("mnist", 128)
    assert [(r.arm, r.seed) for r in rows] == units
    for row in rows:
        metrics = saved[(row.arm, row.seed)]
        assert row.accuracy == metrics["test_accuracy"], (row, metrics)
        assert row.loss == pytest.approx(metrics["test_loss"], rel=1e-5)

    assert main(["evaluate", str(run_dir), "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for arm, seed in units:
        accuracy = f"{saved[(arm, seed)]['test_accuracy']:.4f}"
        assert any(arm in line and accuracy in line for line in out.splitlines()), out

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"Report: {run_dir / 'report.html'}" in out
    comparison = read_json(run_dir / "comparison.json")
    assert [m["model"] for m in comparison["models"]] == ["tiny_a", "tiny_b"]
    assert [m["seeds"] for m in comparison["models"]] == [2, 2]
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "incomplete" not in page and "tiny_a" in page and "tiny_b" in page
    for name in ("report.md", "comparison.md", "loss_tiny_a.png", "confusion_tiny_b.png", "mistakes_tiny_b.png"):
        assert (run_dir / name).is_file(), name
