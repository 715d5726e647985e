"""Weights between a cnnlab module and Keras's arrays, layer by layer.

Keras keeps a Conv2D kernel as (height, width, in, out) and a Dense kernel as (in, out); PyTorch as
(out, in, height, width) and (out, in). A Dense layer after a Flatten needs no reordering of its
inputs: `KerasFlatten` already flattens in Keras's (height, width, channels) order.
BatchNormalization's gamma, beta, moving mean and variance are the module's weight, bias,
running_mean and running_var. The arrays are named as Keras names its variables (`kernel`,
`bias`, `gamma`, `beta`, `moving_mean`, `moving_variance`), one mapping per spec layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cnnlab.errors import SpecError
from cnnlab.models import KerasBatchNorm, SequentialNet, build_model
from cnnlab.spec import ModelSpec

Convert = Callable[[torch.Tensor], torch.Tensor]
_SAME: Convert = lambda t: t

# Per module type: (Keras variable, module attribute, PyTorch -> Keras, Keras -> PyTorch).
VARIABLES: dict[type, tuple[tuple[str, str, Convert, Convert], ...]] = {
    nn.Conv2d: (
        ("kernel", "weight", lambda t: t.permute(2, 3, 1, 0), lambda t: t.permute(3, 2, 0, 1)),
        ("bias", "bias", _SAME, _SAME),
    ),
    nn.Linear: (
        ("kernel", "weight", lambda t: t.t(), lambda t: t.t()),
        ("bias", "bias", _SAME, _SAME),
    ),
    KerasBatchNorm: (
        ("gamma", "weight", _SAME, _SAME),
        ("beta", "bias", _SAME, _SAME),
        ("moving_mean", "running_mean", _SAME, _SAME),
        ("moving_variance", "running_var", _SAME, _SAME),
    ),
}


def _weighted(layer: nn.Module, prefix: str) -> list[tuple[str, str, torch.Tensor, Convert, Convert]]:
    """The Keras variables of one spec layer's module (found inside any padding/activation wrapper):
    (Keras name, state_dict key, tensor, to Keras, from Keras)."""
    found = []
    for name, module in layer.named_modules(prefix=prefix):
        for kind, variables in VARIABLES.items():
            if type(module) is kind:
                for keras_name, attribute, to_keras, from_keras in variables:
                    tensor = getattr(module, attribute, None)
                    if isinstance(tensor, torch.Tensor):
                        found.append((keras_name, f"{name}.{attribute}", tensor, to_keras, from_keras))
    return found


def keras_layer_weights(model: SequentialNet) -> tuple[dict[str, np.ndarray], ...]:
    """The model's weights as Keras holds them: per spec layer, Keras variable name -> float32 array."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module shares its weights
    result = []
    for index, layer in enumerate(model.layers):
        arrays = {}
        for keras_name, _key, tensor, to_keras, _from_keras in _weighted(layer, f"layers.{index}"):
            arrays[keras_name] = np.ascontiguousarray(to_keras(tensor.detach()).to("cpu", torch.float32).numpy())
        result.append(arrays)
    return tuple(result)


def state_dict_from_keras(
    spec: ModelSpec, weights: Sequence[Mapping[str, np.ndarray]], source: str
) -> dict[str, torch.Tensor]:
    """The state_dict of `build_model(spec)` (float32) from Keras arrays, one mapping per spec layer.

    Every array must be there with the shape the spec gives it; a missing, extra or wrongly shaped
    array, or a different number of layers, raises `SpecError` naming `source`, the layer and the
    variable (as when `--init-from model.keras` meets a spec of another architecture). Buffers that
    Keras has no variable for (none today) are left out; `load_state_dict(strict=False)` keeps them.
    """
    if len(weights) != len(spec.layers):
        raise SpecError(
            f"{source}: has weights for {len(weights)} layers but {spec.name} has {len(spec.layers)}; "
            "the weights must come from a model with the same layers"
        )
    with torch.device("meta"):  # shapes and state_dict keys only: nothing allocated or initialised
        model = build_model(spec)
    names = spec.layer_names()
    state: dict[str, torch.Tensor] = {}
    for index, (layer, arrays) in enumerate(zip(model.layers, weights)):
        where = f"{source}: layer {index + 1} ({names[index]}, {spec.layers[index].type})"
        variables = _weighted(layer, f"layers.{index}")
        wanted = {keras_name: to_keras(tensor).shape for keras_name, _, tensor, to_keras, _ in variables}
        extra = sorted(set(arrays) - set(wanted))
        if extra:
            needs = ", ".join(f"{n} {_shape(s)}" for n, s in wanted.items()) or "no weights"
            raise SpecError(f"{where}: has {', '.join(extra)} but {spec.name}'s layer takes {needs}")
        for keras_name, key, _tensor, _to_keras, from_keras in variables:
            expected = tuple(wanted[keras_name])
            if keras_name not in arrays:
                raise SpecError(
                    f"{where}: has no {keras_name}; {spec.name}'s layer needs {keras_name} {_shape(expected)}"
                )
            array = np.asarray(arrays[keras_name])
            if array.shape != expected:
                raise SpecError(
                    f"{where}: {keras_name} has shape {_shape(array.shape)} but {spec.name} expects "
                    f"{_shape(expected)}; the weights come from a different architecture"
                )
            state[key] = from_keras(torch.tensor(array, dtype=torch.float32)).contiguous()
    return state


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ("," if len(shape) == 1 else "") + ")"
