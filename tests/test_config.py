"""The run plan's configuration: recipe keys, arms and their folder names, seeds, the reproduce command."""

from __future__ import annotations

import dataclasses

import pytest

from cnnlab.catalog import load_spec
from cnnlab.config import (
    DataSelection,
    HardwareRequest,
    Recipe,
    make_arms,
    parse_seeds,
    reproduce_args,
    safe_folder_name,
)
from cnnlab.errors import ConfigError


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epochs", 0, "--epochs must be an integer >= 1, got 0"),
        ("epochs", 2.5, "--epochs must be an integer >= 1, got 2.5"),
        ("batch_size", -1, "--batch-size must be an integer >= 1"),
        ("learning_rate", 0.0, "--lr must be a positive number"),
        ("learning_rate", float("nan"), "--lr must be a positive number"),
        ("beta_1", 1.0, "recipe key 'beta_1' must be in (0, 1)"),
        ("epsilon", -1e-7, "recipe key 'epsilon' must be a positive number"),
    ],
)
def test_each_recipe_key_is_checked_where_it_is_defined(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe(**{key: value})


def test_recipe_round_trips_and_refuses_unknown_keys():
    recipe = Recipe(epochs=3, learning_rate=3e-4)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict({"epochs": 3}) == Recipe(epochs=3)  # missing keys take their default
    with pytest.raises(ConfigError, match="config.toml: unknown recipe key 'bogus'; known keys: batch_size"):
        Recipe.from_dict({"bogus": 1}, source="config.toml")


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"device": "cuda:x"}, "--device must be"),
        ({"precision": "fp8"}, "--precision must be auto, fp32 or bf16"),
        ({"compile": "yes"}, "--compile must be auto, on or off"),
    ],
)
def test_hardware_requests_are_checked(request_fields, message):
    with pytest.raises(ConfigError, match=message):
        HardwareRequest(**request_fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"limit_train": 0}, "--limit-train must be an integer >= 1"),
        ({"limit_test": -3}, "--limit-test must be an integer >= 1"),
        ({"val_split": 1.0}, r"--val-split must be in \[0, 1\)"),
    ],
)
def test_data_selections_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataSelection(**fields)


def test_one_recipe_gives_arms_named_and_filed_after_their_models():
    specs = [load_spec("convnet3"), load_spec("convnet7")]
    arms = make_arms(specs, [Recipe()])
    assert [(a.name, a.folder) for a in arms] == [("convnet3", "convnet3"), ("convnet7", "convnet7")]


def test_arms_of_one_model_are_named_after_what_differs():
    spec = load_spec("convnet7")
    arms = make_arms([spec], [Recipe(), Recipe(learning_rate=3e-4), Recipe(learning_rate=3e-4, batch_size=64)])
    assert [a.name for a in arms] == ["convnet7", "convnet7@lr=0.0003", "convnet7@batch=64,lr=0.0003"]
    folders = [a.folder for a in arms]
    assert len(set(folders)) == 3 and all(safe_folder_name(f) == f for f in folders)
    assert folders[1].startswith("convnet7-lr-0.0003-")  # readable, with a hash of the original name


def test_same_model_twice_or_same_recipe_twice_is_refused():
    spec = load_spec("convnet7")
    with pytest.raises(ConfigError, match="two models are named 'convnet7'"):
        make_arms([spec, spec], [Recipe()])
    with pytest.raises(ConfigError, match="two recipes are the same"):
        make_arms([spec], [Recipe(), Recipe()])


@pytest.mark.parametrize(
    "name",
    [
        "convnet3",
        "my-model_2.v1",
        "../../etc/x",
        "/abs/path",
        "..",
        ".",
        ".hidden",
        "a/b",
        "a\\b",
        "nul\x00byte",
        "x" * 300,
        "config.toml",
        "comparison.md",
        "résumé",
        "",
        "  ",
        "a b",
        "-",
        "CON",
    ],
)
def test_folder_names_never_choose_a_path(name):
    folder = safe_folder_name(name)
    assert 1 <= len(folder) <= 64
    assert folder not in (".", "..") and not folder.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in folder)
    assert not folder.endswith((".toml", ".json", ".md", ".csv", ".html", ".png", ".svg", ".pt"))
    if name == "convnet3" or name == "my-model_2.v1":
        assert folder == name  # safe names are kept as they are


def test_changed_names_cannot_collide():
    names = ["a/b", "a\\b", "a:b", "a b", "a-b-"]
    assert len({safe_folder_name(n) for n in names}) == len(names)


@pytest.mark.parametrize(
    "seed, seeds, expected",
    [
        (0, None, (0,)),
        (5, None, (5,)),
        (2, "3", (2, 3, 4)),
        (0, "4,1,7", (4, 1, 7)),
        (0, "1,", (1,)),
    ],
)
def test_seeds(seed, seeds, expected):
    assert parse_seeds(seed, seeds) == expected


@pytest.mark.parametrize(
    "seed, seeds, message",
    [
        (0, "a,b", "give a count like 3"),
        (0, "0", "give a positive count"),
        (0, "1,1", "distinct"),
        (-5, None, "seeds must be non-negative, got -5"),
        (0, "-1,2", "non-negative"),
    ],
)
def test_bad_seeds(seed, seeds, message):
    with pytest.raises(ConfigError, match=message):
        parse_seeds(seed, seeds)


def test_reproduce_args_name_every_setting():
    from cnnlab.config import Hardware, RunPlan

    arms = make_arms([load_spec("convnet7")], [Recipe(epochs=2, learning_rate=3e-4)])
    plan = RunPlan(
        arms,
        (1, 2),
        DataSelection("fashion-mnist", "/data", 100, None, 0.1),
        HardwareRequest("cpu", "fp32", "off"),
        Hardware("cpu", "x", "fp32", False, True, 2),
    )
    assert reproduce_args(plan, ["convnet7"]) == [
        "cnnlab",
        "compare",
        "convnet7",
        "--dataset",
        "fashion-mnist",
        "--seeds",
        "1,2",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--lr",
        "0.0003",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--compile",
        "off",
        "--limit-train",
        "100",
        "--val-split",
        "0.1",
        "--data-dir",
        "/data",
    ]
    assert dataclasses.asdict(plan.data)["limit_test"] is None
