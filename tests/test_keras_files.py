"""Keras model files with their weights: .keras (Keras 3) and legacy .h5 (Keras 2 and 3), both ways.

The fixtures in tests/fixtures/keras_files were written by Keras 3.15 on torch (make_fixtures.py),
except the `*_keras224.h5` files, written there with h5py in Keras 2.2.4's layout. Tests that
compare with Keras's own predictions load Keras (on torch) and skip without it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cnnlab import keras_files
from cnnlab.catalog import load_spec, spec_from_text
from cnnlab.errors import SpecError
from cnnlab.keras_files import (
    KerasArchive,
    is_keras_file,
    keras_archive_bytes,
    keras_config,
    read_keras_file,
    read_keras_spec,
)
from cnnlab.keras_weights import keras_layer_weights, state_dict_from_keras
from cnnlab.models import KerasBatchNorm, build_model
from cnnlab.spec import Conv2D

# Keras 3.15 on torch converts tensors with np.array(x, copy=False), which numpy 2 warns about each time.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

FIXTURES = Path(__file__).parent / "fixtures" / "keras_files"
KERAS3_FILES = [
    f"{name}{suffix}" for name in ("convnet3_small", "batchnorm", "flatten_dense") for suffix in (".keras", ".h5")
]
# Fields Keras 3.15 writes that keras_config leaves out at their defaults, so that Keras 3.6+ loads the file.
NEWER_KERAS_FIELDS = {"optional", "input_axes", "output_axes", "quantization_config"}

# Every layer type and option cnnlab exports; Dense + Activation('softmax') as the head.
ROUND_TRIP_SPEC = """
name = "round_trip"
input_shape = [11, 9, 2]
num_classes = 4

[[layers]]
type = "Conv2D"
filters = 5
kernel_size = [3, 2]
strides = [2, 1]
padding = "same"
activation = "relu"
kernel_initializer = "he_uniform"

[[layers]]
type = "BatchNormalization"

[[layers]]
type = "Activation"
activation = "elu"

[[layers]]
type = "MaxPooling2D"
pool_size = [3, 3]
strides = [2, 2]
padding = "same"

[[layers]]
type = "Conv2D"
filters = 6
kernel_size = 2
use_bias = false
kernel_initializer = "lecun_normal"

[[layers]]
type = "BatchNormalization"
center = false
epsilon = 0.01
momentum = 0.9

[[layers]]
type = "Dropout"
rate = 0.3

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
units = 7
activation = "tanh"
kernel_initializer = "glorot_normal"

[[layers]]
type = "BatchNormalization"
scale = false

[[layers]]
type = "Dense"
units = 4

[[layers]]
type = "Activation"
activation = "softmax"
"""


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def images(shape: tuple[int, ...], count: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


def cnnlab_probabilities(archive: KerasArchive, batch: np.ndarray) -> np.ndarray:
    """Softmax of cnnlab's model with the file's weights, in eval mode, on channels-last images."""
    model = build_model(archive.spec)
    state = state_dict_from_keras(archive.spec, archive.weights, archive.source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing), (missing, unexpected)
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(batch).permute(0, 3, 1, 2)), dim=1).numpy()


def noisy_model(spec, seed: int = 1):
    """build_model with random biases and BatchNormalization parameters and moving statistics."""
    model = build_model(spec, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.normal_(0.0, 0.3, generator=generator)
            if isinstance(module, KerasBatchNorm):
                for name in ("weight", "running_var"):
                    if getattr(module, name) is not None:
                        getattr(module, name).uniform_(0.5, 2.0, generator=generator)
                for name in ("bias", "running_mean"):
                    if getattr(module, name) is not None:
                        getattr(module, name).normal_(0.0, 0.5, generator=generator)
    return model.eval()


def rebuilt(tmp_path: Path, source: str = "convnet3_small.keras", *, edit=None, drop=(), replace=None) -> Path:
    """A copy of a fixture .keras with members dropped or replaced, or its weights file edited with h5py."""
    with zipfile.ZipFile(FIXTURES / source) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name not in drop}
    if edit is not None:
        stream = io.BytesIO(members["model.weights.h5"])
        with h5py.File(stream, "r+") as h5:
            edit(h5)
        members["model.weights.h5"] = stream.getvalue()
    members.update(replace or {})
    path = tmp_path / source
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def edited_h5(tmp_path: Path, source: str, edit) -> Path:
    path = tmp_path / source
    shutil.copy(FIXTURES / source, path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


# ---------------------------------------------------------------------------------------------
# Reading what Keras wrote


@pytest.mark.parametrize("name", KERAS3_FILES)
def test_keras3_files_predict_like_keras(keras, name):
    path = FIXTURES / name
    archive = read_keras_file(path)
    assert archive.keras_version == "3.15.1" and archive.source == str(path)
    assert all(array.dtype == np.float32 for arrays in archive.weights for array in arrays.values())
    batch = images(archive.spec.input_shape)
    expected = keras.saving.load_model(path, compile=False).predict(batch, verbose=0)
    assert expected.max(axis=1).min() < 0.95  # not saturated: a misplaced weight shows
    np.testing.assert_allclose(cnnlab_probabilities(archive, batch), expected, atol=1e-5, rtol=0)


def test_keras3_batchnorm_variants_and_moving_statistics_are_read():
    """Which of gamma/beta exist follows scale/center; moving statistics are the saved ones, not 0 and 1."""
    archive = read_keras_file(FIXTURES / "batchnorm.keras")
    batchnorms = [
        (layer, arrays)
        for layer, arrays in zip(archive.spec.layers, archive.weights)
        if layer.type == "BatchNormalization"
    ]
    assert [(layer.scale, layer.center, sorted(arrays)) for layer, arrays in batchnorms] == [
        (True, True, ["beta", "gamma", "moving_mean", "moving_variance"]),
        (False, True, ["beta", "moving_mean", "moving_variance"]),
        (True, False, ["gamma", "moving_mean", "moving_variance"]),
        (False, False, ["moving_mean", "moving_variance"]),
    ]
    assert [layer.epsilon for layer, _ in batchnorms] == [0.001, 0.01, 0.001, 0.001]
    assert all(abs(arrays["moving_mean"]).max() > 0.05 for _, arrays in batchnorms)
    assert all(abs(arrays["moving_variance"] - 1).max() > 0.05 for _, arrays in batchnorms)
    h5 = read_keras_file(FIXTURES / "batchnorm.h5")
    for ours, theirs in zip(archive.weights, h5.weights):  # the same model saved both ways
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_keras224_h5_reads_with_its_spec_and_weights():
    path = FIXTURES / "convnet_keras224.h5"
    archive = read_keras_file(path)
    spec = archive.spec
    assert archive.keras_version == "2.2.4"
    assert spec.name == "convnet_keras224" and spec.input_shape == (9, 9, 2) and spec.num_classes == 4
    assert [layer.type for layer in spec.layers] == [
        "Conv2D",
        "BatchNormalization",
        "Conv2D",
        "MaxPooling2D",
        "Dropout",
        "Flatten",
        "Dense",
        "Dense",
    ]
    assert spec.layer_names()[:3] == ["conv2d_1", "batch_normalization_1", "conv2d_2"]
    assert (spec.layers[0].kernel_initializer, spec.layers[6].kernel_initializer) == ("glorot_uniform", "he_normal")
    with h5py.File(path) as h5:  # Keras 2.2.4's own paths, spelt out
        weights = h5["model_weights"]
        assert np.array_equal(archive.weights[0]["kernel"], weights["conv2d_1/conv2d_1/kernel:0"][()])
        assert np.array_equal(archive.weights[0]["bias"], weights["conv2d_1/conv2d_1/bias:0"][()])
        for variable in ("gamma", "beta", "moving_mean", "moving_variance"):
            stored = weights[f"batch_normalization_1/batch_normalization_1/{variable}:0"][()]
            assert np.array_equal(archive.weights[1][variable], stored)
        assert np.array_equal(archive.weights[6]["kernel"], weights["dense_1/dense_1/kernel:0"][()])
    assert archive.weights[3] == archive.weights[4] == archive.weights[5] == {}


def test_keras224_h5_predicts_like_keras_with_the_same_weights(keras):
    """Keras 3 cannot rebuild a Keras 2.2.4 config (batch_input_shape on a Conv2D), but its legacy
    weight loader reads the file's weights into the same architecture."""
    path = FIXTURES / "convnet_keras224.h5"
    archive = read_keras_file(path)
    model = keras.models.model_from_json(json.dumps(keras_config(archive.spec)))
    model.load_weights(path)
    batch = images(archive.spec.input_shape)
    np.testing.assert_allclose(cnnlab_probabilities(archive, batch), model.predict(batch, verbose=0), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Writing .keras files


def test_round_trip_through_keras(keras, tmp_path):
    spec = spec_from_text(ROUND_TRIP_SPEC, source="round_trip.toml", default_name="round_trip")
    model = noisy_model(spec)
    weights = keras_layer_weights(model)
    path = tmp_path / "round_trip.keras"
    path.write_bytes(keras_archive_bytes(spec, weights))

    batch = images(spec.input_shape, count=16)
    with torch.no_grad():
        ours = torch.softmax(model(torch.from_numpy(batch).permute(0, 3, 1, 2)), dim=1).numpy()
    theirs = keras.saving.load_model(path).predict(batch, verbose=0)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs.argmax(axis=1) == ours.argmax(axis=1)).all()
    assert len(set(ours.argmax(axis=1))) > 1  # the comparison covers more than one class

    again = read_keras_file(path)
    assert [dataclasses.replace(layer, name=None) for layer in again.spec.layers] == list(spec.layers)
    assert (again.spec.name, again.spec.input_shape, again.keras_version) == ("round_trip", (11, 9, 2), "3.15.1")
    for ours_arrays, read_arrays in zip(weights, again.weights):
        assert ours_arrays.keys() == read_arrays.keys()
        assert all(np.array_equal(ours_arrays[k], read_arrays[k]) for k in ours_arrays)


def _strip(value):
    """A Keras config without the fields keras_config leaves out at their defaults."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in NEWER_KERAS_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_keras_config_is_what_keras_writes(keras):
    """The same models built in Keras code serialise to keras_config's dicts (names as cnnlab's)."""
    layers = keras.layers
    spec = load_spec("convnet3")
    names = iter(spec.layer_names())
    convnet3 = keras.Sequential(
        [
            keras.Input((28, 28, 1), name="input_layer"),
            layers.Conv2D(32, (3, 3), activation="relu", name=next(names)),
            layers.Conv2D(64, (3, 3), activation="relu", name=next(names)),
            layers.Dropout(0.25, name=next(names)),
            layers.Conv2D(128, (3, 3), activation="relu", name=next(names)),
            layers.MaxPooling2D((2, 2), name=next(names)),
            layers.Dropout(0.25, name=next(names)),
            layers.Flatten(name=next(names)),
            layers.Dense(256, activation="relu", kernel_initializer="he_normal", name=next(names)),
            layers.Dropout(0.5, name=next(names)),
            layers.Dense(10, activation="softmax", name=next(names)),
        ],
        name="convnet3",
    )
    assert keras_config(spec) == _strip(json.loads(convnet3.to_json()))

    spec = spec_from_text(ROUND_TRIP_SPEC, source="round_trip.toml", default_name="round_trip")
    names = iter(spec.layer_names())
    round_trip = keras.Sequential(
        [
            keras.Input((11, 9, 2), name="input_layer"),  # Keras numbers a second one input_layer_1
            layers.Conv2D(
                5, (3, 2), (2, 1), "same", activation="relu", kernel_initializer="he_uniform", name=next(names)
            ),
            layers.BatchNormalization(name=next(names)),
            layers.Activation("elu", name=next(names)),
            layers.MaxPooling2D((3, 3), (2, 2), "same", name=next(names)),
            layers.Conv2D(6, 2, use_bias=False, kernel_initializer="lecun_normal", name=next(names)),
            layers.BatchNormalization(center=False, epsilon=0.01, momentum=0.9, name=next(names)),
            layers.Dropout(0.3, name=next(names)),
            layers.Flatten(name=next(names)),
            layers.Dense(7, activation="tanh", kernel_initializer="glorot_normal", name=next(names)),
            layers.BatchNormalization(scale=False, name=next(names)),
            layers.Dense(4, name=next(names)),
            layers.Activation("softmax", name=next(names)),
        ],
        name="round_trip",
    )
    assert keras_config(spec) == _strip(json.loads(round_trip.to_json()))
    # Keras 2.1's uncorrected truncated normals have no Keras 3 class: written as the corrected one.
    assert keras_files._initializer("he_normal_keras21") == keras_files._initializer("he_normal")


def test_archive_layout_is_keras3s(tmp_path):
    """Members and weight groups as Keras 3 writes them: groups by class (conv2d, conv2d_1, ...), vars by position."""
    spec = load_spec(FIXTURES / "convnet3_small.keras")
    data = keras_archive_bytes(spec, read_keras_file(FIXTURES / "convnet3_small.keras").weights)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["metadata.json", "config.json", "model.weights.h5"]
        assert json.loads(archive.read("metadata.json"))["keras_version"] == "3.15.1"
        with (
            h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as ours,
            zipfile.ZipFile(FIXTURES / "convnet3_small.keras") as keras_archive,
            h5py.File(io.BytesIO(keras_archive.read("model.weights.h5"))) as theirs,
        ):
            layout = lambda h5: sorted(  # noqa: E731
                (name, getattr(node, "shape", None), dict(node.attrs)) for name, node in _walk(h5)
            )
            assert layout(ours) == layout(theirs)


def _walk(h5: h5py.File):
    found = []
    h5.visititems(lambda name, node: found.append((name, node)) if not name.startswith("optimizer") else None)
    return found


def test_keras_weights_and_state_dict_are_inverse_for_every_builtin_model():
    from cnnlab.catalog import builtin_models

    for name in builtin_models():
        spec = load_spec(name)
        model = noisy_model(spec)
        weights = keras_layer_weights(model)
        state = state_dict_from_keras(spec, weights, "weights")
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        assert state.keys() == expected.keys(), name
        assert all(torch.equal(state[k], expected[k]) for k in state), name
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert np.array_equal(weights[0]["kernel"], first_conv.weight.detach().permute(2, 3, 1, 0).numpy())


def test_keras_archive_bytes_checks_the_weights():
    spec = load_spec(FIXTURES / "flatten_dense.keras")
    weights = list(read_keras_file(FIXTURES / "flatten_dense.keras").weights)
    weights[1] = {"kernel": weights[1]["kernel"][:, :6], "bias": weights[1]["bias"]}
    with pytest.raises(
        SpecError, match=r"layer 2 \(Dense 'dense_4'\): kernel has shape \(60, 6\) but the layer expects \(60, 7\)"
    ):
        keras_archive_bytes(spec, weights)


# ---------------------------------------------------------------------------------------------
# The spec alone, and weights onto another spec


def test_load_spec_reads_keras_files_without_their_weights(tmp_path):
    assert (
        is_keras_file("m.keras") and is_keras_file("M.H5") and is_keras_file("m.hdf5") and not is_keras_file("m.json")
    )
    spec = load_spec(str(FIXTURES / "convnet3_small.keras"))
    assert spec == read_keras_file(FIXTURES / "convnet3_small.keras").spec
    assert load_spec(FIXTURES / "convnet_keras224.h5").layers[0] == Conv2D(
        filters=4, kernel_size=(3, 3), activation="relu", name="conv2d_1"
    )
    renamed = tmp_path / "model.h5"  # the content decides the format, not the suffix
    shutil.copy(FIXTURES / "convnet3_small.keras", renamed)
    assert read_keras_file(renamed).spec.layers == spec.layers
    broken = rebuilt(tmp_path, edit=lambda h5: h5.__delitem__("layers/conv2d"))
    assert read_keras_spec(broken).name == "convnet3_small"  # the cheap path does not open the weights
    with pytest.raises(
        SpecError, match=r"missing\.keras: no such spec file; .*\.toml/\.json spec or a Keras \.keras/\.h5 file"
    ):
        load_spec(tmp_path / "missing.keras")


def test_weights_onto_a_different_architecture_name_the_layer():
    archive = read_keras_file(FIXTURES / "convnet3_small.keras")
    layers = list(archive.spec.layers)
    layers[1] = dataclasses.replace(layers[1], filters=5)
    layers[3] = dataclasses.replace(layers[3], filters=5)
    other = dataclasses.replace(archive.spec, name="other", layers=tuple(layers))
    with pytest.raises(
        SpecError,
        match=r"^model\.keras: layer 2 \(conv2d_1, Conv2D\): kernel has shape \(3, 3, 4, 6\) but other expects \(3, 3, 4, 5\); "
        r"the weights come from a different architecture$",
    ):
        state_dict_from_keras(other, archive.weights, "model.keras")
    with pytest.raises(
        SpecError,
        match=r"^model\.keras: layer 1 \(conv2d_1, Conv2D\): kernel has shape \(3, 3, 1, 4\) but convnet3 expects \(3, 3, 1, 32\)",
    ):
        state_dict_from_keras(
            load_spec("convnet3"), archive.weights, "model.keras"
        )  # --init-from onto a built-in model
    with pytest.raises(
        SpecError,
        match=r"^model\.keras: has weights for 4 layers but convnet3_small has 10; the weights must come from a model with the same layers$",
    ):
        state_dict_from_keras(archive.spec, archive.weights[:4], "model.keras")
    missing = [dict(arrays) for arrays in archive.weights]
    del missing[7]["bias"]
    with pytest.raises(
        SpecError, match=r"layer 8 \(dense, Dense\): has no bias; convnet3_small's layer needs bias \(16,\)"
    ):
        state_dict_from_keras(archive.spec, missing, "model.keras")
    extra = [dict(arrays) for arrays in archive.weights]
    extra[6]["kernel"] = np.zeros((1,), np.float32)
    with pytest.raises(
        SpecError, match=r"layer 7 \(flatten, Flatten\): has kernel but convnet3_small's layer takes no weights"
    ):
        state_dict_from_keras(archive.spec, extra, "model.keras")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and the layer), nothing executed


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "lambda.keras",
            r"lambda\.keras, layer 1 \(Lambda 'lambda'\), field 'class_name': layer type Lambda is not supported",
        ),
        (
            "custom_layer.keras",
            r"custom_layer\.keras, layer 1 \(Scale 'scale'\), field 'class_name': layer is the custom class 'MyLab>Scale'",
        ),
        (
            "functional.keras",
            r"functional\.keras: a Keras functional model \(class_name 'Functional'\) is not supported: only Sequential",
        ),
        ("subclassed.keras", r"subclassed\.keras: a Keras 'TwoLayers' model is not supported: only Sequential"),
        (
            "weights_only.weights.h5",
            r"weights_only\.weights\.h5: holds weights only \(no model_config\); .*save the whole model with model\.save",
        ),
        ("weights_only_keras224.h5", r"weights_only_keras224\.h5: holds weights only \(no model_config\)"),
    ],
)
def test_unsupported_keras_files_are_refused(name, message):
    for read in (read_keras_file, read_keras_spec):
        with pytest.raises(SpecError, match=message) as caught:
            read(FIXTURES / name)
        assert "\n" not in str(caught.value)


def _set(h5: h5py.File, path: str, value: np.ndarray | h5py.ExternalLink) -> None:
    del h5[path]
    h5[path] = value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda h5: h5.__delitem__("layers/conv2d_1/vars/1"),
            r"layer 2 \(Conv2D 'conv2d_1'\): model\.weights\.h5 \(group layers/conv2d_1\) has 1 weight array\(s\) but the "
            r"layer needs 2: kernel \(3, 3, 4, 6\), bias \(6,\)",
        ),
        (
            lambda h5: h5.__delitem__("layers/dense_1"),
            r"layer 10 \(Dense 'dense_1'\): no weights in the file \(model\.weights\.h5 \(group layers/dense_1\)\); "
            r"the layer needs kernel \(16, 10\), bias \(10,\)",
        ),
        (
            lambda h5: _set(h5, "layers/dense/vars/0", np.zeros((72, 17), np.float32)),
            r"layer 8 \(Dense 'dense'\): kernel has shape \(72, 17\) in the file but the layer's config expects \(72, 16\)",
        ),
        (
            lambda h5: h5.create_dataset("layers/flatten/vars/0", data=np.zeros(3, np.float32)),
            r"layer 7 \(Flatten 'flatten'\): model\.weights\.h5 \(group layers/flatten\) has 1 weight array\(s\) but a "
            r"Flatten layer has none",
        ),
        (
            lambda h5: h5.create_dataset("layers/conv2d_9/vars/0", data=np.zeros(3, np.float32)),
            r"model\.weights\.h5 has weights under layers/conv2d_9, which is no layer of config\.json",
        ),
        (
            lambda h5: _set(h5, "layers/conv2d/vars/1", np.zeros(4, np.int32)),
            r"layer 1 \(Conv2D 'conv2d'\): bias is stored as int32, not as floating point numbers",
        ),
        (
            lambda h5: _set(h5, "layers/conv2d_2", h5py.ExternalLink("/etc/passwd", "/")),
            r"the HDF5 object '/layers/conv2d_2' is a link \(ExternalLink\); Keras never writes links, and cnnlab does not follow them",
        ),
    ],
    ids=[
        "missing-variable",
        "missing-layer",
        "wrong-shape",
        "weightless-layer",
        "unknown-layer",
        "integers",
        "external-link",
    ],
)
def test_bad_keras_weights_are_refused(tmp_path, edit, message):
    path = rebuilt(tmp_path, edit=edit)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}(, |: ){message}") as caught:
        read_keras_file(path)
    assert "\n" not in str(caught.value)


def _drop_weight_name(h5: h5py.File, layer: str, keep: int) -> None:
    group = h5["model_weights"][layer]
    group.attrs["weight_names"] = group.attrs["weight_names"][:keep]


@pytest.mark.parametrize(
    ("source", "edit", "message"),
    [
        (
            "convnet3_small.h5",
            lambda h5: _drop_weight_name(h5, "conv2d_1", 1),
            r"layer 2 \(Conv2D 'conv2d_1'\): model_weights/conv2d_1 has 1 weight array\(s\) \(kernel\) but the layer needs 2",
        ),
        (
            "convnet3_small.h5",
            lambda h5: _set(h5, "model_weights/dense/convnet3_small/dense/kernel", np.zeros((72, 3), np.float32)),
            r"layer 8 \(Dense 'dense'\): kernel has shape \(72, 3\) in the file but the layer's config expects \(72, 16\)",
        ),
        (
            "convnet_keras224.h5",
            lambda h5: _drop_weight_name(h5, "batch_normalization_1", 3),
            r"layer 2 \(BatchNormalization 'batch_normalization_1'\): model_weights/batch_normalization_1 has 3 weight "
            r"array\(s\) \(gamma, beta, moving_mean\) but the layer needs 4: gamma \(4,\), beta \(4,\), moving_mean \(4,\), "
            r"moving_variance \(4,\)",
        ),
        (
            "convnet_keras224.h5",
            lambda h5: h5.attrs.__delitem__("model_config"),
            r"holds weights only \(no model_config\)",
        ),
    ],
    ids=["missing-variable", "wrong-shape", "keras224-missing-variable", "no-config"],
)
def test_bad_legacy_h5_weights_are_refused(tmp_path, source, edit, message):
    path = edited_h5(tmp_path, source, edit)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}(, |: ){message}"):
        read_keras_file(path)


def _zip_bomb() -> bytes:
    """A tiny .keras whose central directory says model.weights.h5 expands to nearly 4 GiB."""
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"x" * 16)
    data = bytearray(stream.getvalue())
    entry = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    struct.pack_into("<I", data, entry + 24, 0xFFFFFFF0)  # its uncompressed size
    return bytes(data)


def _corrupt_crc(data: bytes) -> bytes:
    data = bytearray(data)
    at = data.find(b'"class_name"')  # inside config.json, stored uncompressed
    data[at + 1] ^= 0x20
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (
            "half.keras",
            lambda: (FIXTURES / "convnet3_small.keras").read_bytes()[:20000],
            r"the \.keras archive is truncated or corrupt \(File is not a zip file\); copy it again or save the model again",
        ),
        (
            "crc.keras",
            lambda: _corrupt_crc((FIXTURES / "convnet3_small.keras").read_bytes()),
            r"the \.keras archive is truncated or corrupt \(Bad CRC-32 for file 'config\.json'\)",
        ),
        (
            "half.h5",
            lambda: (FIXTURES / "convnet3_small.h5").read_bytes()[:20000],
            r"the file is not a readable HDF5 file \(Unable to .*\); it is truncated or corrupt",
        ),
        (
            "text.keras",
            lambda: b"not a model\n",
            r"not a Keras model file \(neither a \.keras zip archive nor an HDF5 \.h5 file\)",
        ),
        ("empty.h5", lambda: b"", r"not a Keras model file"),
        (
            "bomb.keras",
            _zip_bomb,
            r"the \.keras archive's members would expand to 4\.0 GiB, more than cnnlab reads for a model \(2\.0 GiB\); "
            r"refusing it \(a corrupt file or a zip bomb\)",
        ),
    ],
)
def test_broken_files_are_refused_in_one_line(tmp_path, name, make, message):
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: {message}") as caught:
        read_keras_file(path)
    assert "\n" not in str(caught.value)


def test_incomplete_archives_are_refused(tmp_path):
    path = rebuilt(tmp_path, drop=["model.weights.h5"])
    with pytest.raises(
        SpecError,
        match=r"has no model\.weights\.h5 \(it holds config\.json, metadata\.json\), so it is not a whole Keras model",
    ):
        read_keras_file(path)
    path = rebuilt(tmp_path, drop=["config.json"])
    with pytest.raises(SpecError, match=r"has no config\.json \(it holds metadata\.json, model\.weights\.h5\)"):
        read_keras_spec(path)
    weights = (FIXTURES / "convnet3_small.h5").read_bytes()[:9000]
    path = rebuilt(tmp_path, replace={"model.weights.h5": weights})
    with pytest.raises(SpecError, match=r"the archive's model\.weights\.h5 is not a readable HDF5 file"):
        read_keras_file(path)
    path = rebuilt(tmp_path, replace={"config.json": b"{not json"})
    with pytest.raises(SpecError, match=r"the archive's config\.json is not valid JSON"):
        read_keras_file(path)


def test_huge_files_are_refused_before_reading(monkeypatch):
    monkeypatch.setattr(keras_files, "MAX_FILE_BYTES", 10_000)
    for read in (read_keras_file, read_keras_spec):
        with pytest.raises(
            SpecError,
            match=r"convnet3_small\.keras: the file is 44\.\d KiB, more than cnnlab reads for a model \(9\.8 KiB\)",
        ):
            read(FIXTURES / "convnet3_small.keras")
