"""Keras model files with their weights: reading `.keras` and legacy `.h5` files, writing `.keras`.

Two formats hold a whole Keras model:

- `.keras` (Keras 3, and tf.keras from 2.13): a zip of `metadata.json` (`keras_version`),
  `config.json` (the model as `model.to_json()` writes it) and `model.weights.h5`. Inside the
  weights file each layer has a group `layers/<key>/vars` whose datasets `0`, `1`, ... are its
  variables in creation order; `<key>` is the layer's class in snake case, numbered in the order of
  the layers (`conv2d`, `conv2d_1`, `max_pooling2d`, ...), not the layer's name. tf.keras 2.13-2.15
  wrote the same under `_layer_checkpoint_dependencies/` instead of `layers/`.
- legacy HDF5 `.h5` (Keras 2, and Keras 3's `model.save("model.h5")`): the root attributes
  `model_config` (JSON text) and `keras_version`; the group `model_weights` has a group per layer
  (by layer name) whose attribute `weight_names` lists its datasets (`conv2d_1/kernel:0` in
  Keras 2, `sequential/conv2d/kernel` in Keras 3).

Both are read into memory once and parsed there; nothing is extracted to disk and nothing in the
file is executed: the config goes through `keras_json.spec_from_keras_json`, which refuses
Functional and subclassed models, Lambda layers and custom classes by their names, and the weights
are plain float arrays read by h5py (links to other files, external and virtual datasets are
refused). Every array is checked against the shape the config implies before it is read.

Weights are kept in Keras's layouts and variable names (`kernel` (kh, kw, in, out) for Conv2D,
(in, out) for Dense; `gamma`, `beta`, `moving_mean`, `moving_variance` for BatchNormalization):
`keras_weights` maps them onto a cnnlab module and back.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from cnnlab.errors import SpecError
from cnnlab.keras_json import spec_from_keras_json
from cnnlab.spec import (
    Activation,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LayerSpec,
    MaxPooling2D,
    ModelSpec,
    SpecLocation,
)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
KERAS_FORMAT_VERSION = "3.15.1"  # the Keras release whose .keras layout keras_archive_bytes follows
MAX_FILE_BYTES = 2 << 30  # a model file, or a .keras archive's members expanded, larger than this is refused
MAX_CONFIG_BYTES = 64 << 20  # config.json and metadata.json
ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
HDF5_SEARCH = 4096  # the largest user block before the HDF5 signature that is looked for
CONFIG_MEMBER, METADATA_MEMBER, WEIGHTS_MEMBER = "config.json", "metadata.json", "model.weights.h5"
SAVE_AGAIN = "save the model again with model.save('model.keras')"

Weights = dict[str, np.ndarray]


def is_keras_file(path: str | Path) -> bool:
    """Whether `path` names a Keras model file (by its suffix: .keras, .h5, .hdf5)."""
    return Path(path).suffix.lower() in KERAS_SUFFIXES


@dataclass(frozen=True)
class KerasArchive:
    """A Keras model file read: the spec, and per spec layer its arrays in Keras's names and layouts."""

    spec: ModelSpec
    weights: tuple[Weights, ...]  # one dict per spec layer, {} for weightless layers; float32
    keras_version: str | None
    source: str


# ---------------------------------------------------------------------------------------------
# Reading


def read_keras_file(path: str | Path) -> KerasArchive:
    """The model in a `.keras` file (Keras 3 zip) or a legacy `.h5` file (Keras 2 or 3), with its weights."""
    return read_keras_file_and_digest(path)[0]


def read_keras_file_and_digest(path: str | Path) -> tuple[KerasArchive, str]:
    """`read_keras_file`, and the SHA-256 of the bytes it read (one read, size checked first)."""
    source = str(path)
    data = _read_bytes(Path(path), source)
    return read_keras_bytes(data, source), hashlib.sha256(data).hexdigest()


def read_keras_bytes(data: bytes, source: str) -> KerasArchive:
    """`read_keras_file` of a file's bytes already in memory (`source` names it in errors)."""
    with io.BytesIO(data) as stream:
        if data.startswith(ZIP_MAGIC):
            return _read_zip(stream, source, with_weights=True)
        if _is_hdf5(data):
            return _read_legacy_h5(stream, source, with_weights=True)
    raise _not_keras(source)


def read_keras_spec(path: str | Path) -> ModelSpec:
    """The spec alone of a Keras model file: the weights are neither read nor checked."""
    source = str(path)
    _check_size(Path(path), source)
    try:
        with open(path, "rb") as stream:
            head = stream.read(HDF5_SEARCH + len(HDF5_MAGIC))
            stream.seek(0)
            if head.startswith(ZIP_MAGIC):
                return _read_zip(stream, source, with_weights=False).spec
            if _is_hdf5(head):
                return _read_legacy_h5(stream, source, with_weights=False).spec
    except OSError as exc:
        raise _unreadable(source, exc) from None
    raise _not_keras(source)


def _check_size(path: Path, source: str) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _unreadable(source, exc) from None
    if size > MAX_FILE_BYTES:
        raise SpecError(
            f"{source}: the file is {_size(size)}, more than cnnlab reads for a model ({_size(MAX_FILE_BYTES)}); "
            "cnnlab's models are small CNNs: check that this is the right file"
        )
    return size


def _read_bytes(path: Path, source: str) -> bytes:
    _check_size(path, source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(source, exc) from None


def _unreadable(source: str, exc: OSError) -> SpecError:
    return SpecError(f"{source}: cannot be read ({exc.strerror or exc}); check the path and its permissions")


def _is_hdf5(data: bytes) -> bool:
    # The HDF5 signature sits at 0, or after a user block of 512, 1024, 2048, ... bytes.
    offsets = [0] + [512 << n for n in range(HDF5_SEARCH.bit_length() - 9)]
    return any(data[offset : offset + len(HDF5_MAGIC)] == HDF5_MAGIC for offset in offsets)


def _not_keras(source: str) -> SpecError:
    return SpecError(
        f"{source}: not a Keras model file (neither a .keras zip archive nor an HDF5 .h5 file); "
        "save the model in Keras with model.save('model.keras')"
    )


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


# --- .keras -------------------------------------------------------------------------------------


def _read_zip(stream: BinaryIO, source: str, with_weights: bool) -> KerasArchive:
    members = _zip_members(stream, source, with_weights)
    version = None
    if METADATA_MEMBER in members:
        metadata = _json(members[METADATA_MEMBER], source, METADATA_MEMBER)
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        version = version if isinstance(version, str) else None
    spec = _spec(_json(members[CONFIG_MEMBER], source, CONFIG_MEMBER), version, source, ".keras")
    if not with_weights:
        return KerasArchive(spec, (), version, source)
    with _open_h5(members[WEIGHTS_MEMBER], source, WEIGHTS_MEMBER) as weights_file:
        try:
            weights = _zip_weights(weights_file, spec, source)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise _corrupt_h5(source, WEIGHTS_MEMBER, exc) from None
    return KerasArchive(spec, weights, version, source)


def _zip_members(stream: BinaryIO, source: str, with_weights: bool) -> dict[str, bytes]:
    """The bytes of the archive's metadata, config and (with_weights) weights, after checking the
    sizes its directory declares: nothing is decompressed beyond MAX_FILE_BYTES."""
    try:
        with zipfile.ZipFile(stream) as archive:
            members = {info.filename: info for info in archive.infolist()}
            expanded = sum(info.file_size for info in members.values())
            if expanded > MAX_FILE_BYTES:
                raise SpecError(
                    f"{source}: the .keras archive's members would expand to {_size(expanded)}, more than cnnlab "
                    f"reads for a model ({_size(MAX_FILE_BYTES)}); refusing it (a corrupt file or a zip bomb)"
                )
            for member in (CONFIG_MEMBER, WEIGHTS_MEMBER):
                if member not in members:
                    held = ", ".join(sorted(members)) or "nothing"
                    raise SpecError(
                        f"{source}: the .keras archive has no {member} (it holds {held}), so it is not a "
                        f"whole Keras model; {SAVE_AGAIN}"
                    )
            for member in (CONFIG_MEMBER, METADATA_MEMBER):
                if member in members and members[member].file_size > MAX_CONFIG_BYTES:
                    raise SpecError(
                        f"{source}: the archive's {member} declares {_size(members[member].file_size)}, more than "
                        f"a model's {member} ({_size(MAX_CONFIG_BYTES)}); refusing it"
                    )
            wanted = [CONFIG_MEMBER, METADATA_MEMBER] + ([WEIGHTS_MEMBER] if with_weights else [])
            return {member: archive.read(member) for member in wanted if member in members}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise SpecError(
            f"{source}: the .keras archive is truncated or corrupt ({_first_line(exc)}); copy it again or {SAVE_AGAIN}"
        ) from None


def _json(raw: bytes, source: str, member: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SpecError(
            f"{source}: the archive's {member} is not valid JSON ({_first_line(exc)}); {SAVE_AGAIN}"
        ) from None


def _zip_weights(weights_file: h5py.File, spec: ModelSpec, source: str) -> tuple[Weights, ...]:
    """Each spec layer's variables from `layers/<class key>/vars/<i>` (by position within the layer)."""
    where = SpecLocation(source)
    root_name = next((name for name in ("layers", "_layer_checkpoint_dependencies") if name in weights_file), None)
    root = _group(weights_file, root_name, source) if root_name else None
    keys = _container_keys(spec)
    result = []
    for index, (layer, key, shapes) in enumerate(zip(spec.layers, keys, expected_shapes(spec)), start=1):
        label = _label(spec, index)
        layer_group = _group(root, key, source) if root is not None else None
        variables = _group(layer_group, "vars", source) if layer_group is not None else None
        count = len(variables) if variables is not None else 0
        if count != len(shapes):
            raise where.error(
                _count_message(layer, shapes, count, f"{WEIGHTS_MEMBER} (group {root_name}/{key})"), index, label
            )
        arrays = {
            name: _array(_dataset(variables, str(position), source), shape, where, index, label, name)
            for position, (name, shape) in enumerate(shapes.items())
        }
        result.append(arrays)
    if root is not None:
        for key in root:
            if key not in keys and key != "input_layer" and _holds_datasets(_group(root, key, source)):
                raise where.error(
                    f"{WEIGHTS_MEMBER} has weights under {root_name}/{key}, which is no layer of config.json; "
                    f"the weights do not belong to this model: {SAVE_AGAIN}"
                )
    return tuple(result)


def _container_keys(spec: ModelSpec) -> list[str]:
    """Keras 3's group names for a Sequential's layers: the class in snake case, numbered per class."""
    used: dict[str, int] = {}
    keys = []
    for layer in spec.layers:
        base = layer.keras_name
        keys.append(base if base not in used else f"{base}_{used[base] + 1}")
        used[base] = used[base] + 1 if base in used else 0
    return keys


def _holds_datasets(group: h5py.Group) -> bool:
    found = []
    group.visititems(lambda _name, node: found.append(node) if isinstance(node, h5py.Dataset) else None)
    return bool(found)


# --- legacy .h5 ---------------------------------------------------------------------------------


def _read_legacy_h5(stream: BinaryIO, source: str, with_weights: bool) -> KerasArchive:
    with _open_h5(stream, source, None) as h5:
        try:
            raw_config = h5.attrs.get("model_config")
            version = _text(h5.attrs.get("keras_version"))
        except (OSError, TypeError, ValueError) as exc:
            raise _corrupt_h5(source, None, exc) from None
        if raw_config is None:
            kind = "weights only (no model_config)" if _looks_like_weights(h5) else "no Keras model (no model_config)"
            raise SpecError(
                f"{source}: holds {kind}; cnnlab needs the architecture too: save the whole model with "
                "model.save('model.keras') (or model.save('model.h5')), not model.save_weights"
            )
        config = _json(_text(raw_config).encode(), source, "model_config attribute")
        spec = _spec(config, version, source, ".h5")
        if not with_weights:
            return KerasArchive(spec, (), version, source)
        try:
            weights = _legacy_weights(h5, spec, source)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise _corrupt_h5(source, None, exc) from None
    return KerasArchive(spec, weights, version, source)


def _looks_like_weights(h5: h5py.File) -> bool:
    return "layer_names" in h5.attrs or "layers" in h5 or "vars" in h5 or "model_weights" in h5


def _legacy_weights(h5: h5py.File, spec: ModelSpec, source: str) -> tuple[Weights, ...]:
    """Each spec layer's variables from `model_weights/<layer name>`, matched by variable name."""
    where = SpecLocation(source)
    root = _group(h5, "model_weights", source)
    if root is None:
        raise where.error(f"the file has a model_config but no model_weights group; {SAVE_AGAIN}")
    names = spec.layer_names()
    result = []
    for index, (layer, name, shapes) in enumerate(zip(spec.layers, names, expected_shapes(spec)), start=1):
        label = _label(spec, index)
        group = _group(root, name, source)
        weight_names = _names(group.attrs, "weight_names") if group is not None else []
        found = {re.sub(r":\d+$", "", weight.split("/")[-1]): weight for weight in weight_names}
        if len(found) != len(weight_names) or set(found) != set(shapes):
            if len(weight_names) == len(shapes) and len(found) == len(shapes):
                unknown = sorted(set(found) - set(shapes))
                raise where.error(
                    f"the file's weights {', '.join(unknown)} are not the variables a {layer.type} layer with this "
                    f"config has ({_describe(shapes)}); {SAVE_AGAIN}",
                    index,
                    label,
                )
            raise where.error(
                _count_message(layer, shapes, len(weight_names), f"model_weights/{name}", list(found)), index, label
            )
        result.append(
            {
                variable: _array(_dataset(group, found[variable], source), shape, where, index, label, variable)
                for variable, shape in shapes.items()
            }
        )
    for extra in _names(root.attrs, "layer_names"):
        if extra not in names and _group(root, extra, source) is not None:
            if _names(_group(root, extra, source).attrs, "weight_names"):
                raise where.error(
                    f"model_weights has weights for the layer '{extra}', which is not in model_config; {SAVE_AGAIN}"
                )
    return tuple(result)


def _names(attrs: h5py.AttributeManager, key: str) -> list[str]:
    """A list-of-names attribute; Keras splits long ones into key0, key1, ..."""
    if key in attrs:
        values = [attrs[key]]
    else:
        values, chunk = [], 0
        while f"{key}{chunk}" in attrs:
            values.append(attrs[f"{key}{chunk}"])
            chunk += 1
    return [_text(item) for value in values for item in np.atleast_1d(value) if np.asarray(item).dtype.kind in "SUO"]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# --- shared -------------------------------------------------------------------------------------


def _spec(config: Any, version: str | None, source: str, kind: str) -> ModelSpec:
    if not isinstance(config, dict):
        raise SpecError(f"{source}: the model config is not a JSON object; {SAVE_AGAIN}")
    if version is not None and "keras_version" not in config:
        config = {**config, "keras_version": version}  # for rules that depend on the Keras version
    default_name = Path(source).name.split(".")[0] or "model"
    spec = spec_from_keras_json(config, source=source, default_name=default_name)
    made_by = f"Keras {version}" if version else "Keras"
    return dataclasses.replace(spec, description=f"imported from a {made_by} {kind} file")


def _open_h5(data: bytes | BinaryIO, source: str, member: str | None) -> h5py.File:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return h5py.File(stream, "r")
    except (OSError, ValueError) as exc:
        raise _corrupt_h5(source, member, exc) from None


def _corrupt_h5(source: str, member: str | None, exc: Exception) -> SpecError:
    what = f"the archive's {member}" if member else "the file"
    return SpecError(
        f"{source}: {what} is not a readable HDF5 file ({_first_line(exc)}); it is truncated or corrupt: "
        f"copy it again or {SAVE_AGAIN}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _group(parent: h5py.Group | None, path: str, source: str) -> h5py.Group | None:
    """The group at `path` (a/b/c) below `parent`, or None; links to other files or places are refused."""
    node = parent
    for part in path.split("/"):
        if node is None or not isinstance(node, h5py.Group) or not part:
            return None
        link = node.get(part, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise SpecError(
                f"{source}: the HDF5 object '{node.name}/{part}' is a link ({type(link).__name__}); Keras never "
                "writes links, and cnnlab does not follow them"
            )
        node = node[part]
    return node if isinstance(node, h5py.Group) else None


def _dataset(parent: h5py.Group, path: str, source: str) -> h5py.Dataset:
    folder, _, name = path.rpartition("/")
    group = _group(parent, folder, source) if folder else parent
    link = group.get(name, getlink=True) if group is not None else None
    if link is not None and not isinstance(link, h5py.HardLink):
        raise SpecError(
            f"{source}: the HDF5 object '{group.name}/{name}' is a link ({type(link).__name__}); Keras never "
            "writes links, and cnnlab does not follow them"
        )
    node = group[name] if link is not None else None
    if not isinstance(node, h5py.Dataset):
        raise SpecError(f"{source}: the HDF5 file has no dataset '{parent.name}/{path}'; {SAVE_AGAIN}")
    if node.external or node.is_virtual:
        raise SpecError(f"{source}: the HDF5 dataset '{node.name}' keeps its data outside the file; refused")
    return node


def _array(
    dataset: h5py.Dataset, shape: tuple[int, ...], where: SpecLocation, index: int, label: str, variable: str
) -> np.ndarray:
    """The dataset as float32, after checking its shape and type (before any byte is read)."""
    if tuple(dataset.shape) != shape:
        raise where.error(
            f"{variable} has shape {_shape(dataset.shape)} in the file but the layer's config expects "
            f"{_shape(shape)}; the weights do not belong to this architecture: {SAVE_AGAIN}",
            index,
            label,
        )
    if dataset.dtype.kind != "f":
        raise where.error(f"{variable} is stored as {dataset.dtype}, not as floating point numbers", index, label)
    return np.asarray(dataset[()], dtype=np.float32)


def _count_message(
    layer: LayerSpec, shapes: Mapping[str, tuple], count: int, place: str, found: Sequence[str] = ()
) -> str:
    names = f" ({', '.join(found)})" if found else ""
    if not shapes:
        return f"{place} has {count} weight array(s){names} but a {layer.type} layer has none; {SAVE_AGAIN}"
    if count == 0:
        return f"no weights in the file ({place}); the layer needs {_describe(shapes)}: {SAVE_AGAIN}"
    return f"{place} has {count} weight array(s){names} but the layer needs {len(shapes)}: {_describe(shapes)}; {SAVE_AGAIN}"


def _describe(shapes: Mapping[str, tuple]) -> str:
    return ", ".join(f"{name} {_shape(shape)}" for name, shape in shapes.items())


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _label(spec: ModelSpec, index: int) -> str:
    return f"{spec.layers[index - 1].type} '{spec.layer_names()[index - 1]}'"


def expected_shapes(spec: ModelSpec) -> list[dict[str, tuple[int, ...]]]:
    """Per spec layer, its Keras variables in Keras's creation order and their shapes."""
    in_shapes = [tuple(spec.input_shape)] + spec.output_shapes()
    result = []
    for layer, in_shape in zip(spec.layers, in_shapes):
        shapes: dict[str, tuple[int, ...]] = {}
        if isinstance(layer, Conv2D):
            shapes["kernel"] = (*layer.kernel_size, in_shape[-1], layer.filters)
            if layer.use_bias:
                shapes["bias"] = (layer.filters,)
        elif isinstance(layer, Dense):
            shapes["kernel"] = (in_shape[0], layer.units)
            if layer.use_bias:
                shapes["bias"] = (layer.units,)
        elif isinstance(layer, BatchNormalization):
            channels = (in_shape[-1],)
            if layer.scale:
                shapes["gamma"] = channels
            if layer.center:
                shapes["beta"] = channels
            shapes.update(moving_mean=channels, moving_variance=channels)
        result.append(shapes)
    return result


# ---------------------------------------------------------------------------------------------
# Writing


def _policy() -> dict:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}


def _initializer(name: str) -> dict:
    """A cnnlab initializer name as Keras 3 serialises the class (glorot_uniform -> GlorotUniform).

    The `_keras21` names (Keras <= 2.1's normal truncated without the variance correction) have no
    Keras 3 class: they are written as the corrected class. Only a fresh model's initial draws
    differ; an exported model's weights are what the file carries.
    """
    base = name.removesuffix("_keras21")
    class_name = "".join(part.capitalize() for part in base.split("_"))
    config = {} if base in ("zeros", "ones") else {"seed": None}
    return {"module": "keras.initializers", "class_name": class_name, "config": config, "registered_name": None}


KERAS_ACTIVATIONS = {"swish": "silu"}  # Keras 3 serialises swish as the function it is, silu


def _layer_config(layer: LayerSpec, name: str) -> dict:
    """A layer's `config` as Keras 3.15 writes it, minus fields newer than Keras 3.6 at their defaults
    (quantization_config, initializers' input_axes/output_axes), so that older Keras 3 loads it too."""
    config: dict[str, Any] = {"name": name, "trainable": True, "dtype": _policy()}
    if isinstance(layer, (Conv2D, Dense)):
        if isinstance(layer, Conv2D):
            config.update(
                filters=layer.filters,
                kernel_size=list(layer.kernel_size),
                strides=list(layer.strides),
                padding=layer.padding,
                data_format="channels_last",
                dilation_rate=[1, 1],
                groups=1,
            )
        else:
            config.update(units=layer.units)
        config.update(
            activation=KERAS_ACTIVATIONS.get(layer.activation, layer.activation),
            use_bias=layer.use_bias,
            kernel_initializer=_initializer(layer.kernel_initializer),
            bias_initializer=_initializer(layer.bias_initializer),
            kernel_regularizer=None,
            bias_regularizer=None,
        )
        if isinstance(layer, Conv2D):
            config.update(activity_regularizer=None)
        config.update(kernel_constraint=None, bias_constraint=None)
    elif isinstance(layer, MaxPooling2D):
        config.update(
            pool_size=list(layer.pool_size),
            padding=layer.padding,
            strides=list(layer.strides or layer.pool_size),
            data_format="channels_last",
        )
    elif isinstance(layer, Dropout):
        config.update(rate=layer.rate, seed=None, noise_shape=None)
    elif isinstance(layer, Flatten):
        config.update(data_format="channels_last")
    elif isinstance(layer, BatchNormalization):
        config.update(axis=-1, momentum=layer.momentum, epsilon=layer.epsilon, center=layer.center, scale=layer.scale)
        for key, initializer in (("beta", "zeros"), ("gamma", "ones"), ("moving_mean", "zeros")):
            config[f"{key}_initializer"] = _initializer(initializer)
        config.update(
            moving_variance_initializer=_initializer("ones"),
            beta_regularizer=None,
            gamma_regularizer=None,
            beta_constraint=None,
            gamma_constraint=None,
            synchronized=False,
            renorm=False,
            renorm_clipping=None,
            renorm_momentum=0.99,
        )
    elif isinstance(layer, Activation):
        config.update(activation=KERAS_ACTIVATIONS.get(layer.activation, layer.activation))
    return config


def _unique(names: Sequence[str]) -> list[str]:
    """Keras needs distinct layer names in a Sequential model; a repeated one gets a suffix."""
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, count = name.replace("/", "_"), 1
        while candidate in seen:
            candidate, count = f"{name}_{count}", count + 1
        seen.add(candidate)
        result.append(candidate)
    return result


def keras_config(spec: ModelSpec) -> dict:
    """The spec as Keras 3 serialises a Sequential model (`json.loads(model.to_json())`), with an
    `InputLayer` holding the batch shape and each built layer's `build_config`."""
    batch_shape = [None, *spec.input_shape]
    in_shapes = [list(spec.input_shape)] + [list(shape) for shape in spec.output_shapes()]
    layers: list[dict] = [
        {
            "module": "keras.layers",
            "class_name": "InputLayer",
            "config": {
                "batch_shape": batch_shape,
                "dtype": "float32",
                "sparse": False,
                "ragged": False,
                "name": "input_layer",
            },
            "registered_name": None,
        }
    ]
    for layer, name, in_shape in zip(spec.layers, _unique(spec.layer_names()), in_shapes):
        entry = {
            "module": "keras.layers",
            "class_name": layer.type,
            "config": _layer_config(layer, name),
            "registered_name": None,
        }
        if isinstance(layer, (Conv2D, Dense, BatchNormalization, Flatten)):  # the layers Keras builds
            entry["build_config"] = {"input_shape": [None, *in_shape]}
        layers.append(entry)
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": spec.name.replace("/", "_"),
            "trainable": True,
            "dtype": _policy(),
            "layers": layers,
            "build_input_shape": batch_shape,
        },
        "registered_name": None,
        "build_config": {"input_shape": batch_shape},
        "compile_config": {},
    }


def keras_archive_bytes(
    spec: ModelSpec,
    weights: Sequence[Mapping[str, np.ndarray]],
    *,
    keras_version: str = KERAS_FORMAT_VERSION,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """A complete `.keras` file (metadata.json, config.json, model.weights.h5) for `keras.saving.load_model`.
    `metadata` (e.g. cnnlab's export facts) goes into metadata.json under "cnnlab"; Keras reads only
    its own keys there.

    `weights` holds one mapping per spec layer in Keras's names and layouts (as `read_keras_file` and
    `keras_weights.keras_layer_weights` give them); each is checked against the spec's shapes.
    """
    where = SpecLocation(f"the weights for {spec.name}")
    if len(weights) != len(spec.layers):
        raise where.error(f"{len(weights)} layers of weights for a model of {len(spec.layers)} layers")
    names = _unique(spec.layer_names())
    weights_io = io.BytesIO()
    with h5py.File(weights_io, "w") as h5:
        layers_group = h5.create_group("layers")
        for index, (key, name, shapes, arrays) in enumerate(
            zip(_container_keys(spec), names, expected_shapes(spec), weights), start=1
        ):
            label = _label(spec, index)
            if set(arrays) != set(shapes):
                raise where.error(
                    f"has arrays {', '.join(arrays) or 'none'} but the layer needs {_describe(shapes) or 'none'}",
                    index,
                    label,
                )
            variables = layers_group.create_group(key).create_group("vars")
            variables.attrs["name"] = name
            for position, (variable, shape) in enumerate(shapes.items()):
                array = np.asarray(arrays[variable], dtype=np.float32)
                if array.shape != shape:
                    raise where.error(
                        f"{variable} has shape {_shape(array.shape)} but the layer expects {_shape(shape)}",
                        index,
                        label,
                    )
                variables.create_dataset(str(position), data=array)
        h5.create_group("vars").attrs["name"] = spec.name.replace("/", "_")
    facts = {
        "keras_version": keras_version,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    } | ({"cnnlab": dict(metadata)} if metadata else {})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:  # stored, not deflated, as Keras writes it
        archive.writestr(METADATA_MEMBER, json.dumps(facts))
        archive.writestr(CONFIG_MEMBER, json.dumps(keras_config(spec)))
        archive.writestr(WEIGHTS_MEMBER, weights_io.getvalue())
    return out.getvalue()
