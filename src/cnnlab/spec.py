"""Model specs: a declarative description of a Keras-style Sequential CNN.

A spec is TOML (or JSON) with the input shape, the number of classes and a list of layers, each
a table with a `type` and the Keras arguments cnnlab honours:

    name = "tiny"
    input_shape = [28, 28, 1]      # height, width, channels (Keras's channels_last)
    num_classes = 10

    [[layers]]
    type = "Conv2D"
    filters = 32
    kernel_size = 3
    activation = "relu"

The spec is the single source of truth for a model: `models.build_model` turns it into a
`torch.nn.Module`, and `spec_to_dict` writes it back out unchanged. Validation infers every
layer's output shape, so a bad spec fails here with the file, layer index and field named.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cnnlab.errors import SpecError

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "gelu", "softplus", "swish", "silu")
INITIALIZERS = (
    "glorot_uniform",
    "glorot_normal",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "zeros",
    "ones",
    # Keras before 2.2.0: VarianceScaling's truncated normal without the variance correction
    # (models.keras_init_; Keras JSON older than 2.2.0 imports its normal initializers as these).
    "glorot_normal_keras21",
    "he_normal_keras21",
    "lecun_normal_keras21",
)
PADDINGS = ("valid", "same")

Shape = tuple[int, ...]  # without the batch axis, channels last: (H, W, C) or (features,)


def _pair(value: Any) -> Any:
    """Keras accepts `3` for `(3, 3)`; normalise to a tuple (validated later)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


@dataclass(frozen=True)
class Conv2D:
    """2-D convolution, Keras `Conv2D` (channels_last)."""

    filters: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"
    activation: str = "linear"
    use_bias: bool = True
    kernel_initializer: str = "glorot_uniform"
    bias_initializer: str = "zeros"
    name: str | None = None
    type: ClassVar[str] = "Conv2D"
    keras_name: ClassVar[str] = "conv2d"
    pairs: ClassVar[tuple[str, ...]] = ("kernel_size", "strides")


@dataclass(frozen=True)
class MaxPooling2D:
    """Max pooling, Keras `MaxPooling2D`; `strides` defaults to `pool_size`."""

    pool_size: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None
    padding: str = "valid"
    name: str | None = None
    type: ClassVar[str] = "MaxPooling2D"
    keras_name: ClassVar[str] = "max_pooling2d"
    pairs: ClassVar[tuple[str, ...]] = ("pool_size", "strides")


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout, Keras `Dropout`: drops a fraction `rate` of inputs while training."""

    rate: float
    name: str | None = None
    type: ClassVar[str] = "Dropout"
    keras_name: ClassVar[str] = "dropout"
    pairs: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Flatten:
    """Flattens (H, W, C) to features, Keras `Flatten`."""

    name: str | None = None
    type: ClassVar[str] = "Flatten"
    keras_name: ClassVar[str] = "flatten"
    pairs: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Dense:
    """Fully connected layer, Keras `Dense`."""

    units: int
    activation: str = "linear"
    use_bias: bool = True
    kernel_initializer: str = "glorot_uniform"
    bias_initializer: str = "zeros"
    name: str | None = None
    type: ClassVar[str] = "Dense"
    keras_name: ClassVar[str] = "dense"
    pairs: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class BatchNormalization:
    """Batch normalisation over the last (channel) axis with Keras's defaults."""

    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    name: str | None = None
    type: ClassVar[str] = "BatchNormalization"
    keras_name: ClassVar[str] = "batch_normalization"
    pairs: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Activation:
    """A standalone activation, Keras `Activation`."""

    activation: str
    name: str | None = None
    type: ClassVar[str] = "Activation"
    keras_name: ClassVar[str] = "activation"
    pairs: ClassVar[tuple[str, ...]] = ()


LayerSpec = Conv2D | MaxPooling2D | Dropout | Flatten | Dense | BatchNormalization | Activation
LAYER_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Conv2D, MaxPooling2D, Dropout, Flatten, Dense, BatchNormalization, Activation)
}


@dataclass(frozen=True)
class ModelSpec:
    """A Sequential CNN: input shape (H, W, C), number of classes and its layers in order."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[LayerSpec, ...]
    description: str = ""
    source: str = field(default="<spec>", compare=False)

    def layer_names(self) -> list[str]:
        """Keras-style layer names (`conv2d_1`, `dropout_2`, ...) unless the spec names a layer."""
        counts: dict[str, int] = {}
        names = []
        for layer in self.layers:
            key = layer.keras_name
            counts[key] = counts.get(key, 0) + 1
            names.append(layer.name or f"{key}_{counts[key]}")
        return names

    def output_shapes(self) -> list[Shape]:
        """Each layer's output shape, without the batch axis, in Keras's channels_last order."""
        return infer_shapes(self)


# ---------------------------------------------------------------------------------------------
# Parsing


class SpecLocation:
    """Formats 'file, layer N (Type), field X' prefixes for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(
        self, message: str, index: int | None = None, layer_type: str | None = None, field_name: str | None = None
    ) -> SpecError:
        where = [self.source]
        if index is not None:
            where.append(f"layer {index}" + (f" ({layer_type})" if layer_type else ""))
        if field_name is not None:
            where.append(f"field '{field_name}'")
        return SpecError(f"{': '.join([', '.join(where), message])}")


def parse_spec(data: Any, source: str = "<spec>", default_name: str = "model") -> ModelSpec:
    """Build and validate a `ModelSpec` from parsed TOML/JSON data."""
    where = SpecLocation(source)
    if not isinstance(data, dict):
        raise where.error("a spec must be a table with input_shape, num_classes and layers")
    allowed = {"name", "description", "input_shape", "num_classes", "layers"}
    for key in data:
        if key not in allowed:
            raise where.error(f"unknown top-level field '{key}'; allowed: {', '.join(sorted(allowed))}")
    if "layers" not in data or not isinstance(data["layers"], list) or not data["layers"]:
        raise where.error("needs a non-empty list of [[layers]]", field_name="layers")
    if "input_shape" not in data:
        raise where.error("missing; give [height, width, channels], e.g. [28, 28, 1]", field_name="input_shape")
    input_shape = data["input_shape"]
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 3
        or not all(_is_int(v) and v > 0 for v in input_shape)
    ):
        raise where.error(
            f"must be three positive integers [height, width, channels], got {input_shape!r}", field_name="input_shape"
        )
    layers = tuple(_parse_layer(raw, i, where) for i, raw in enumerate(data["layers"], start=1))
    last_dense = next((layer for layer in reversed(layers) if isinstance(layer, Dense)), None)
    num_classes = data.get("num_classes", last_dense.units if last_dense else None)
    if not _is_int(num_classes) or num_classes < 2:
        raise where.error(f"must be an integer >= 2, got {num_classes!r}", field_name="num_classes")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise where.error("must be a non-empty string", field_name="name")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise where.error(
            f"must not contain control characters, got {name!r}; use letters, digits and punctuation", field_name="name"
        )
    spec = ModelSpec(
        name=name,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        layers=layers,
        description=str(data.get("description", "")),
        source=source,
    )
    validate(spec)
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_layer(raw: Any, index: int, where: SpecLocation) -> LayerSpec:
    if not isinstance(raw, dict):
        raise where.error("each layer must be a table with a 'type'", index)
    layer_type = raw.get("type")
    cls = LAYER_TYPES.get(layer_type)
    if cls is None:
        raise where.error(
            f"unknown layer type {layer_type!r}; supported: {', '.join(LAYER_TYPES)}", index, field_name="type"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key == "type":
            continue
        if key not in fields:
            raise where.error(f"unknown field for {layer_type}; allowed: {', '.join(fields)}", index, layer_type, key)
        if key == "activation" and value is None:
            value = "linear"  # Keras's None means no activation
        kwargs[key] = _pair(value) if key in cls.pairs else value
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
    ]
    if missing:
        raise where.error("required field missing", index, layer_type, missing[0])
    layer = cls(**kwargs)
    _check_layer_fields(layer, index, where)
    return layer


def _check_layer_fields(layer: LayerSpec, index: int, where: SpecLocation) -> None:
    """Type and range checks for one layer's fields."""

    def fail(field_name: str, message: str) -> SpecError:
        return where.error(message, index, layer.type, field_name)

    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if f.name == "name":
            if value is not None and (not isinstance(value, str) or not value):
                raise fail("name", "must be a non-empty string")
        elif f.name in layer.pairs:
            if value is None and f.name == "strides" and isinstance(layer, MaxPooling2D):
                continue
            if not (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise fail(f.name, f"must be an integer or a pair of integers, got {value!r}")
            if min(value) <= 0:
                raise fail(f.name, f"must be positive, got {list(value)}")
        elif f.name in ("filters", "units"):
            if not _is_int(value) or value <= 0:
                raise fail(f.name, f"must be a positive integer, got {value!r}")
        elif f.name == "padding":
            if value not in PADDINGS:
                raise fail(f.name, f"must be 'valid' or 'same', got {value!r}")
        elif f.name == "activation":
            if value not in ACTIVATIONS:
                raise fail(f.name, f"unknown activation {value!r}; supported: {', '.join(ACTIVATIONS)}")
        elif f.name.endswith("_initializer"):
            if value not in INITIALIZERS:
                raise fail(f.name, f"unknown initializer {value!r}; supported: {', '.join(INITIALIZERS)}")
        elif f.name in ("use_bias", "center", "scale"):
            if not isinstance(value, bool):
                raise fail(f.name, f"must be true or false, got {value!r}")
        elif f.name == "rate":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise fail(f.name, f"must be a number in [0, 1), got {value!r}")
        elif f.name == "momentum":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise fail(f.name, f"must be a number in [0, 1), got {value!r}")
        elif f.name == "epsilon":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise fail(f.name, f"must be a positive number, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Shapes and validation


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Output length along one axis, as TensorFlow computes it (floor for 'valid')."""
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after): an odd total puts the extra row at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def infer_shapes(spec: ModelSpec) -> list[Shape]:
    """Output shape of every layer (channels_last, no batch axis); raises SpecError on the first bad one."""
    where = SpecLocation(spec.source)
    shape: Shape = tuple(spec.input_shape)
    shapes: list[Shape] = []
    for index, layer in enumerate(spec.layers, start=1):
        if isinstance(layer, (Conv2D, MaxPooling2D)):
            if len(shape) != 3:
                raise where.error(
                    f"needs a 4-D input (batch, height, width, channels) but gets {_fmt(shape)}; "
                    "remove the Flatten or Dense before it",
                    index,
                    layer.type,
                )
            if isinstance(layer, Conv2D):
                kernel, strides, channels = layer.kernel_size, layer.strides, layer.filters
            else:
                kernel, strides, channels = layer.pool_size, layer.strides or layer.pool_size, shape[2]
            height, width = (
                conv_output_size(shape[axis], kernel[axis], strides[axis], layer.padding) for axis in (0, 1)
            )
            if height <= 0 or width <= 0:
                field_name = "kernel_size" if isinstance(layer, Conv2D) else "pool_size"
                raise where.error(
                    f"input {_fmt(shape)} shrinks to nothing ({height}x{width}) with "
                    f"{field_name} {list(kernel)} and padding '{layer.padding}'; use padding 'same', a "
                    f"smaller {field_name}, or fewer layers before it",
                    index,
                    layer.type,
                    field_name,
                )
            shape = (height, width, channels)
        elif isinstance(layer, Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, Dense):
            if len(shape) != 1:
                raise where.error(
                    f"Dense on a {len(shape) + 1}-D input {_fmt(shape)}; add a Flatten layer before it",
                    index,
                    layer.type,
                )
            shape = (layer.units,)
        shapes.append(shape)
    return shapes


def _fmt(shape: Shape) -> str:
    return "(None, " + ", ".join(str(s) for s in shape) + ")"


def validate(spec: ModelSpec) -> None:
    """Check shapes end to end and that the network ends in a classifier over `num_classes`."""
    where = SpecLocation(spec.source)
    shapes = infer_shapes(spec)
    if shapes[-1] != (spec.num_classes,):
        raise where.error(
            f"the last layer outputs {_fmt(shapes[-1])} but num_classes is {spec.num_classes}; "
            f"end with Dense(units = {spec.num_classes}, activation = 'softmax')",
            len(spec.layers),
            spec.layers[-1].type,
        )
    for index, layer in enumerate(spec.layers[:-1], start=1):
        if getattr(layer, "activation", None) == "softmax":
            raise where.error(
                "softmax is only supported as the output activation (the loss applies it)",
                index,
                layer.type,
                "activation",
            )
    head = classifier_head(spec)
    output = spec.layers[head - 1]
    if getattr(output, "activation", "linear") not in ("softmax", "linear"):
        raise where.error(
            f"the output layer's activation must be 'softmax' (or 'linear'), got "
            f"'{output.activation}'; cnnlab trains with categorical cross-entropy",
            head,
            output.type,
            "activation",
        )


def classifier_head(spec: ModelSpec) -> int:
    """Index of the layer whose output is the logits: a trailing softmax is left to the loss.

    Keras models end in Dense(softmax) or Dense + Activation('softmax'); cnnlab trains on logits with
    cross-entropy (numerically the same loss), so the softmax itself is not part of the module.
    """
    last = spec.layers[-1]
    if isinstance(last, Activation) and last.activation in ("softmax", "linear"):
        return len(spec.layers) - 1
    return len(spec.layers)


# ---------------------------------------------------------------------------------------------
# Writing


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The spec as plain data (round-trips through `parse_spec`); defaults are left out."""
    layers = []
    for layer in spec.layers:
        entry: dict[str, Any] = {"type": layer.type}
        for f in dataclasses.fields(layer):
            value = getattr(layer, f.name)
            if value == f.default or value is None:
                continue
            entry[f.name] = list(value) if isinstance(value, tuple) else value
        layers.append(entry)
    data: dict[str, Any] = {"name": spec.name}
    if spec.description:
        data["description"] = spec.description
    data.update(input_shape=list(spec.input_shape), num_classes=spec.num_classes, layers=layers)
    return data


def spec_to_toml(spec: ModelSpec) -> str:
    """The spec as TOML text, ready to save and edit."""
    import tomli_w

    return tomli_w.dumps(spec_to_dict(spec))
