"""The run plan's configuration: recipe keys, arms and their folder names, seeds, the reproduce command."""

from __future__ import annotations

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
        ("epochs", -1, "--epochs must be an integer >= 0, got -1"),  # 0: only with --init-from (the plan checks)
        ("epochs", 2.5, "--epochs must be an integer >= 0, got 2.5"),
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
    with pytest.raises(
        ConfigError, match="config.toml: unknown recipe key 'bogus'; known keys: augmentation, batch_size"
    ):
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
    from cnnlab.options import parse_option

    recipe = Recipe(epochs=2, learning_rate=3e-4, optimizer="sgd", momentum=0.9, nesterov=True,
                    schedule=parse_option("plateau:factor=0.5,patience=2", "schedule"),
                    early_stopping=parse_option("patience=3,restore_best_weights=true", "early_stopping"),
                    augmentation=parse_option("translate=0.1", "augmentation"))  # fmt: skip
    arms = make_arms([load_spec("convnet7")], [recipe])
    data = DataSelection("fashion-mnist", "/data", 100, None, 0.1, split_seed=4)
    plan = RunPlan(
        arms, (1, 2), data, HardwareRequest("cpu", "fp32", "off"), Hardware("cpu", "x", "fp32", False, True, 2)
    )
    assert reproduce_args(plan, ["convnet7"]) == [
        "cnnlab", "compare", "convnet7", "--dataset", "fashion-mnist", "--seeds", "1,2", "--epochs", "2",
        "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.0003", "--momentum", "0.9", "--nesterov",
        "--schedule", "plateau:factor=0.5,patience=2", "--early-stopping", "patience=3,restore_best_weights=true",
        "--augment", "height_shift=-0.1/0.1,width_shift=-0.1/0.1", "--device", "cpu", "--precision", "fp32",
        "--compile", "off", "--limit-train", "100", "--val-split", "0.1", "--split-seed", "4", "--data-dir", "/data",
    ]  # fmt: skip


def test_options_that_choose_need_a_validation_split():
    from cnnlab.config import check_no_choice_on_test
    from cnnlab.options import parse_option

    for option, text, flag in (("early_stopping", "patience=2", "--early-stopping"),
                               ("best_checkpoint", "on", "--best-checkpoint"),
                               ("schedule", "plateau", "--schedule plateau")):  # fmt: skip
        recipe = Recipe(**{option: parse_option(text, option)})
        with pytest.raises(ConfigError, match=f"^{flag} chooses by val_loss, and without --val-split"):
            check_no_choice_on_test(recipe, DataSelection())
        check_no_choice_on_test(recipe, DataSelection(val_split=0.1))  # held-out images: allowed
    training_metric = Recipe(early_stopping=parse_option("monitor=loss,patience=2", "early_stopping"))
    check_no_choice_on_test(training_metric, DataSelection())  # the training loss chooses nothing on the test set


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"optimizer": "adagrad"}, "--optimizer must be adam, sgd, rmsprop or adamw"),
        ({"momentum": 0.9}, "--momentum applies to sgd and rmsprop, not adam"),
        ({"optimizer": "rmsprop", "nesterov": True}, "--nesterov applies to sgd, not rmsprop"),
        ({"rho": 0.5}, "--rho applies to rmsprop, not adam"),
        ({"weight_decay": -1.0}, "--weight-decay must be a number >= 0"),
        ({"schedule": "plateau"}, "--schedule must be a schedule option"),
    ],
)
def test_optimizer_settings_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        Recipe(**fields)


def test_each_optimizer_takes_its_keras_defaults():
    assert (Recipe().learning_rate, Recipe().weight_decay) == (1e-3, 0.0)
    assert Recipe(optimizer="sgd").learning_rate == 0.01
    assert Recipe(optimizer="adamw").weight_decay == 0.004
    assert Recipe(optimizer="adamw", weight_decay=0.0).weight_decay == 0.0
    assert Recipe(optimizer="sgd") == Recipe(optimizer="sgd", learning_rate=0.01)  # resolved once, compared resolved
