"""The run folder: the plan written and read back, unit states, 0.1 folders, damaged files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cnnlab.api import plan_run
from cnnlab.config import DataSelection, Hardware, HardwareRequest, Recipe
from cnnlab.errors import RunError
from cnnlab.results import EpochRecord, UnitStatus
from cnnlab.runfolder import METRIC_KEYS, RunFolder, history_csv

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"


def small_plan(**recipe):
    return plan_run(
        ["convnet7", FIXTURES / "tiny_a.toml"],
        recipes=[Recipe(epochs=2, **recipe)],
        seeds=(0, 3),
        data=DataSelection(limit_train=64, data_dir="/data"),
        hardware=HardwareRequest(device="cpu"),
    )


def test_the_plan_round_trips_through_the_folder(tmp_path):
    plan = small_plan()
    folder = RunFolder.create(tmp_path, "compare")
    folder.write_plan(plan)
    assert folder.read_plan() == plan
    assert (folder.path / "convnet7" / "spec.toml").is_file() and (folder.path / "tiny_a" / "spec.toml").is_file()
    assert RunFolder.open(folder.path).read_plan().hardware == plan.hardware


def test_arms_that_differ_in_settings_round_trip(tmp_path):
    plan = plan_run(["convnet7"], recipes=[Recipe(), Recipe(learning_rate=3e-4)])
    folder = RunFolder.create(tmp_path, "sweep")
    folder.write_plan(plan)
    assert folder.read_plan() == plan
    assert sorted(p.name for p in folder.path.iterdir() if p.is_dir())[0] == "convnet7"


def test_new_folders_never_reuse_an_existing_one(tmp_path):
    paths = {RunFolder.create(tmp_path, "x").path for _ in range(3)}
    assert len(paths) == 3 and all(p.parent == tmp_path for p in paths)
    hostile = RunFolder.create(tmp_path, "../../escape")
    assert hostile.path.parent == tmp_path and ".." not in hostile.path.name


def test_unit_states_from_pending_to_finished(tmp_path):
    plan = small_plan()
    folder = RunFolder.create(tmp_path, "compare")
    folder.write_plan(plan)
    unit = plan.units()[1]
    assert folder.status(unit) == UnitStatus("pending")
    folder.set_status(unit, UnitStatus("running", 1))
    assert folder.status(unit).state == "interrupted"  # a process that died while running
    folder.set_status(unit, UnitStatus("failed", 1, "RuntimeError: out of memory"))
    assert folder.status(unit) == UnitStatus("failed", 1, "RuntimeError: out of memory")
    history = [EpochRecord(1, 1.0, 0.5, 0.9, 0.6, 1.0, 0.1, 100.0)]
    model = torch.nn.Linear(2, 2)
    metrics = {key: 1 for key in METRIC_KEYS} | {"seed": 3, "test_accuracy": 0.6, "test_loss": 0.9}
    result = folder.save_result(unit, history, metrics, model.state_dict(), {"labels": torch.zeros(3)}, None)
    assert folder.status(unit) == UnitStatus("finished", 1)
    assert [r.seed for r in folder.results(plan)] == [3] and result.arm == "convnet7"
    assert torch.equal(folder.weights(unit)["weight"], model.weight.detach())
    assert folder.mistakes(unit) is None
    assert (folder.unit_dir(unit) / "history.csv").read_text() == history_csv(history)


def test_a_0_1_folder_reads_as_one_arm_per_model(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "finished", run)
    plan = RunFolder.open(run).read_plan()
    assert plan.format_version == 1
    assert [(a.name, a.folder) for a in plan.arms] == [("tiny_a", "tiny_a"), ("tiny_b", "tiny_b")]
    assert plan.seeds == (0, 1) and plan.arms[0].recipe == Recipe(epochs=2, batch_size=64)
    assert plan.data == DataSelection("mnist", "/tmp/fx/data", split="per-seed")  # 0.1's own validation split
    assert plan.hardware_request == HardwareRequest(precision="fp32")
    assert plan.hardware == Hardware("cpu", "AMD EPYC", "fp32", False, True, 2)  # from the units' metrics
    assert [(r.arm, r.seed) for r in RunFolder(run).results(plan)] == [
        ("tiny_a", 0),
        ("tiny_a", 1),
        ("tiny_b", 0),
        ("tiny_b", 1),
    ]
    interrupted = tmp_path / "interrupted"
    shutil.copytree(FIXTURES / "interrupted", interrupted)
    folder = RunFolder.open(interrupted)
    last = folder.read_plan().units()[-1]
    assert folder.status(last) == UnitStatus("interrupted", 0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "config.toml").write_text("seeds = ["), "is not valid TOML"),
        (lambda p: (p / "config.toml").write_text("format_version = 2\nseeds = [0]\n"), "is damaged (KeyError"),
        (lambda p: (p / "config.toml").write_text("format_version = 9\n"), "format version 9, newer than"),
        (lambda p: (p / "config.toml").unlink(), "config.toml is missing"),
        (lambda p: (p / "tiny_a" / "spec.toml").write_text("layers = 3"), "saved spec is damaged"),
        (lambda p: (p / "tiny_a" / "spec.toml").unlink(), "spec.toml is missing"),
    ],
)
def test_damaged_plans_are_one_clear_error(tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "finished", run)
    damage(run)
    with pytest.raises(RunError, match=message.replace("(", r"\(")):
        RunFolder.open(run).read_plan()


def test_opening_something_that_is_not_a_run_folder(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        RunFolder.open(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is not a folder"):
        RunFolder.open(tmp_path / "file")
    with pytest.raises(RunError, match="config.toml is missing"):
        RunFolder.open(tmp_path)
