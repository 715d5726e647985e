"""Keras `model.to_json()` import: Keras's own parameter counts, field mapping, and every rejection.

The fixtures in tests/fixtures/keras were written by real Keras (make_fixtures.py: Keras 3.15.1 and
tf_keras 2.21.0), except two hand-written in older layouts; expected_params.json holds the numbers
Keras reported for each. These tests never import TensorFlow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cnnlab.catalog import load_spec
from cnnlab.errors import SpecError
from cnnlab.keras_json import spec_from_keras_json
from cnnlab.models import build_model, summarize
from cnnlab.spec import Activation, BatchNormalization, Conv2D, Dense, MaxPooling2D, parse_spec, spec_to_dict

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
EXPECTED = json.loads((FIXTURES / "expected_params.json").read_text())


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def keras_layer(data: dict, index: int) -> dict:
    """The config of the index-th layer (1-based, InputLayer not counted, as cnnlab numbers them)."""
    layers = data["config"] if isinstance(data["config"], list) else data["config"]["layers"]
    return [layer for layer in layers if layer["class_name"] != "InputLayer"][index - 1]["config"]


def convert(data: dict):
    return spec_from_keras_json(data, source="model.json", default_name="model")


# ---------------------------------------------------------------------------------------------
# Keras's numbers


def test_fixture_set_covers_every_layout():
    """The notebook's models in every layout, and Keras 2 and 3 files, are all there."""
    assert set(EXPECTED) == {p.name for p in FIXTURES.glob("*.json")} - {
        "expected_params.json",
        "functional_rejected_keras3.json",
        "channels_first_rejected_keras3.json",
    }
    for seed in ("seed_convnet3", "seed_convnet5", "seed_convnet7"):
        assert f"{seed}_keras3.json" in EXPECTED and f"{seed}_keras2.json" in EXPECTED
    assert len([name for name in EXPECTED if not name.startswith("seed_")]) >= 5


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_totals_match_keras(name):
    expected = EXPECTED[name]
    summary = summarize(load_spec(FIXTURES / name))
    assert (summary.total_params, summary.trainable_params, summary.non_trainable_params) == (
        expected["total"],
        expected["trainable"],
        expected["non_trainable"],
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layers_match_keras_summary(name):
    """Each row of cnnlab's summary has Keras's layer name, parameter count and output shape."""
    expected = EXPECTED[name]
    spec = load_spec(FIXTURES / name)
    summary = summarize(spec)
    assert list(spec.input_shape) == expected["input_shape"]
    assert [(row.name, row.layer_type, row.params, list(row.output_shape)) for row in summary.layers] == [
        tuple(layer) for layer in expected["layers"]
    ]
    assert spec.num_classes == expected["layers"][-1][3][-1]


@pytest.mark.parametrize("name", sorted(name for name in EXPECTED if name.startswith("seed_")))
def test_seed_models_import_as_the_builtin_specs(name):
    """The notebook's models, from any Keras version, are exactly cnnlab's built-in specs; except that
    Keras before 2.2.0 (the 2.1.6 file) drew he_normal without the truncation's variance correction,
    which cnnlab calls he_normal_keras21 (keras/initializers.py of 2.1.6 and 2.2.0)."""
    imported = load_spec(FIXTURES / name)
    builtin = load_spec(name.split("_")[1])
    if fixture(name).get("keras_version", "").startswith(("2.0.", "2.1.")):
        builtin = dataclasses.replace(
            builtin,
            layers=tuple(
                dataclasses.replace(layer, kernel_initializer="he_normal_keras21")
                if getattr(layer, "kernel_initializer", None) == "he_normal"
                else layer
                for layer in builtin.layers
            ),
        )
        assert any(getattr(layer, "kernel_initializer", None) == "he_normal_keras21" for layer in builtin.layers)
    assert [dataclasses.replace(layer, name=None) for layer in imported.layers] == list(builtin.layers)
    assert (imported.input_shape, imported.num_classes) == (builtin.input_shape, builtin.num_classes)


# ---------------------------------------------------------------------------------------------
# Fields honoured


def test_convolution_and_pooling_fields():
    layers = load_spec(FIXTURES / "strided_same_rgb20_keras3.json").layers
    assert layers[0] == Conv2D(16, (4, 4), strides=(2, 2), padding="same", activation="relu", name="conv2d")
    assert layers[1] == Conv2D(24, (3, 3), strides=(2, 2), padding="valid", activation="relu", name="conv2d_1")
    assert layers[3] == Conv2D(32, (3, 5), strides=(1, 2), padding="same", activation="relu", name="conv2d_3")
    assert layers[4] == MaxPooling2D((3, 3), strides=(2, 2), padding="same", name="max_pooling2d")
    pools = [
        layer
        for layer in load_spec(FIXTURES / "pooling_variants20_keras3.json").layers
        if isinstance(layer, MaxPooling2D)
    ]
    assert [(p.pool_size, p.strides, p.padding) for p in pools] == [
        ((3, 3), (2, 2), "valid"),
        ((2, 2), (1, 1), "same"),
        ((2, 2), None, "same"),
    ]


def test_bias_and_batchnorm_fields():
    layers = load_spec(FIXTURES / "nobias_batchnorm_conv20_keras3.json").layers
    assert [layer.use_bias for layer in layers if isinstance(layer, (Conv2D, Dense))] == [False] * 4 + [True]
    norms = [layer for layer in layers if isinstance(layer, BatchNormalization)]
    assert [(n.momentum, n.epsilon, n.center, n.scale) for n in norms] == [
        (0.99, 1e-3, True, True),
        (0.9, 1e-5, True, True),
        (0.99, 1e-3, False, True),
        (0.99, 1e-3, True, False),
    ]
    # Keras 2 writes the axis as a list of positive indices: [3] after a convolution, [1] after a Dense.
    keras2 = fixture("batchnorm_rgb20_keras2.json")
    assert [keras_layer(keras2, i)["axis"] for i in (2, 9)] == [[3], [1]]
    assert load_spec(FIXTURES / "batchnorm_rgb20_keras2.json").layers[8].momentum == 0.9


def test_activations_and_initializers():
    layers = load_spec(FIXTURES / "activations_initializers_nonsquare_keras3.json").layers
    assert [
        (layer.activation, layer.kernel_initializer, layer.bias_initializer)
        for layer in layers
        if isinstance(layer, (Conv2D, Dense))
    ] == [
        ("tanh", "lecun_normal", "zeros"),
        ("selu", "lecun_uniform", "ones"),
        ("gelu", "glorot_normal", "zeros"),
        ("silu", "he_uniform", "zeros"),  # Keras 3 writes swish as silu
        ("linear", "he_normal", "zeros"),  # VarianceScaling(2.0, fan_in, truncated_normal)
        ("sigmoid", "glorot_uniform", "zeros"),
        ("elu", "he_normal", "zeros"),
        ("linear", "glorot_uniform", "zeros"),  # VarianceScaling(1.0, fan_avg, uniform)
    ]
    assert [layer.activation for layer in layers if isinstance(layer, Activation)] == [
        "softplus",
        "silu",
        "linear",
        "softmax",
    ]
    # Keras 2.2's VarianceScaling(2.0, fan_in, 'normal') is he_normal; (1.0, fan_avg, uniform) glorot_uniform.
    keras224 = load_spec(FIXTURES / "seed_convnet3_keras224.json").layers
    assert (keras224[0].kernel_initializer, keras224[7].kernel_initializer) == ("glorot_uniform", "he_normal")


@pytest.mark.parametrize(
    "initializer, expected",
    [
        ("he_normal", "he_normal"),
        ({"class_name": "LecunUniform", "config": {"seed": 42}}, "lecun_uniform"),
        (
            {
                "module": "keras.initializers",
                "class_name": "GlorotNormal",
                "config": {"seed": None},
                "registered_name": None,
            },
            "glorot_normal",
        ),
        (
            {
                "class_name": "VarianceScaling",
                "config": {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal", "seed": None},
            },
            "lecun_normal",
        ),
        (
            {"class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_in", "distribution": "uniform"}},
            "he_uniform",
        ),
        ({"class_name": "Constant", "config": {"value": 0}}, "zeros"),
        ({"class_name": "Ones", "config": {"dtype": "float32"}}, "ones"),  # tf.keras 1.x adds the dtype
    ],
)
def test_initializer_forms(initializer, expected):
    data = fixture("seed_convnet3_keras3.json")
    keras_layer(data, 1)["kernel_initializer"] = initializer
    assert convert(data).layers[0].kernel_initializer == expected


def test_names_and_description():
    assert load_spec(FIXTURES / "seed_convnet3_keras3.json").name == "seed_convnet3"  # Keras's model name
    spec = load_spec(FIXTURES / "seed_convnet3_keras224.json")  # Keras's default name: the file's instead
    assert spec.name == "seed_convnet3_keras224"
    assert spec.description == "imported from Keras 2.2.4 JSON"
    assert spec.layer_names()[:3] == ["conv2d_1", "conv2d_2", "dropout_1"]


def test_input_shape_sources():
    """Keras 3's InputLayer batch_shape, Keras 2's batch_input_shape on the first layer or build_input_shape."""
    data = fixture("seed_convnet3_keras2.json")
    del data["config"]["layers"][0]  # no InputLayer: the first layer's batch_input_shape
    assert convert(data).input_shape == (28, 28, 1)
    data = fixture("strided_same_rgb20_keras3.json")
    del data["config"]["layers"][0]  # no InputLayer: the Sequential's build_input_shape
    assert convert(data).input_shape == (32, 32, 3)


def test_fields_that_do_not_change_the_model_are_accepted():
    data = fixture("seed_convnet5_keras3.json")
    data["compile_config"] = {"loss": "categorical_crossentropy", "optimizer": "adam", "metrics": ["accuracy"]}
    keras_layer(data, 1)["kernel_initializer"]["config"]["seed"] = 1234
    keras_layer(data, 4)["seed"] = 99  # Dropout's seed
    keras_layer(data, 4)["a_field_keras_adds_later"] = None  # switched off
    keras_layer(data, 16)["fused"] = True  # BatchNormalization kernel choice
    keras_layer(data, 16)["dtype"] = {"class_name": "Policy", "config": {"name": "float32"}}
    assert summarize(convert(data)).total_params == EXPECTED["seed_convnet5_keras3.json"]["total"]


def test_bias_fields_are_not_read_without_a_bias():
    data = fixture("nobias_batchnorm_conv20_keras3.json")
    keras_layer(data, 1)["bias_initializer"] = {"class_name": "RandomNormal", "config": {"stddev": 0.1}}
    assert convert(data).layers[0].use_bias is False


def test_spec_round_trips():
    spec = load_spec(FIXTURES / "activations_initializers_nonsquare_keras3.json")
    assert parse_spec(spec_to_dict(spec), default_name=spec.name) == spec


@pytest.mark.parametrize(
    "name", ["nobias_batchnorm_conv20_keras3.json", "batchnorm_rgb20_keras2.json", "seed_convnet7_keras21_list.json"]
)
def test_builds_and_runs_forward_and_backward(name):
    spec = load_spec(FIXTURES / name)
    model = build_model(spec, seed=0)
    height, width, channels = spec.input_shape
    images = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(0))
    logits = model(images)
    assert logits.shape == (3, spec.num_classes) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (3, spec.num_classes)


# ---------------------------------------------------------------------------------------------
# Rejections: each names the file, the layer (index, Keras class and name) and the field.


def rejection(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        convert(data)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "index, field, value, reason",
    [
        (1, "dilation_rate", [2, 2], "no dilated convolutions"),
        (1, "groups", 2, "no grouped convolutions"),
        (1, "data_format", "channels_first", "channels_last"),
        (1, "kernel_regularizer", {"class_name": "L2", "config": {"l2": 0.01}}, "no weight or activity regularizers"),
        (1, "bias_regularizer", {"class_name": "L2", "config": {"l2": 0.01}}, "no weight or activity regularizers"),
        (1, "activity_regularizer", {"class_name": "L1", "config": {"l1": 0.01}}, "no weight or activity regularizers"),
        (1, "kernel_constraint", {"class_name": "MaxNorm", "config": {"max_value": 2}}, "no weight constraints"),
        (1, "activation", "leaky_relu", 'activation "leaky_relu" is not supported'),
        (1, "padding", "causal", "padding must be 'valid' or 'same'"),
        (
            1,
            "kernel_initializer",
            {"class_name": "RandomNormal", "config": {"mean": 0, "stddev": 0.05}},
            'initializer "RandomNormal" is not supported',
        ),
        (
            1,
            "kernel_initializer",
            {
                "class_name": "VarianceScaling",
                "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
            },
            "none of cnnlab's initializers",
        ),
        (
            1,
            "kernel_initializer",
            {"class_name": "HeNormal", "config": {"seed": None, "input_axes": [0]}},
            "input_axes",
        ),
        (1, "trainable", False, "frozen layer"),
        (
            1,
            "dtype",
            {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"}},
            "cnnlab models are float32",
        ),
        (1, "a_new_keras_field", 3, "unknown Conv2D field"),
        (3, "noise_shape", [None, 1, 1, 64], "noise_shape"),
        (5, "data_format", "channels_first", "channels_last"),
        (5, "padding", "full", "padding must be"),
        (10, "quantization_config", {"class_name": "Int8QuantizationConfig", "config": {}}, "quantized"),
        (10, "kernel_constraint", {"class_name": "NonNeg", "config": {}}, "no weight constraints"),
    ],
)
def test_unsupported_field_values(index, field, value, reason):
    data = fixture("seed_convnet3_keras3.json")
    config = keras_layer(data, index)
    config[field] = value
    message = rejection(data)
    label = f"{data['config']['layers'][index]['class_name']} '{config['name']}'"
    assert message.startswith(f"model.json, layer {index} ({label}), field '{field}': ")
    assert reason in message


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("axis", 1, "last (channel) axis"),
        ("axis", [1, 2], "last (channel) axis"),
        ("gamma_initializer", {"class_name": "RandomNormal", "config": {}}, "not supported"),
        ("moving_variance_initializer", {"class_name": "Zeros", "config": {}}, "moving_variance at ones"),
        ("beta_regularizer", {"class_name": "L2", "config": {"l2": 0.1}}, "regularizers"),
        ("renorm", True, "renormalisation"),
        ("synchronized", True, "synchronized"),
        ("virtual_batch_size", 32, "virtual_batch_size"),
    ],
)
def test_unsupported_batchnorm_values(field, value, reason):
    data = fixture("nobias_batchnorm_conv20_keras3.json")
    keras_layer(data, 2)[field] = value  # a BatchNormalization after a convolution
    message = rejection(data)
    assert message.startswith(f"model.json, layer 2 (BatchNormalization 'batch_normalization'), field '{field}': ")
    assert reason in message


def test_batchnorm_axis_must_be_the_channels_after_a_convolution():
    data = fixture("batchnorm_rgb20_keras2.json")
    keras_layer(data, 2)["axis"] = [1]  # Keras 2's axis after a Dense, here after a convolution: height
    assert "field 'axis'" in rejection(data)
    keras_layer(data, 2)["axis"] = [-1]
    assert convert(data).layers[1] == BatchNormalization(name="batch_normalization")


@pytest.mark.parametrize("keras_class", ["LSTM", "Conv1D", "GlobalAveragePooling2D", "ReLU", "Sequential"])
def test_unsupported_layer_types(keras_class):
    data = fixture("seed_convnet3_keras3.json")
    data["config"]["layers"][2]["class_name"] = keras_class
    message = rejection(data)
    assert message.startswith(
        f"model.json, layer 2 ({keras_class} 'conv2d_1'), field 'class_name': "
        f"layer type {keras_class} is not supported; cnnlab imports Conv2D, MaxPooling2D"
    )


def test_custom_layer_class_is_rejected():
    data = fixture("seed_convnet3_keras3.json")
    data["config"]["layers"][2]["module"] = "my_project.layers"
    data["config"]["layers"][2]["registered_name"] = "MyProject>Conv2D"
    assert "custom class" in rejection(data)


def test_functional_model_is_rejected():
    with pytest.raises(SpecError) as info:
        load_spec(FIXTURES / "functional_rejected_keras3.json")
    assert str(info.value) == (
        f"{FIXTURES / 'functional_rejected_keras3.json'}: a Keras functional model "
        "(class_name 'Functional') is not supported: only Sequential models; rebuild it as "
        "keras.Sequential"
    )
    keras2 = fixture("seed_convnet3_keras2.json") | {"class_name": "Model"}  # Keras 2's name for it
    assert rejection(keras2).endswith(
        "a Keras functional model (class_name 'Model') is not supported: only "
        "Sequential models; rebuild it as keras.Sequential"
    )


def test_channels_first_model_is_rejected():
    path = FIXTURES / "channels_first_rejected_keras3.json"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(
        f"{path}, layer 1 (Conv2D 'conv2d_1'), field 'data_format': \"channels_first\" is not supported"
    )


def test_model_without_an_input_shape_is_rejected():
    data = fixture("seed_convnet3_keras3.json")
    del data["config"]["layers"][0], data["config"]["build_input_shape"], data["build_config"]
    assert "no input shape; give it one in Keras with keras.Input(shape=(28, 28, 1))" in rejection(data)


def test_flat_or_unsized_inputs_are_rejected():
    data = fixture("seed_convnet3_keras3.json")
    data["config"]["layers"][0]["config"]["batch_shape"] = [None, 784]
    assert "layer 0 (InputLayer 'input_layer'), field 'batch_shape'" in rejection(data)
    data["config"]["layers"][0]["config"]["batch_shape"] = [None, None, None, 3]
    assert "with fixed sizes" in rejection(data)


def test_keras1_json_is_rejected():
    data = fixture("seed_convnet3_keras224.json") | {"keras_version": "1.2.2"}
    assert "Keras 1.2.2 JSON is not supported" in rejection(data)


def test_cnnlab_validation_still_applies():
    """An importable layer in an impossible place fails cnnlab's own checks, with the same layer index."""
    data = fixture("seed_convnet3_keras3.json")
    keras_layer(data, 2)["activation"] = "softmax"
    assert "model.json, layer 2 (Conv2D), field 'activation': softmax is only supported as the output" in rejection(
        data
    )
    data = fixture("seed_convnet3_keras3.json")
    data["config"]["layers"].insert(9, copy.deepcopy(data["config"]["layers"][9]))  # a Dense after the Dense is fine
    data["config"]["layers"].insert(1, copy.deepcopy(data["config"]["layers"][7]))  # a Flatten first is not
    assert "layer 2 (Conv2D): needs a 4-D input" in rejection(data)
