"""How much memory training a spec needs, estimated from the spec alone, and the check that refuses
a run that cannot fit before anything is allocated or written.

The estimate follows what `engine.train` really holds, phase by phase, in bytes (Python ints: a
layer of 10^20 units is counted, never allocated, and nothing overflows):

- all the time: the weights and buffers (fp32), Adam's m and v (two fp32 tensors per parameter,
  plus a step counter each), and the tensors training adds to the device beyond the loaded dataset
  (on a GPU the images and labels; on the CPU the loaded tensors are used in place; the epoch's
  shuffled order; with a validation split, the split copies);
- the training step's forward and backward, at the batch size: the float input batch; what autograd
  saves for the backward (each op's tensor below, each storage counted once); the forward's
  short-lived tensors; then, walking the backward from the loss down, the gradient flowing in and
  the one flowing out of each op, its temporaries, the parameter gradients made so far, and the
  saved tensors not yet released (a saved tensor is freed once every op that saved it has run);
- Adam's update: the gradients plus two parameter-sized temporaries (`KerasAdam.step`'s
  `denominators` and `updates`);
- evaluation at `eval_batch_size` (inference mode: an op's input and output, no saved tensors), with
  the last step's gradients still held.

The peak is the largest phase on top of what is held all the time. What autograd saves, per layer
(checked with `torch.autograd.graph.saved_tensors_hooks`):

- Conv2D: its input (after a 'same' pad copy where the padding is uneven, after the bf16 cast of
  an fp32 input under autocast; in bf16 also the weight's bf16 copy); Dense: its input likewise;
- ReLU, sigmoid, tanh: their output; ELU, SELU, GELU, SiLU/swish, softplus: their input (a
  convolution's ReLU before max-pooling runs after the pooling: `models.relu_after_pooling`);
- MaxPooling2D: its input and the int64 indices of the maxima (output-sized);
- Dropout (`FastDropout`): its keep mask, as large as its input in the activations' dtype (on the
  CPU the random words it draws and what it makes the mask from live during the forward op only:
  `FastDropout.cpu_temporary_bytes`);
- BatchNormalization: its input (the centred and scaled temporaries live during the op only);
- Flatten: nothing, and nothing new at all where the input is channels_last (a view).

Activations are 4 bytes an element in fp32 and 2 in bf16 (the input batch stays fp32). Not modelled:
oneDNN/cuDNN workspaces and the CUDA caching allocator's slack, which the 80% margin of
`check_fits_in_memory` leaves room for. On the CPU the estimate is within a few percent of the peak
the profiler measures for the built-in models (tests/test_memory.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnlab.config import Hardware, Recipe, RunPlan
from cnnlab.datasets import Dataset
from cnnlab.errors import ConfigError
from cnnlab.models import (
    FastDropout,
    format_count,
    pool_padding,
    relu_after_pooling,
    scientific_notation,
    spec_layer_counts,
)
from cnnlab.spec import (
    Activation,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPooling2D,
    ModelSpec,
    classifier_head,
    same_padding,
)

FIT_FRACTION = (4, 5)  # a run may plan to use 80% of the memory available to it
FP32, INT64 = 4, 8
SAVES_OUTPUT = {"relu", "sigmoid", "tanh"}  # activations whose backward reads their result; the rest read their input


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class LayerMemory:
    """One spec layer's part of the estimate."""

    name: str
    layer_type: str
    description: str  # e.g. "Dense, 1,000 units on 784 inputs"
    weights: int  # bytes of its parameters and buffers (fp32)
    trainable: int  # number of trainable parameters
    activations: int  # bytes of the tensors it saves for the backward at the batch size

    @property
    def share(self) -> int:
        """Its bytes in the whole: weights with their gradients and Adam state, and its activations."""
        return self.weights + 3 * FP32 * self.trainable + self.activations


@dataclass(frozen=True)
class MemoryEstimate:
    """What training a spec needs, in bytes, at a batch size (see the module's docstring)."""

    batch_size: int  # the training batch (at most the number of training images)
    eval_batch_size: int  # the evaluation batch (at most the number of images evaluated)
    precision: str
    parameters: int  # weights and buffers, fp32
    gradients: int  # one fp32 gradient per trainable parameter
    optimizer_state: int  # Adam's m and v and step counters
    dataset: int  # tensors training adds to the device beyond the loaded dataset
    activations: int  # the forward/backward's peak beyond the parameter gradients and weight copies
    weight_copies: int  # bf16: autocast's copies of the weights (and of their gradients) at that peak
    backward_peak: int  # the forward/backward's peak, parameter gradients made by then included
    update: int  # Adam's update: gradients, its temporaries and the batch still held
    evaluation: int  # evaluation's peak (the last step's gradients included)
    layers: tuple[LayerMemory, ...] = field(repr=False)

    @property
    def held(self) -> int:
        """What is held from start to end: weights, Adam state and the dataset's device tensors."""
        return self.parameters + self.optimizer_state + self.dataset

    @property
    def training_step(self) -> int:
        """A training step's peak beyond what is held (forward and backward, or Adam's update)."""
        return max(self.backward_peak, self.update)

    @property
    def peak_phase(self) -> str:
        """'training', 'update' or 'evaluation': the phase that needs the most."""
        phases = {"training": self.backward_peak, "update": self.update, "evaluation": self.evaluation}
        return max(phases, key=lambda phase: phases[phase])

    @property
    def total(self) -> int:
        """The peak of the whole run: what is held plus the largest phase."""
        return self.held + max(self.backward_peak, self.update, self.evaluation)

    @property
    def largest_layer(self) -> LayerMemory:
        """The layer with the largest share (the first of equals)."""
        return max(self.layers, key=lambda layer: layer.share)


class _Tensor:
    """A tensor of the simulation: its size in bytes, whether a gradient flows back into it, and
    whether it is a copy of weights (autocast's bf16 kernels) rather than an activation."""

    __slots__ = ("nbytes", "grad", "weights")

    def __init__(self, nbytes: int, grad: bool, weights: bool = False) -> None:
        self.nbytes, self.grad, self.weights = nbytes, grad, weights


@dataclass
class _Op:
    """One autograd op of the forward: its input and output, what it saves and its temporaries."""

    layer: int  # index of its spec layer
    inp: _Tensor
    out: _Tensor
    saved: list[_Tensor] = field(default_factory=list)
    forward_extra: int = 0  # bytes alive during the forward op only
    backward_extra: int = 0  # bytes alive during its backward beyond the gradients in and out
    param_grad: int = 0  # bytes of parameter gradients its backward makes
    grad_copies: int = 0  # bf16: bytes of the parameter gradients' bf16 versions, during its backward


class _Builder:
    """Turns a spec into the autograd ops its module runs (views and identities are not ops), at a
    batch size, for a training step or for evaluation."""

    def __init__(self, spec: ModelSpec, batch: int, hardware: Hardware, training: bool) -> None:
        self.spec, self.batch, self.training = spec, batch, training
        self.device_type = torch.device(hardware.device).type
        self.bf16 = hardware.precision == "bf16"
        self.channels_last = hardware.channels_last
        self.compact_dropout_masks = hardware.compact_dropout_masks
        self.ops: list[_Op] = []
        self.weight_copies = 0  # bf16 evaluation: autocast's weight copies, cached until the forward ends

    def build(self) -> tuple[_Tensor, list[_Op]]:
        spec = self.spec
        shapes = [tuple(spec.input_shape)] + spec.output_shapes()
        head = classifier_head(spec)
        x = _Tensor(self.batch * math.prod(spec.input_shape) * FP32, grad=False)  # to_input's float batch
        current, dsize = x, FP32
        moved_relus = relu_after_pooling(spec)
        for i, layer in enumerate(spec.layers):
            if i >= head:
                break  # a trailing softmax is left to the loss
            activation = getattr(layer, "activation", "linear")
            if (i == head - 1 and activation == "softmax") or i in moved_relus:
                activation = "linear"
            current, dsize = self._layer(i, layer, activation, shapes[i], shapes[i + 1], current, dsize)
            if i - 1 in moved_relus:  # the convolution's ReLU, after this pooling
                current = self._activation(i, "relu", current, dsize, self._elements(shapes[i + 1]))
        if self.training:
            if dsize != FP32:  # logits.float()
                current = self._op(len(spec.layers) - 1, current, self.batch * spec.num_classes * FP32)
            log_softmax = _Tensor(self.batch * spec.num_classes * FP32, grad=False)
            self.ops.append(_Op(len(spec.layers) - 1, current, _Tensor(FP32, grad=True), saved=[log_softmax]))
        return x, self.ops

    def _elements(self, shape: tuple[int, ...]) -> int:
        return self.batch * math.prod(shape)

    def _op(self, layer: int, inp: _Tensor, out_bytes: int, **kwargs) -> _Tensor:
        out = _Tensor(out_bytes, grad=True)
        self.ops.append(_Op(layer, inp, out, **kwargs))
        return out

    def _cast(self, i: int, current: _Tensor, dsize: int, elements: int) -> tuple[_Tensor, int]:
        """Autocast's bf16 copy of an fp32 input to a convolution or matmul."""
        if self.bf16 and dsize == FP32:
            return self._op(i, current, elements * 2), 2
        return current, dsize

    def _layer(
        self,
        i: int,
        layer,
        activation: str,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        current: _Tensor,
        dsize: int,
    ) -> tuple[_Tensor, int]:
        in_elements, out_elements = self._elements(in_shape), self._elements(out_shape)
        if isinstance(layer, (Conv2D, Dense)):
            if isinstance(layer, Conv2D) and layer.padding == "same":
                top, bottom = same_padding(in_shape[0], layer.kernel_size[0], layer.strides[0])
                left, right = same_padding(in_shape[1], layer.kernel_size[1], layer.strides[1])
                if top != bottom or left != right:  # an uneven 'same' pads a copy (ZeroPad2d)
                    in_elements = self.batch * (in_shape[0] + top + bottom) * (in_shape[1] + left + right) * in_shape[2]
                    current = self._op(i, current, in_elements * dsize)
            current, dsize = self._cast(i, current, dsize, in_elements)
            if isinstance(layer, Conv2D):
                kernel = layer.kernel_size[0] * layer.kernel_size[1] * in_shape[-1] * layer.filters
                bias = layer.filters if layer.use_bias else 0
            else:
                kernel, bias = in_shape[0] * layer.units, (layer.units if layer.use_bias else 0)
            if self.training:
                # autocast's bf16 kernel copy is saved for the backward; the backward makes the
                # gradients in bf16 before casting them to the fp32 parameters'
                saved = [current] + ([_Tensor(2 * kernel, grad=False, weights=True)] if self.bf16 else [])
                current = self._op(
                    i,
                    current,
                    out_elements * dsize,
                    saved=saved,
                    forward_extra=2 * bias if self.bf16 else 0,
                    grad_copies=2 * (kernel + bias) if self.bf16 else 0,
                    param_grad=FP32 * (kernel + bias),
                )
            else:
                if self.bf16:
                    self.weight_copies += 2 * (kernel + bias)
                current = self._op(i, current, out_elements * dsize)
            return self._activation(i, activation, current, dsize, out_elements), dsize
        if isinstance(layer, MaxPooling2D):
            left, right, top, bottom = pool_padding(layer, in_shape)
            if top or bottom or left or right:  # a -inf pad copy (ConstantPad2d)
                padded = self.batch * (in_shape[0] + top + bottom) * (in_shape[1] + left + right) * in_shape[2]
                current = self._op(i, current, padded * dsize)
            if self.training:
                indices = _Tensor(out_elements * INT64, grad=False)
                return self._op(i, current, out_elements * dsize, saved=[current, indices]), dsize
            # inference makes the indices too, and drops them
            return self._op(i, current, out_elements * dsize, forward_extra=out_elements * INT64), dsize
        if isinstance(layer, Dropout):
            dropout = FastDropout(layer.rate, self.compact_dropout_masks)
            if not self.training or dropout.threshold == 0:
                return current, dsize  # the identity
            mask = _Tensor(in_elements * dsize, grad=False)  # the keep mask, saved
            if self.device_type == "cuda":  # x * keep, then * scale: one more temporary either way
                extra = backward_extra = in_elements * dsize
            else:  # the random words and what the mask is made from, alive until the forward returns
                extra, backward_extra = dropout.cpu_temporary_bytes(in_elements), 0
            return self._op(
                i, current, out_elements * dsize, saved=[mask], forward_extra=extra, backward_extra=backward_extra
            ), dsize
        if isinstance(layer, Flatten):
            if len(in_shape) == 3 and not self.channels_last and in_shape[2] > 1 and in_shape[0] * in_shape[1] > 1:
                return self._op(i, current, out_elements * dsize), dsize  # NCHW: the permute is copied
            return current, dsize  # a view
        if isinstance(layer, BatchNormalization):
            # The forward: x * scale (a temporary), then + shift. The backward: the gradient from
            # x * scale, then var_mean's, made from two input-sized temporaries (the gradient coming
            # in is released in between, so the peak is the gradient out and three input-sized tensors).
            saved = [current] if self.training else []
            return self._op(
                i,
                current,
                out_elements * dsize,
                saved=saved,
                forward_extra=in_elements * dsize,
                backward_extra=2 * in_elements * dsize,
            ), dsize
        if isinstance(layer, Activation):
            return self._activation(i, layer.activation, current, dsize, out_elements), dsize
        return current, dsize

    def _activation(self, i: int, activation: str, current: _Tensor, dsize: int, elements: int) -> _Tensor:
        if activation in ("linear", "softmax"):
            return current
        out = _Tensor(elements * dsize, grad=True)
        saved = ([out] if activation in SAVES_OUTPUT else [current]) if self.training else []
        self.ops.append(_Op(i, current, out, saved=saved))
        return out


def _training_peak(x: _Tensor, ops: list[_Op]) -> tuple[int, int, int, int]:
    """(peak of forward and backward, activations and bf16 weight copies at that peak, the batch
    input and logits held)."""
    release: dict[int, int] = {}  # id of a saved tensor -> the op whose backward frees it (the first saver)
    for k, op in enumerate(ops):
        for tensor in op.saved:
            release.setdefault(id(tensor), k)
    logits = ops[-1].inp if ops else x
    held = x.nbytes + (logits.nbytes if logits is not x else 0)  # run()'s locals
    held_ids = {id(x), id(logits)}
    # Forward: what is saved so far, the layer's input and output, the op's temporaries.
    saved_so_far: set[int] = set()
    saved_bytes = copies = 0  # copies: the part of saved_bytes that is bf16 weight copies
    peak = peak_activations = peak_copies = 0
    layer_input: dict[int, _Tensor] = {}
    for op in ops:
        layer_input.setdefault(op.layer, op.inp)
        live = {
            id(op.inp): op.inp.nbytes,
            id(op.out): op.out.nbytes,
            id(layer_input[op.layer]): layer_input[op.layer].nbytes,
            id(x): x.nbytes,
        }
        now = saved_bytes + sum(n for key, n in live.items() if key not in saved_so_far) + op.forward_extra
        for tensor in op.saved:
            if id(tensor) not in saved_so_far and id(tensor) not in live:
                now += tensor.nbytes  # made during the op (a mask, indices, a weight copy)
        made_copies = sum(t.nbytes for t in op.saved if t.weights)
        if now > peak:
            peak, peak_copies = now, copies + made_copies
            peak_activations = now - peak_copies
        for tensor in op.saved:
            if id(tensor) not in saved_so_far:
                saved_so_far.add(id(tensor))
                saved_bytes += tensor.nbytes
                copies += tensor.nbytes if tensor.weights else 0
    # Backward, from the loss down: saved tensors are freed once their first saver has run.
    alive = saved_bytes + sum(t.nbytes for key, t in {id(x): x, id(logits): logits}.items() if key not in saved_so_far)
    grads = 0
    for k in range(len(ops) - 1, -1, -1):
        op = ops[k]
        grad_in = op.inp.nbytes if op.inp.grad else 0  # none into the batch itself
        now = alive + grads + op.out.nbytes + grad_in + op.backward_extra + op.param_grad + op.grad_copies
        if now > peak:
            peak, peak_copies = now, copies + op.grad_copies
            peak_activations = now - grads - op.param_grad - peak_copies
        grads += op.param_grad
        for tensor in op.saved:
            if release[id(tensor)] == k and id(tensor) not in held_ids:
                alive -= tensor.nbytes
                copies -= tensor.nbytes if tensor.weights else 0
    return peak, peak_activations, peak_copies, held


def _evaluation_peak(x: _Tensor, ops: list[_Op], weight_copies: int) -> int:
    """Inference: at each op its layer's input, its own input and output and its temporaries."""
    peak = x.nbytes
    layer_input: dict[int, _Tensor] = {}
    for op in ops:
        layer_input.setdefault(op.layer, op.inp)
        live = {
            id(op.inp): op.inp.nbytes,
            id(op.out): op.out.nbytes,
            id(layer_input[op.layer]): layer_input[op.layer].nbytes,
            id(x): x.nbytes,
        }
        peak = max(peak, sum(live.values()) + op.forward_extra)
    return peak + weight_copies


def estimate_training_memory(
    spec: ModelSpec,
    recipe: Recipe,
    hardware: Hardware,
    train_images: int,
    test_images: int,
    *,
    validation_images: int = 0,
) -> MemoryEstimate:
    """What training `spec` with `recipe` on `hardware` needs, without building or allocating anything.

    `train_images` and `test_images` are the counts training sees (after the limits; with a
    validation split, `train_images` is the whole training split and `validation_images` the part
    held out). Batches never exceed the images there are.
    """
    device_type = torch.device(hardware.device).type
    image = math.prod(spec.input_shape)  # uint8 pixels
    fit_images = max(train_images - validation_images, 1)
    batch = min(recipe.batch_size, fit_images)
    evaluated = max(validation_images, test_images, 1)  # validation each epoch, the test split at the end
    eval_batch = min(recipe.eval_batch_size, evaluated)
    counts = spec_layer_counts(spec)
    trainable = sum(c.trainable for c in counts)
    non_trainable = sum(c.non_trainable for c in counts)
    tensors = sum(_parameter_tensors(layer, c) for layer, c in zip(spec.layers, counts))

    builder = _Builder(spec, batch, hardware, training=True)
    x, ops = builder.build()
    backward_peak, activations, weight_copies, held_batch = _training_peak(x, ops)
    gradients = FP32 * trainable
    update = gradients + 2 * FP32 * trainable + held_batch

    evaluator = _Builder(spec, eval_batch, hardware, training=False)
    eval_x, eval_ops = evaluator.build()
    outputs = 2 * (INT64 + FP32) * evaluated  # predictions and confidences, gathered then concatenated
    evaluation = gradients + _evaluation_peak(eval_x, eval_ops, evaluator.weight_copies) + outputs

    dataset = fit_images * INT64  # each epoch's shuffled order
    if device_type != "cpu":
        dataset += (train_images + test_images) * (image + INT64)
    if validation_images:
        dataset += train_images * (image + INT64)  # the unit's split copies

    layers = _layer_parts(spec, counts, ops)
    return MemoryEstimate(
        batch_size=batch,
        eval_batch_size=eval_batch,
        precision=hardware.precision,
        parameters=FP32 * (trainable + non_trainable),
        gradients=gradients,
        # Moments per parameter (Adam and AdamW two, SGD one with momentum, RMSprop one or two), step counters,
        # and a copy of the weights when the best epoch's are kept (best checkpoint, restore_best_weights).
        optimizer_state=_slots(recipe) * FP32 * trainable
        + FP32 * tensors
        + _kept_copies(recipe) * FP32 * (trainable + non_trainable),
        dataset=dataset,
        activations=activations,
        weight_copies=weight_copies,
        backward_peak=backward_peak,
        update=update,
        evaluation=evaluation,
        layers=layers,
    )


def _parameter_tensors(layer, counts) -> int:
    """How many parameter tensors a layer has (Adam keeps a step counter for each)."""
    if not counts.trainable:
        return 0
    if isinstance(layer, (Conv2D, Dense)):
        return 1 + int(layer.use_bias)
    if isinstance(layer, BatchNormalization):
        return int(layer.center) + int(layer.scale)
    return 0


def _layer_parts(spec: ModelSpec, counts, ops: list[_Op]) -> tuple[LayerMemory, ...]:
    shapes = [tuple(spec.input_shape)] + spec.output_shapes()
    maker = {id(op.out): op.layer for op in ops}
    saved: dict[int, int] = {}
    seen: set[int] = set()
    for op in ops:
        for tensor in op.saved:
            if id(tensor) not in seen and not tensor.weights:
                seen.add(id(tensor))
                # a saved input belongs to the layer that made it (the batch to the first layer);
                # masks, indices and weight copies to their own
                owner = maker.get(id(tensor), op.layer)
                saved[owner] = saved.get(owner, 0) + tensor.nbytes
    parts = []
    for i, (layer, name, c) in enumerate(zip(spec.layers, spec.layer_names(), counts)):
        parts.append(
            LayerMemory(
                name,
                layer.type,
                describe_layer(layer, shapes[i]),
                FP32 * (c.trainable + c.non_trainable),
                c.trainable,
                saved.get(i, 0),
            )
        )
    return tuple(parts)


def describe_layer(layer, in_shape: tuple[int, ...]) -> str:
    """A layer in a few words: 'Dense, 1,000 units on 784 inputs'."""

    def count(n: int, noun: str) -> str:
        return f"{format_count(n)} {noun}" + ("" if n == 1 else "s")

    if isinstance(layer, Dense):
        return f"Dense, {count(layer.units, 'unit')} on {count(in_shape[0], 'input')}"
    if isinstance(layer, Conv2D):
        kh, kw = layer.kernel_size
        return f"Conv2D, {count(layer.filters, 'filter')} of {kh}x{kw} on {count(in_shape[-1], 'channel')}"
    if isinstance(layer, BatchNormalization):
        return f"BatchNormalization over {count(in_shape[-1], 'channel')}"
    return layer.type


# ---------------------------------------------------------------------------------------------
# Available memory


def available_memory(device: torch.device | str) -> int:
    """Bytes this process can still allocate on `device`: free GPU memory (`torch.cuda.mem_get_info`),
    or on the CPU the machine's MemAvailable, lowered by a cgroup memory limit or an address-space
    rlimit when one applies."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = [_meminfo_available()]
    candidates += [value for value in (_cgroup_available(), _rlimit_available()) if value is not None]
    return max(0, min(candidates))


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _inactive_file(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available() -> int | None:
    """Limit minus usage (page cache that can be dropped excluded) of this process's memory cgroup."""
    root = Path("/sys/fs/cgroup")
    v2 = (root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file")
    v1 = (
        root / "memory" / "memory.limit_in_bytes",
        root / "memory" / "memory.usage_in_bytes",
        root / "memory" / "memory.stat",
        "total_inactive_file",
    )
    for limit_path, usage_path, stat_path, key in (v2, v1):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:
            return limit - max(0, usage - _inactive_file(stat_path, key))
    return None


def _rlimit_available() -> int | None:
    """What an address-space limit (`ulimit -v`) leaves this process."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


# ---------------------------------------------------------------------------------------------
# The check


def format_bytes(n: int) -> str:
    """Bytes in binary units, one decimal: '41.2 GiB'; beyond YiB, '3.1e+303 bytes' (integer
    arithmetic throughout: any size, no float overflow)."""
    if n < 1024:
        return f"{n} bytes"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    for power, unit in enumerate(units, start=1):
        size = 1024**power
        if n * 10 + size // 2 < 1024 * size * 10 or unit == "YiB":  # below 1024.0 of this unit once rounded
            tenths = (n * 10 + size // 2) // size
            if tenths < 10000 * 10:
                return f"{tenths // 10:,}.{tenths % 10} {unit}"
    return f"{scientific_notation(n)} bytes"


def _counts(plan: RunPlan, dataset: Dataset) -> tuple[int, int, int]:
    """(training images, test images, validation images) as DeviceData will hold them."""
    train, test = len(dataset.train_images), len(dataset.test_images)
    if plan.data.limit_train is not None:
        train = min(train, plan.data.limit_train)
    if plan.data.limit_test is not None:
        test = min(test, plan.data.limit_test)
    validation = int(round(train * plan.data.val_split)) if plan.data.val_split else 0
    return train, test, validation


def check_fits_in_memory(plan: RunPlan, dataset: Dataset, hardware: Hardware | None = None) -> None:
    """Refuse, with a ConfigError of one line, an arm whose estimated need exceeds 80% of the memory
    available on its device. Cheap: the estimate is arithmetic on the spec, nothing is allocated."""
    hardware = hardware or plan.hardware
    train, test, validation = _counts(plan, dataset)
    available: int | None = None
    for arm in plan.arms:
        estimate = estimate_training_memory(arm.spec, arm.recipe, hardware, train, test, validation_images=validation)
        if available is None:
            available = available_memory(hardware.device)
        limit = available * FIT_FRACTION[0] // FIT_FRACTION[1]
        if estimate.total <= limit:
            continue
        raise ConfigError(
            _refusal(arm.name, arm.spec, arm.recipe, hardware, estimate, available, limit, train, test, validation)
        )


def _refusal(
    name: str,
    spec: ModelSpec,
    recipe: Recipe,
    hardware: Hardware,
    estimate: MemoryEstimate,
    available: int,
    limit: int,
    train: int,
    test: int,
    validation: int,
) -> str:
    b = format_bytes
    capped = ", all its training images" if estimate.batch_size < recipe.batch_size else ""
    parts = [
        f"parameters {b(estimate.parameters)}",
        f"gradients {b(estimate.gradients)}",
        f"optimizer state {b(estimate.optimizer_state)}",
        f"activations {b(estimate.activations)}",
    ]
    if estimate.weight_copies * 100 >= estimate.total:
        parts.append(f"bf16 weight copies {b(estimate.weight_copies)}")
    phase = estimate.peak_phase
    if phase == "update":
        parts.append(f"the update's temporaries {b(2 * estimate.gradients)}")
    elif phase == "evaluation":
        parts.append(f"evaluation at batch size {estimate.eval_batch_size:,} {b(estimate.evaluation)}")
    if estimate.dataset * 100 >= estimate.total:
        parts.append(f"data {b(estimate.dataset)}")
    layer = estimate.largest_layer
    sizes = []
    if layer.weights and layer.weights * 20 >= layer.activations:
        sizes.append(f"{b(layer.weights)} of weights")
    if layer.activations and layer.activations * 20 >= layer.weights:
        sizes.append(f"{b(layer.activations)} of activations at batch size {estimate.batch_size:,}")
    described = f"{layer.description}: {', '.join(sizes)}" if sizes else layer.description
    where = (
        "this machine has"
        if torch.device(hardware.device).type == "cpu"
        else f"{hardware.device} ({hardware.device_name}) has"
    )
    advice = _advice(spec, recipe, hardware, estimate, limit, train, test, validation)
    return (
        f"{spec.source}: model '{name}' needs about {b(estimate.total)} to train at batch size "
        f"{estimate.batch_size:,}{capped} ({', '.join(parts)}); the largest layer is {layer.name} ({described}); "
        f"{where} {b(available)} available (80% = {b(limit)}): {advice}"
    )


def _advice(
    spec: ModelSpec,
    recipe: Recipe,
    hardware: Hardware,
    estimate: MemoryEstimate,
    limit: int,
    train: int,
    test: int,
    validation: int,
) -> str:
    """A smaller --batch-size that fits, if one does; else what does not fit even at batch size 1."""

    def estimate_at(batch: int) -> MemoryEstimate:
        smaller = dataclasses.replace(recipe, batch_size=batch)
        return estimate_training_memory(spec, smaller, hardware, train, test, validation_images=validation)

    smallest = estimate_at(1)
    if estimate.batch_size > 1 and smallest.total <= limit:
        low, high = 1, estimate.batch_size - 1  # the largest batch size that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if estimate_at(middle).total <= limit else (low, middle - 1)
        return f"use --batch-size {low:,} or smaller, or a smaller model"
    if smallest.peak_phase == "evaluation":
        return (
            f"even at batch size 1, evaluating {smallest.eval_batch_size:,} images at a time needs "
            f"{format_bytes(smallest.held + smallest.evaluation)}: use a smaller model, or a smaller "
            "eval_batch_size in the recipe"
        )
    return "use a smaller model (fewer units or filters, or a pooling layer before the Dense layers)"


def _slots(recipe: Recipe) -> int:
    """Parameter-sized state tensors the recipe's optimizer keeps (optim.py's Keras optimizers)."""
    if recipe.optimizer in ("adam", "adamw"):
        return 2
    if recipe.optimizer == "rmsprop":
        return 1 + (recipe.momentum > 0)
    return int(recipe.momentum > 0)


def _kept_copies(recipe: Recipe) -> int:
    """Copies of the weights the epoch-end options keep: the best checkpoint's and early stopping's."""
    stopping = recipe.early_stopping is not None and recipe.early_stopping.restore_best_weights
    return int(recipe.best_checkpoint is not None) + int(stopping)
