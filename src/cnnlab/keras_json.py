"""Keras `model.to_json()` files as cnnlab specs.

Reads the JSON that Keras writes for a Sequential model, in every layout Keras has used for one:

- Keras 3: `{"module": "keras", "class_name": "Sequential", "config": {"layers": [...]}}`, the
  input as an `InputLayer` with `batch_shape`, initializers and dtype policies as
  `{"module": ..., "class_name": ..., "config": ..., "registered_name": ...}`.
- tf.keras 2.x / tf_keras: the input as `batch_input_shape`, on an `InputLayer` and/or on the first
  layer, dtypes as plain strings, `BatchNormalization(axis=[3])`.
- standalone Keras 2.2 and older: initializers as `VarianceScaling` configs; up to Keras 2.1 the
  Sequential `config` is the plain list of layers. Before Keras 2.2.0 VarianceScaling's 'normal'
  lacked the truncation's variance correction (keras/initializers.py of 2.1.6 and 2.2.0), so a
  file whose `keras_version` is older (tf.keras's "2.1.6-tf" counts as 2.1.6) imports its normal
  initializers as `he_normal_keras21` etc.

Every Keras field is looked at. A field that changes the model either maps onto a cnnlab field or,
when cnnlab cannot honour its value (a dilated or grouped convolution, a regularizer, a frozen
layer, channels_first, ...), raises `SpecError` naming the file, the layer and the field: an
imported model is never silently a different model. Fields that don't change the model (names,
seeds, float32 dtypes, build and compile configs) are accepted. The result goes through
`parse_spec`, so an imported model is validated exactly like a TOML spec.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from cnnlab.spec import ACTIVATIONS, INITIALIZERS, ModelSpec, SpecLocation, parse_spec

# Keras class name -> cnnlab layer type. InputLayer is read for the input shape only.
LAYER_CLASSES = {
    "Conv2D": "Conv2D",
    "MaxPooling2D": "MaxPooling2D",
    "MaxPool2D": "MaxPooling2D",
    "Dropout": "Dropout",
    "Flatten": "Flatten",
    "Dense": "Dense",
    "BatchNormalization": "BatchNormalization",
    "BatchNormalizationV1": "BatchNormalization",  # tf.keras in TensorFlow 1.13-1.15
    "BatchNormalizationV2": "BatchNormalization",
    "Activation": "Activation",
}
SUPPORTED = "Conv2D, MaxPooling2D (MaxPool2D), Dropout, Flatten, Dense, BatchNormalization, Activation, InputLayer"
NOT_SEQUENTIAL = "not supported: only Sequential models; rebuild it as keras.Sequential"

# A VarianceScaling config that is one of the named initializers: (scale, mode, distribution) -> name.
# 'normal' is Keras 2's name for the truncated normal (Keras 3 reads it the same way; before Keras
# 2.2.0 it was drawn without the variance correction: LEGACY_NORMALS).
VARIANCE_SCALING = {
    (1.0, "fan_avg", "uniform"): "glorot_uniform",
    (1.0, "fan_avg", "truncated_normal"): "glorot_normal",
    (2.0, "fan_in", "truncated_normal"): "he_normal",
    (2.0, "fan_in", "uniform"): "he_uniform",
    (1.0, "fan_in", "truncated_normal"): "lecun_normal",
    (1.0, "fan_in", "uniform"): "lecun_uniform",
}
# What a Keras < 2.2.0 file's normal initializers are in cnnlab (models.keras_init_).
LEGACY_NORMALS = {name: f"{name}_keras21" for name in ("glorot_normal", "he_normal", "lecun_normal")}


class _Reject(Exception):
    """A Keras value cnnlab cannot honour; the caller adds file, layer and field."""


# ---------------------------------------------------------------------------------------------
# Values


def _show(value: Any) -> str:
    """A value as it reads in the JSON file (null, true, [2, 2], "same"); Keras objects as L2({"l2": 0.01})."""
    if isinstance(value, dict) and isinstance(value.get("class_name"), str):
        return f"{value['class_name']}({_show(value.get('config', {}))})"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _snake(name: str) -> str:
    """Keras class names to cnnlab's names: GlorotUniform -> glorot_uniform, HeNormal -> he_normal."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _is_keras_module(module: Any) -> bool:
    """Serialised objects from Keras itself (not a user's subclass registered under the same name)."""
    return module is None or (isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras", "tensorflow"))


def _check_builtin(obj: dict, what: str) -> None:
    if not _is_keras_module(obj.get("module")):
        raise _Reject(
            f"{what} from module {obj.get('module')!r} is a custom class, not Keras's own; "
            "cnnlab only imports Keras's built-in classes"
        )
    registered = obj.get("registered_name")
    if registered not in (None, obj.get("class_name"), "function"):
        raise _Reject(f"{what} is the custom class {registered!r}; cnnlab only imports Keras's built-in classes")


def _dtype_name(value: Any) -> Any:
    """'float32' from "float32" or a dtype policy {"class_name": "DTypePolicy", "config": {"name": ...}}."""
    if isinstance(value, dict):
        config = value.get("config")
        return config.get("name") if isinstance(config, dict) else config
    return value


def _float32(value: Any) -> dict:
    name = _dtype_name(value)
    if name not in (None, "float32"):
        raise _Reject(
            f"dtype {_show(name)} is not supported: cnnlab models are float32 (mixed precision is a "
            "training choice: cnnlab train --precision bf16); rebuild with the default dtype"
        )
    return {}


def _activation(value: Any) -> str:
    """A Keras activation as cnnlab's name; None is Keras's 'no activation'."""
    if value is None:
        return "linear"
    if isinstance(value, dict):  # Keras 3 may write a function as {"class_name": "function", "config": "relu"}
        _check_builtin(value, "activation")
        if value.get("class_name") == "function" and isinstance(value.get("config"), str):
            value = value["config"]
    if isinstance(value, str) and value in ACTIVATIONS:
        return value
    raise _Reject(f"activation {_show(value)} is not supported; cnnlab supports: {', '.join(ACTIVATIONS)}")


def _initializer(value: Any) -> str:
    """A serialised Keras initializer as cnnlab's name (glorot_uniform, he_normal, ...)."""
    if isinstance(value, str):
        name, config = _snake(value), {}
    elif isinstance(value, dict) and isinstance(value.get("class_name"), str):
        _check_builtin(value, "initializer")
        name, config = _snake(value["class_name"]), value.get("config") or {}
        if not isinstance(config, dict):
            raise _Reject(f"initializer {_show(value)} has an unreadable config")
    else:
        raise _Reject(f"initializer {_show(value)} is not a Keras initializer")
    config = dict(config)
    config.pop("seed", None)  # seeds only pick the draw, not the distribution
    _float32(config.pop("dtype", None))  # tf.keras 1.x writes the initializer's dtype
    if name == "variance_scaling":
        scale, mode, distribution = (
            config.pop("scale", 1.0),
            config.pop("mode", "fan_in"),
            config.pop("distribution", "truncated_normal"),
        )
        distribution = "truncated_normal" if distribution == "normal" else distribution
        named = next(
            (
                named
                for (s, m, d), named in VARIANCE_SCALING.items()
                if isinstance(scale, (int, float)) and math.isclose(scale, s) and (mode, distribution) == (m, d)
            ),
            None,
        )
        if named is None:
            raise _Reject(
                f"VarianceScaling(scale={_show(scale)}, mode={_show(mode)}, distribution={_show(distribution)}) "
                "is none of cnnlab's initializers (glorot, he or lecun; uniform or truncated normal)"
            )
        name = named
    elif name == "constant" and config.get("value") in (0, 1) and not isinstance(config.get("value"), bool):
        name = "zeros" if config.pop("value") == 0 else "ones"
    if name not in INITIALIZERS:
        raise _Reject(
            f"initializer {_show(value.get('class_name') if isinstance(value, dict) else value)} is not "
            f"supported; cnnlab supports: {', '.join(INITIALIZERS)}"
        )
    for key, extra in config.items():  # e.g. Keras 3.15's input_axes/output_axes, which change the fans
        if extra is not None:
            raise _Reject(f"initializer {name} with {key} = {_show(extra)} is not supported; only the default")
    return name


def _pair_of_ones(value: Any) -> bool:
    return value in (1, [1], [1, 1], (1, 1))


# ---------------------------------------------------------------------------------------------
# Fields: each Keras config key maps to a function (value) -> cnnlab fields, raising _Reject.

Handler = Callable[[Any], dict]


def _keep(target: str, convert: Callable[[Any], Any] = lambda v: v) -> Handler:
    """A field cnnlab honours: copied (converted) into the cnnlab layer."""
    return lambda value: {target: convert(value)}


def _accept(value: Any) -> dict:
    """A field that doesn't change the model (names, seeds)."""
    return {}


def _require(allowed: Callable[[Any], bool], why: str) -> Handler:
    """A field cnnlab cannot honour except at its default."""

    def check(value: Any) -> dict:
        if not allowed(value):
            raise _Reject(f"{_show(value)} is not supported: {why}")
        return {}

    return check


def _null(what: str) -> Handler:
    return _require(lambda v: v is None, f"cnnlab has no {what}; remove it (set it to None) in Keras")


def _padding(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("valid", "same"):
        return value.lower()
    raise _Reject(f"{_show(value)} is not supported; padding must be 'valid' or 'same'")


def _trainable(value: Any) -> dict:
    if value is not True and value is not None:
        raise _Reject(
            f"{_show(value)} is not supported: a frozen layer changes which parameters train and "
            "cnnlab trains every layer; set trainable=True"
        )
    return {}


_CHANNELS_LAST = _require(
    lambda v: v in (None, "channels_last"),
    "cnnlab is channels_last (height, width, channels) only; rebuild with data_format='channels_last'",
)
_REGULARIZER = _null("weight or activity regularizers")
_CONSTRAINT = _null("weight constraints")

# Every layer's config may have these.
COMMON: dict[str, Handler] = {
    "name": _keep("name"),
    "trainable": _trainable,
    "dtype": _float32,
    "batch_input_shape": _accept,  # read as the input shape
    "batch_shape": _accept,
    "batch_size": _accept,
}

KERNEL_FIELDS: dict[str, Handler] = {
    "activation": _keep("activation", _activation),
    "use_bias": _keep("use_bias"),
    "kernel_initializer": _keep("kernel_initializer", _initializer),
    "bias_initializer": _keep("bias_initializer", _initializer),
    "kernel_regularizer": _REGULARIZER,
    "bias_regularizer": _REGULARIZER,
    "activity_regularizer": _REGULARIZER,
    "kernel_constraint": _CONSTRAINT,
    "bias_constraint": _CONSTRAINT,
}

FIELDS: dict[str, dict[str, Handler]] = {
    "Conv2D": {
        **KERNEL_FIELDS,
        "filters": _keep("filters"),
        "kernel_size": _keep("kernel_size"),
        "strides": _keep("strides"),
        "padding": _keep("padding", _padding),
        "data_format": _CHANNELS_LAST,
        "dilation_rate": _require(_pair_of_ones, "cnnlab has no dilated convolutions; use dilation_rate=1"),
        "groups": _require(lambda v: v in (None, 1), "cnnlab has no grouped convolutions; use groups=1"),
        "lora_rank": _require(lambda v: not v, "LoRA layers are not supported"),
        "lora_alpha": _accept,  # only read with a lora_rank
    },
    "MaxPooling2D": {
        "pool_size": _keep("pool_size"),
        "strides": _keep("strides"),
        "padding": _keep("padding", _padding),
        "data_format": _CHANNELS_LAST,
    },
    "Dropout": {
        "rate": _keep("rate"),
        "seed": _accept,
        "noise_shape": _null("dropout noise_shape (dropout masks are per element)"),
    },
    "Flatten": {
        "data_format": _CHANNELS_LAST,
    },
    "Dense": {
        **KERNEL_FIELDS,
        "units": _keep("units"),
        "lora_rank": _require(lambda v: not v, "LoRA layers are not supported"),
        "lora_alpha": _accept,
        "quantization_config": _null("quantized layers"),
    },
    "BatchNormalization": {
        "axis": _accept,  # checked against the input's rank in _check_batchnorm
        "momentum": _keep("momentum"),
        "epsilon": _keep("epsilon"),
        "center": _keep("center"),
        "scale": _keep("scale"),
        "beta_initializer": _accept,  # checked in _check_batchnorm
        "gamma_initializer": _accept,
        "moving_mean_initializer": _accept,
        "moving_variance_initializer": _accept,
        "beta_regularizer": _REGULARIZER,
        "gamma_regularizer": _REGULARIZER,
        "beta_constraint": _CONSTRAINT,
        "gamma_constraint": _CONSTRAINT,
        "synchronized": _require(lambda v: not v, "cnnlab has no cross-device (synchronized) batch normalisation"),
        "renorm": _require(lambda v: not v, "cnnlab has no batch renormalisation"),
        "renorm_clipping": _accept,  # only read with renorm
        "renorm_momentum": _accept,
        "fused": _accept,  # which kernel computes it, not what
        "virtual_batch_size": _null("ghost batch normalisation (virtual_batch_size)"),
        "adjustment": _null("batch normalisation adjustment functions"),
    },
    "Activation": {
        "activation": _keep("activation", _activation),
    },
}

# BatchNormalization initializers cnnlab's layer uses: beta 0, gamma 1, moving mean 0, moving variance 1.
BATCHNORM_INITIALIZERS = {
    "beta_initializer": "zeros",
    "gamma_initializer": "ones",
    "moving_mean_initializer": "zeros",
    "moving_variance_initializer": "ones",
}


# ---------------------------------------------------------------------------------------------
# The model


def _before_keras_2_2(version: Any) -> bool:
    """Whether a `keras_version` ("2.1.6", "2.0.8", tf.keras's "2.1.6-tf") is older than 2.2.0."""
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return match is not None and (int(match[1]), int(match[2])) < (2, 2)


def spec_from_keras_json(data: dict, source: str, default_name: str) -> ModelSpec:
    """A `ModelSpec` from the parsed JSON of Keras's `model.to_json()` (Keras 2 or 3, Sequential)."""
    where = SpecLocation(source)
    class_name = data.get("class_name")
    version = data.get("keras_version")
    if isinstance(version, str) and version.startswith("1."):
        raise where.error(
            f"Keras {version} JSON is not supported (Keras 1 layer arguments); load the model in "
            "Keras 2 or 3 and save it again with model.to_json()"
        )
    if class_name in ("Functional", "Model"):
        raise where.error(f"a Keras functional model (class_name {class_name!r}) is {NOT_SEQUENTIAL}")
    if not _is_keras_module(data.get("module")):
        raise where.error(f"the custom model class {class_name!r} from module {data['module']!r} is {NOT_SEQUENTIAL}")
    if class_name != "Sequential":
        raise where.error(f"a Keras {class_name!r} model is {NOT_SEQUENTIAL}")
    config = data.get("config")
    if isinstance(config, list):  # Keras <= 2.1: the config is the list of layers
        config = {"layers": config}
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list) or not config["layers"]:
        raise where.error("a Sequential model's config needs a non-empty list of layers", field_name="config.layers")
    for key, check in (("trainable", _trainable), ("dtype", _float32)):
        try:
            check(config.get(key))
        except _Reject as exc:
            raise where.error(str(exc), field_name=key) from None

    input_shape = None
    layers = []
    rank = 4  # of the current activation, with the batch axis: 4 until a Flatten, then 2
    for raw in config["layers"]:
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("class_name"), str)
            or not isinstance(raw.get("config"), dict)
        ):
            raise where.error('each layer must be {"class_name": ..., "config": {...}}', len(layers) + 1)
        keras_class, layer_config = raw["class_name"], raw["config"]
        label = f"{keras_class} '{layer_config.get('name', raw.get('name', '?'))}'"
        if keras_class == "InputLayer":
            if layers or input_shape is not None:
                raise where.error("an InputLayer must come first", len(layers), label)
            input_shape = _input_shape(layer_config, where, 0, label, input_layer=True)
            continue
        index = len(layers) + 1
        if input_shape is None and index == 1:
            input_shape = _input_shape(layer_config, where, index, label, input_layer=False)
        try:
            _check_builtin(raw, "layer")
        except _Reject as exc:
            raise where.error(str(exc), index, label, "class_name") from None
        layer_type = LAYER_CLASSES.get(keras_class)
        if layer_type is None:
            raise where.error(
                f"layer type {keras_class} is not supported; cnnlab imports {SUPPORTED}", index, label, "class_name"
            )
        layer = _convert_layer(layer_type, layer_config, rank, where, index, label)
        rank = 2 if layer_type == "Flatten" else rank
        layers.append(layer)
    if not layers:
        raise where.error("the model has no layers besides its input", field_name="config.layers")
    if _before_keras_2_2(version):  # its truncated normals lacked the variance correction
        for layer in layers:
            for key in ("kernel_initializer", "bias_initializer"):
                if layer.get(key) in LEGACY_NORMALS:
                    layer[key] = LEGACY_NORMALS[layer[key]]

    if input_shape is None:
        for key, container in (("build_input_shape", config), ("input_shape", data.get("build_config") or {})):
            if container.get(key) is not None:
                input_shape = _shape(container[key], where, None, None, key)
                break
    if input_shape is None:
        raise where.error(
            "the model has no input shape; give it one in Keras with keras.Input(shape=(28, 28, 1)) "
            "as the first layer, then save it again",
            field_name="batch_shape",
        )

    keras_name = config.get("name")
    name = (
        keras_name
        if isinstance(keras_name, str) and not re.fullmatch(r"sequential(_\d+)?", keras_name)
        else default_name
    )
    made_by = f"Keras {version}" if isinstance(version, str) else ("Keras 3" if "module" in data else "Keras")
    spec_data = {
        "name": name or default_name,
        "description": f"imported from {made_by} JSON",
        "input_shape": input_shape,
        "layers": layers,
    }
    return parse_spec(spec_data, source=source, default_name=default_name)


def _input_shape(config: dict, where: SpecLocation, index: int, label: str, input_layer: bool) -> list[int] | None:
    """(height, width, channels) from an InputLayer's or first layer's batch shape; None if it has none."""
    if input_layer:
        for key, check in (
            ("dtype", _float32),
            ("sparse", _require(lambda v: not v, "cnnlab inputs are dense images")),
            ("ragged", _require(lambda v: not v, "cnnlab inputs are dense images")),
            ("optional", _require(lambda v: not v, "the input is required")),
        ):
            try:
                check(config.get(key))
            except _Reject as exc:
                raise where.error(str(exc), index, label, key) from None
    for key in ("batch_shape", "batch_input_shape"):
        if config.get(key) is not None:
            return _shape(config[key], where, index, label, key)
    if config.get("input_dim") is not None:
        raise where.error(
            f"a flat input of {config['input_dim']} features is not supported: cnnlab models take "
            "images (height, width, channels)",
            index,
            label,
            "input_dim",
        )
    if input_layer:
        raise where.error("the InputLayer has no batch_shape", index, label, "batch_shape")
    return None


def _shape(value: Any, where: SpecLocation, index: int | None, label: str | None, key: str) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value[1:])
    ):
        raise where.error(
            f"{_show(value)} is not supported: cnnlab models take a batch of images "
            "(None, height, width, channels) with fixed sizes",
            index,
            label,
            key,
        )
    return list(value[1:])


def _convert_layer(layer_type: str, config: dict, rank: int, where: SpecLocation, index: int, label: str) -> dict:
    """One Keras layer config as a cnnlab layer table; every key handled or rejected."""
    handlers = {**COMMON, **FIELDS[layer_type]}
    use_bias = config.get("use_bias", True)
    layer: dict[str, Any] = {"type": layer_type}
    for key, value in config.items():
        handler = handlers.get(key)
        try:
            if key.startswith("bias_") and use_bias is False:
                continue  # no bias: its initializer, regularizer and constraint never apply
            if handler is None:
                if value is None:
                    continue  # a feature Keras added later, switched off
                raise _Reject(
                    f"unknown {layer_type} field (value {_show(value)}); cnnlab cannot tell whether it "
                    "changes the model, so it does not import it"
                )
            layer.update(handler(value))
            if layer_type == "BatchNormalization":
                _check_batchnorm(key, value, config, rank)
        except _Reject as exc:
            raise where.error(str(exc), index, label, key) from None
    if layer_type == "MaxPooling2D":
        # Keras writes strides = pool_size when none were given; cnnlab's default says the same.
        pair = lambda v: [v, v] if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
        if layer.get("strides") is None or pair(layer["strides"]) == pair(layer.get("pool_size", [2, 2])):
            layer.pop("strides", None)
    return layer


def _check_batchnorm(key: str, value: Any, config: dict, rank: int) -> None:
    """BatchNormalization must normalise over the channel (last) axis, with Keras's default initializers."""
    if key == "axis":
        axes = value if isinstance(value, list) else [value]
        if len(axes) != 1 or axes[0] not in (-1, rank - 1):
            raise _Reject(
                f"{_show(value)} is not supported: cnnlab normalises over the last (channel) axis only; "
                f"use axis=-1 (here also {rank - 1}) with channels_last inputs"
            )
    elif key in BATCHNORM_INITIALIZERS:
        applies = {"beta_initializer": config.get("center", True), "gamma_initializer": config.get("scale", True)}
        if applies.get(key, True) and _initializer(value) != BATCHNORM_INITIALIZERS[key]:
            raise _Reject(
                f"{_show(value)} is not supported: cnnlab starts {key.removesuffix('_initializer')} at "
                f"{BATCHNORM_INITIALIZERS[key]}; use Keras's default"
            )
