"""Sweeps: sweep files and repeated options expand into arms; bad sweep files are refused in one
line before anything runs; a diverging unit fails alone and the sweep completes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnlab import api
from cnnlab.cli import main
from cnnlab.config import Recipe
from cnnlab.errors import ConfigError
from cnnlab.options import parse_option
from cnnlab.sweep import expand_grid, load_sweep
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

SWEEP = """
models = ["convnet7", "small.toml"]
seeds = 2

[data]
dataset = "mnist"
limit_train = 64
val_split = 0.25

[recipe]
epochs = 1

[grid]
learning_rate = [0.001, 0.0003]
schedule = ["plateau:factor=0.5,patience=1", "cosine:decay_steps=10"]
"""


@pytest.fixture()
def sweep_file(tmp_path) -> Path:
    (tmp_path / "small.toml").write_text(SMALL_SPEC)
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    return path


def test_a_sweep_file_expands_models_by_grid_by_seeds(sweep_file):
    sweep = load_sweep(sweep_file)
    assert sweep.models == ("convnet7", str(sweep_file.parent / "small.toml"))  # spec paths beside the file
    assert sweep.seeds == (0, 1) and sweep.data.val_split == 0.25
    assert [(r.learning_rate, r.schedule.KIND) for r in sweep.recipes] == [
        (0.001, "plateau"), (0.001, "cosine"), (0.0003, "plateau"), (0.0003, "cosine")]  # fmt: skip
    plan = api.plan_sweep(sweep_file)
    assert len(plan.arms) == 8 and len(plan.units()) == 16
    assert plan.arms[1].name == "convnet7@schedule=cosine:decay_steps=10"
    assert plan.arms[2].name == "convnet7@lr=0.0003"
    assert len({arm.folder for arm in plan.arms}) == 8


@pytest.mark.parametrize("text, message", [
    ("models = []", "models must be a non-empty list"),
    ('models = ["convnet7"]\n[grid]\nbogus = [1, 2]', "unknown setting 'bogus' in the grid"),
    ('models = ["convnet7"]\n[grid]\nlearning_rate = []', "grid setting 'learning_rate' needs a non-empty list"),
    ('models = ["convnet7"]\n[grid]\nlearning_rate = 0.1', "grid setting 'learning_rate' needs a non-empty list"),
    ('models = ["convnet7"]\n[grid]\nepochs = [1, 1]', "grid setting 'epochs' repeats a value"),
    ('models = ["convnet7"]\n[grid]\nlearning_rate = [-1.0]', "--lr must be a positive number"),
    ('models = ["convnet7"]\n[grid]\nschedule = ["warp:x=1"]', "--schedule 'warp:x=1': start with one of"),
    ('models = ["convnet7"]\nseeds = 0', "seeds must be a count like 3"),
    ('models = ["convnet7"]\n[data]\nbogus = 1', "unexpected keyword argument 'bogus'"),
    ('models = ["convnet7"]\ncolour = "red"', "unknown key 'colour'"),
    ("models = [", "not valid TOML"),
])  # fmt: skip
def test_bad_sweep_files_are_refused_in_one_line_before_anything_runs(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_million_units_need_yes(tmp_path, capsys):
    path = tmp_path / "huge.toml"
    path.write_text('models = ["convnet7"]\nseeds = 1000\n[grid]\nepochs = [' + ", ".join(map(str, range(1, 1001)))
                    + "]\n")  # fmt: skip
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "the plan has 1,000,000 units (1,000 arms x 1000 seeds), more than 1,000" in err and "--yes" in err
    assert not (tmp_path / "runs").exists()


def test_repeating_an_option_makes_one_arm_per_combination(monkeypatch, capsys):
    plans = []

    def prepare(plan, **kwargs):
        plans.append(plan)
        raise SystemExit(0)

    monkeypatch.setattr(api, "prepare", prepare)
    monkeypatch.delenv("CNNLAB_DATA_DIR", raising=False)
    main(["compare", "convnet7", "--lr", "0.001", "--lr", "0.0003", "--batch-size", "64", "--batch-size", "128",
          "--epochs", "3"])  # fmt: skip
    (plan,) = plans
    assert [(a.recipe.batch_size, a.recipe.learning_rate, a.recipe.epochs) for a in plan.arms] == [
        (64, 0.001, 3), (64, 0.0003, 3), (128, 0.001, 3), (128, 0.0003, 3)]  # fmt: skip
    assert [a.name for a in plan.arms] == ["convnet7", "convnet7@lr=0.0003", "convnet7@batch=128",
                                           "convnet7@batch=128,lr=0.0003"]  # fmt: skip


def test_grid_values_may_be_tables_or_text():
    recipes = expand_grid({"epochs": 2}, {"early_stopping": ["patience=2", {"patience": 3}]}, "x")
    assert [r.early_stopping for r in recipes] == [parse_option("patience=2", "early_stopping"),
                                                   parse_option("patience=3", "early_stopping")]  # fmt: skip
    with pytest.raises(ConfigError, match="x: unknown recipe key"):
        Recipe.from_dict({"bogus": 1}, source="x")


def test_a_diverging_unit_fails_alone_and_the_sweep_completes(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(128, 32))
    (tmp_path / "small.toml").write_text(SMALL_SPEC)
    path = tmp_path / "sweep.toml"
    path.write_text('models = ["small.toml"]\nseeds = 1\n[data]\nlimit_train = 64\n[recipe]\nepochs = 2\n'
                    '[grid]\nlearning_rate = [0.001, 1e30]\n')  # fmt: skip
    code = main(["sweep", str(path), "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 1  # a unit failed: the exit status says so, after the report
    assert "small@lr=1e+30 seed 0 failed: FloatingPointError: training diverged" in err
    (run,) = (tmp_path / "runs").iterdir()
    comparison = json.loads((run / "comparison.json").read_text())
    assert [m["model"] for m in comparison["models"]] == ["small"]  # the statistics leave the failed unit out
    assert "Failed: small@lr=1e+30 seed 0 (FloatingPointError: training diverged" in (
        run / "report.html").read_text()  # fmt: skip
