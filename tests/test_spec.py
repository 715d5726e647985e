"""Spec parsing and validation: every bad spec names the file, the layer and the field."""

from __future__ import annotations

import json

import pytest

from cnnlab.catalog import builtin_models, load_spec
from cnnlab.errors import SpecError
from cnnlab.spec import Conv2D, parse_spec, spec_to_dict, spec_to_toml

GOOD = """
name = "tiny"
input_shape = [28, 28, 1]
num_classes = 10

[[layers]]
type = "Conv2D"
filters = 8
kernel_size = 3
activation = "relu"

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
units = 10
activation = "softmax"
"""


def write(tmp_path, text, name="model.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_spec_parses_with_keras_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    conv = spec.layers[0]
    assert isinstance(conv, Conv2D)
    assert conv.kernel_size == (3, 3) and conv.strides == (1, 1) and conv.padding == "valid"
    assert conv.kernel_initializer == "glorot_uniform" and conv.bias_initializer == "zeros"
    assert spec.output_shapes() == [(26, 26, 8), (5408,), (10,)]


def test_json_spec_is_accepted(tmp_path):
    import tomllib

    data = tomllib.loads(GOOD)
    spec = load_spec(write(tmp_path, json.dumps(data), "model.json"))
    assert spec.name == "tiny" and len(spec.layers) == 3


@pytest.mark.parametrize("name", builtin_models())
def test_builtin_specs_round_trip(name):
    spec = load_spec(name)
    again = parse_spec(spec_to_dict(spec), source="again")
    assert again == spec
    import tomllib

    assert parse_spec(tomllib.loads(spec_to_toml(spec))) == spec


BAD = [
    # (replacement of the Conv2D layer's lines, words the message must contain)
    ('type = "Conv3D"\nfilters = 8', ["layer 1", "field 'type'", "unknown layer type 'Conv3D'"]),
    (
        'type = "Conv2D"\nfilters = 8\nkernel_size = 3\nfliters = 3',
        ["layer 1 (Conv2D)", "field 'fliters'", "unknown field"],
    ),
    ('type = "Conv2D"\nfilters = -8\nkernel_size = 3', ["layer 1 (Conv2D)", "field 'filters'", "positive integer"]),
    ('type = "Conv2D"\nfilters = 8\nkernel_size = 0', ["layer 1 (Conv2D)", "field 'kernel_size'", "positive"]),
    (
        'type = "Conv2D"\nfilters = 8\nkernel_size = 29',
        ["layer 1 (Conv2D)", "field 'kernel_size'", "shrinks to nothing"],
    ),
    ('type = "Conv2D"\nfilters = 8\nkernel_size = 3\npadding = "full"', ["field 'padding'", "'valid' or 'same'"]),
    (
        'type = "Conv2D"\nfilters = 8\nkernel_size = 3\nactivation = "relu6"',
        ["field 'activation'", "unknown activation"],
    ),
    ('type = "Conv2D"\nfilters = 8', ["layer 1 (Conv2D)", "field 'kernel_size'", "required field missing"]),
    ('type = "Dropout"\nrate = 1.0', ["layer 1 (Dropout)", "field 'rate'", "[0, 1)"]),
    ('type = "Dropout"\nrate = -0.1', ["layer 1 (Dropout)", "field 'rate'", "[0, 1)"]),
    (
        'type = "Conv2D"\nfilters = 8\nkernel_size = 3\nkernel_initializer = "orthogonal"',
        ["field 'kernel_initializer'"],
    ),
]


@pytest.mark.parametrize("replacement,words", BAD)
def test_bad_layer_fields_are_named(tmp_path, replacement, words):
    text = GOOD.replace('type = "Conv2D"\nfilters = 8\nkernel_size = 3\nactivation = "relu"', replacement)
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "\n" not in message
    for word in words:
        assert word in message


def test_dense_on_4d_input_needs_flatten(tmp_path):
    path = write(tmp_path, GOOD.replace('[[layers]]\ntype = "Flatten"\n', ""))
    with pytest.raises(SpecError, match=r"layer 2 \(Dense\).*add a Flatten layer before it"):
        load_spec(path)


def test_pooling_that_shrinks_to_nothing(tmp_path):
    text = GOOD.replace('type = "Flatten"', 'type = "MaxPooling2D"\npool_size = 30\n\n[[layers]]\ntype = "Flatten"')
    with pytest.raises(SpecError, match=r"layer 2 \(MaxPooling2D\), field 'pool_size'.*shrinks to nothing"):
        load_spec(write(tmp_path, text))


def test_wrong_number_of_classes(tmp_path):
    with pytest.raises(SpecError, match=r"layer 3 \(Dense\).*num_classes is 5"):
        load_spec(write(tmp_path, GOOD.replace("num_classes = 10", "num_classes = 5")))


def test_hidden_softmax_is_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"layer 1 \(Conv2D\), field 'activation'.*output activation"):
        load_spec(write(tmp_path, GOOD.replace('activation = "relu"', 'activation = "softmax"')))


def test_output_must_be_softmax_or_linear(tmp_path):
    with pytest.raises(SpecError, match=r"layer 3 \(Dense\), field 'activation'.*'softmax'"):
        load_spec(
            write(tmp_path, GOOD.replace('units = 10\nactivation = "softmax"', 'units = 10\nactivation = "relu"'))
        )


def test_trailing_softmax_activation_layer_is_the_output(tmp_path):
    text = (
        GOOD.replace('units = 10\nactivation = "softmax"', "units = 10")
        + '\n[[layers]]\ntype = "Activation"\nactivation = "softmax"\n'
    )
    spec = load_spec(write(tmp_path, text))
    assert spec.output_shapes()[-1] == (10,)


@pytest.mark.parametrize(
    "text,words",
    [
        ("input_shape = [28, 28]\n[[layers]]\ntype = 'Flatten'", ["field 'input_shape'", "three positive integers"]),
        ("input_shape = [28, 28, 1]\nlayers = []", ["field 'layers'", "non-empty"]),
        (
            "input_shape = [28, 28, 1]\ncolour = 'red'\n[[layers]]\ntype = 'Flatten'",
            ["unknown top-level field 'colour'"],
        ),
        ("input_shape = [28, 28, 1\n", ["not valid TOML"]),
    ],
)
def test_bad_top_level(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="unknown model 'convnet9'.*convnet3"):
        load_spec("convnet9")
