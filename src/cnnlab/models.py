"""From spec to `torch.nn.Module`, with Keras's semantics; the built-in model zoo; summaries and FLOPs.

What "Keras's semantics" means here, layer by layer:
- Conv2D/Dense kernels use Keras's initializers (glorot_uniform by default; he_normal is a normal
  truncated at two standard deviations, rescaled so the samples' stddev is sqrt(2 / fan_in)) and
  zero biases.
- 'same' padding pads as TensorFlow does: for an even total the extra row/column goes at the
  bottom/right. 'valid' and pooling floor.
- Flatten reads (height, width, channels) in Keras's order, so Dense weights line up with Keras's.
- BatchNormalization uses momentum 0.99 and epsilon 1e-3, normalises with the biased batch
  variance and updates the moving variance with it, as Keras 3 does.
- The output softmax is left to the loss: the module returns logits.

`build_model(spec, numerics=2)` builds with Keras 2.2.4's numerics instead (the notebook's Keras;
see `KerasBatchNorm` and `keras_init_`), checked against formulas from Keras 2.2.4's source (it
cannot be installed here: it needs Python 3.7 and TensorFlow 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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
    classifier_head,
    same_padding,
)

# ---------------------------------------------------------------------------------------------
# Initializers


def keras_init_(tensor: torch.Tensor, name: str, generator: torch.Generator | None, numerics: int = 3) -> None:
    """Fill `tensor` (PyTorch layout: out, in, kh, kw or out, in) as Keras's initializer `name` would.

    `numerics` 2 takes a bias's fans as Keras 2 does: sqrt(length) (keras/initializers.py
    `_compute_fans`, "no specific assumptions" for a 1-D shape); Keras 3 takes its length. The
    `*_normal_keras21` names are Keras before 2.2.0's VarianceScaling normal: truncated at +-2 stddev
    like the others but without the variance correction, so the samples' stddev is 0.8796 x the
    target's (Keras 2.2.0 added the correction to keras/initializers.py)."""
    if name == "zeros":
        nn.init.zeros_(tensor)
        return
    if name == "ones":
        nn.init.ones_(tensor)
        return
    if tensor.dim() == 1:  # a bias: Keras 3 takes fan_in = fan_out = its length, Keras 2 its square root
        fan_in = fan_out = tensor.shape[0] if numerics == 3 else math.sqrt(tensor.shape[0])
    else:
        receptive = math.prod(tensor.shape[2:])
        fan_in, fan_out = tensor.shape[1] * receptive, tensor.shape[0] * receptive
    family, distribution = name.removesuffix("_keras21").split("_")
    scale, fan = {"glorot": (1.0, (fan_in + fan_out) / 2), "he": (2.0, fan_in), "lecun": (1.0, fan_in)}[family]
    variance = scale / fan
    with torch.no_grad():
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            nn.init.uniform_(tensor, -limit, limit, generator=generator)
        else:
            # Keras's VarianceScaling: a normal truncated at +-2 stddev, widened so that the
            # truncated samples keep the target variance (0.8796... is the truncated stddev of N(0, 1)).
            stddev = math.sqrt(variance)
            if not name.endswith("_keras21"):
                stddev /= 0.87962566103423978
            nn.init.trunc_normal_(tensor, 0.0, stddev, -2 * stddev, 2 * stddev, generator=generator)


# ---------------------------------------------------------------------------------------------
# Modules


class KerasBatchNorm(nn.Module):
    """Batch normalisation over dimension 1 (channels for NCHW, features for 2-D) as Keras does it.

    Both Keras versions normalise a training batch with its biased moments. They differ in the
    moving averages (`numerics`):

    - 3 (Keras 3): moving = momentum * moving + (1 - momentum) * batch, with the biased variance.
    - 2 (Keras 2.2.4 on TensorFlow 1, checked against formulas from its source; it cannot be
      installed here). keras/layers/normalization.py multiplies the batch variance by
      n / (n - (1 + epsilon)), n the values per channel; for a 4-D input the variance it gets from
      `tf.nn.fused_batch_norm` (keras/backend/tensorflow_backend.py `normalize_batch_in_training`)
      already carries Bessel's n / (n - 1) (tensorflow/core/kernels/fused_batch_norm_op.cc,
      `rest_size_adjust`), so a convolution's moving variance gets both factors, a Dense's only the
      first. `K.moving_average_update` is TensorFlow's `assign_moving_average(zero_debias=True)`
      (tensorflow/python/training/moving_averages.py): a biased average from 0 and a step count t,
      moving_t = biased_t / (1 - momentum^t), so the initial 0 and 1 are ignored. As biased_t =
      moving_t * (1 - momentum^t), that is moving_t = lerp(moving_{t-1}, batch, (1 - momentum) /
      (1 - momentum^t)), and the only extra state is t: the buffer `num_batches_tracked`, which
      only this mode has (Keras 3's state dicts are unchanged; `load_weights` reads either).
    """

    def __init__(self, channels: int, spec: BatchNormalization, numerics: int = 3) -> None:
        super().__init__()
        self.momentum, self.epsilon, self.numerics = spec.momentum, spec.epsilon, numerics
        self.weight = nn.Parameter(torch.ones(channels)) if spec.scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if spec.center else None
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        if numerics == 2:
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like Keras under mixed precision, normalise in float32 and cast back: bf16 moments lose
        # precision, and `x * scale + shift` cancels when the mean is large against the spread.
        output_dtype = x.dtype
        x = x.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            axes = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=axes, correction=0)
            with torch.no_grad():
                if self.numerics == 3:  # Keras 3: moving = moving * momentum + batch * (1 - momentum)
                    self.running_mean.lerp_(mean.detach(), 1 - self.momentum)
                    self.running_var.lerp_(var.detach(), 1 - self.momentum)
                else:
                    self._keras2_update(mean.detach(), var.detach(), x.numel() // x.shape[1], x.dim())
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.epsilon)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return (x * scale.reshape(shape) + shift.reshape(shape)).to(output_dtype)

    def _keras2_update(self, mean: torch.Tensor, var: torch.Tensor, n: int, dims: int) -> None:
        """Keras 2.2.4's moving averages (see the class): unbiased variance, zero-debiased average."""
        factor = n / (n - (1.0 + self.epsilon))
        if dims == 4:  # tf.nn.fused_batch_norm's own Bessel correction (1 for n = 1)
            factor *= n / max(n - 1, 1)
        self.num_batches_tracked.add_(1)
        weight = (1 - self.momentum) / (1 - self.momentum ** self.num_batches_tracked.double())
        self.running_mean.lerp_(mean, weight.float())
        self.running_var.lerp_(var * factor, weight.float())


class KerasFlatten(nn.Module):
    """Flatten in Keras's (height, width, channels) order; free when the input is channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)


_SAME_SIZE_INT = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
# An element type of each width in bytes, for gathering a table row of masks as one element (the
# 16-byte type is complex only for its size: index_select moves the bytes as they are).
_WIDTH_TYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _random_words(count: int) -> torch.Tensor:
    """`count` uniform 64-bit words from the global generator."""
    return torch.empty(count, dtype=torch.int64).random_(-(2**63), None)  # the full range: no modulo


def _in_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`flat` (as many elements as `like`) viewed in `like`'s shape with `like`'s order of dimensions
    in memory (channels_last stays channels_last), so that elementwise work with `like` is a straight
    pass."""
    order = sorted(range(like.dim()), key=like.stride, reverse=True)
    return flat.view([like.shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])


class FastDropout(nn.Module):
    """Inverted dropout, like `nn.Dropout`, with cheaper masks.

    On the CPU `bernoulli_` is slow (a quarter of a convnet3 step in eager PyTorch). Here one
    64-bit random draw gives four 16-bit uniform numbers, compared with a threshold: the mask costs
    a fraction, and the rate is honoured to 1/65536 (the rate actually used scales the survivors).
    On a GPU, where masks are cheap, a half-precision uniform draw does the same job.

    With `compact_masks` (cnnlab's CPU default since 0.2; runs recorded before it keep the masks
    above), each element takes only the random bits its rate needs: a rate that is a multiple of
    1/2**k for k in 1, 2, 4 or 8 (the notebook's 0.25 and 0.5: 2 bits and 1) draws k bits per element,
    exactly that rate, and each random byte becomes the mask values of its 8/k elements through one
    table lookup; other rates draw 16 bits as above. The masks are laid out in the activations' own
    memory order, not NCHW's, so no copy changes their layout (BENCHMARKS.md, "Compact dropout masks").
    """

    def __init__(self, rate: float, compact_masks: bool = False) -> None:
        super().__init__()
        self.rate, self.compact_masks = rate, compact_masks
        self.threshold = round(rate * 65536)  # drop when a uniform int16 (offset to 0..65535) is below this
        self.scale = 65536 / (65536 - self.threshold)
        # The survivors' value in each float dtype, as the bits of the same-size integer (CPU masks;
        # on the CPU explicitly: models may be built under another default device, e.g. meta).
        self.scale_bits = {
            dtype: torch.ones((), dtype=dtype, device="cpu").mul_(self.scale).view(integer).item()
            for dtype, integer in _SAME_SIZE_INT.items()
        }
        # Random bits per element: the fewest that give this rate exactly (16: the rate to 1/65536).
        exact = [bits for bits in (1, 2, 4, 8) if (rate * 2**bits).is_integer()]
        self.bits = exact[0] if compact_masks and exact else 16
        self._tables: dict[torch.dtype, torch.Tensor] = {}  # mask tables by dtype, made on first use

    def cpu_temporary_bytes(self, elements: int) -> int:
        """Bytes a CPU mask for `elements` elements holds beyond the mask itself while it is made: the
        random words (2 bytes an element at 16 bits) or, with a table, their bytes and those bytes as
        int32 row numbers."""
        if self.bits == 16:
            return 2 * elements  # the words, made into 0/1 in place; the mask is then a copy
        drawn = -(-elements * self.bits // 8)
        return 5 * drawn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.is_cuda:
            keep = torch.rand(x.shape, device=x.device, dtype=torch.float16) >= self.rate
            return x * keep.to(x.dtype) * (1.0 / (1.0 - self.rate))
        if not self.compact_masks:
            return x * self._nchw_mask(x)
        if self.bits < 16:
            return x * self._table_mask(x)
        return x * self._sixteen_bit_mask(x)

    def _keep(self, noise: torch.Tensor) -> torch.Tensor:
        """16-bit uniform noise made, in place, 0 where dropped and 1 where kept (noise >= limit, by
        clamping: bool masks convert to floats several times slower)."""
        limit = self.threshold - 32768
        return noise.clamp_(limit - 1, limit).sub_(limit - 1)

    def _nchw_mask(self, x: torch.Tensor) -> torch.Tensor:
        """cnnlab 0.1's mask: 16 bits per element, drawn in NCHW order whatever x's layout."""
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        keep = self._keep(words.view(torch.int16)[: x.numel()].view(x.shape))  # the same draws in any layout
        # 0/1 times the bit pattern of the survivors' scale in x's dtype is the mask itself, seen as
        # integers: one copy then puts it in x's dtype and memory layout (elementwise work between
        # tensors of different layouts takes a slow path, 10x here).
        integer = _SAME_SIZE_INT[x.dtype]
        return torch.empty_like(x).view(integer).copy_(keep).mul_(self.scale_bits[x.dtype]).view(x.dtype)

    def _sixteen_bit_mask(self, x: torch.Tensor) -> torch.Tensor:
        """16 bits per element, as `_nchw_mask`, in x's memory order."""
        keep = self._keep(_random_words((x.numel() + 3) // 4).view(torch.int16)[: x.numel()])
        mask = keep.to(_SAME_SIZE_INT[x.dtype]).mul_(self.scale_bits[x.dtype]).view(x.dtype)
        return _in_memory_order(mask, x)

    def _table_mask(self, x: torch.Tensor) -> torch.Tensor:
        """`bits` per element: each random byte picks the masks of its 8 / bits elements from a table."""
        per_byte = 8 // self.bits
        table = self._tables.get(x.dtype)
        if table is None:
            table = self._tables[x.dtype] = self._mask_table(x.dtype)
        count = -(-x.numel() // per_byte)
        rows = _random_words(-(-count // 8)).view(torch.uint8)[:count].to(torch.int32)
        mask = table.index_select(0, rows).view(x.dtype).view(-1)[: x.numel()]
        return _in_memory_order(mask, x)

    def _mask_table(self, dtype: torch.dtype) -> torch.Tensor:
        """Row b: the mask values of the 8 / bits elements whose random bits are byte b's (element j:
        bits j*bits and up), each the survivors' scale or 0 as x's dtype, the row as one wide
        element (or several)."""
        per_byte, field = 8 // self.bits, (1 << self.bits) - 1
        values = (torch.arange(256).unsqueeze(1) >> (torch.arange(per_byte) * self.bits)) & field
        keep = values >= round(self.rate * 2**self.bits)
        integer = _SAME_SIZE_INT[dtype]
        table = torch.where(keep, self.scale_bits[dtype], 0).to(integer)
        width = min(per_byte * integer.itemsize, 16)
        return table.view(_WIDTH_TYPE[width]).squeeze(1)


# A convolution with at most this many output pixels (convnet7's 3x3-image layers) that pads nothing
# itself runs faster in bf16 on the CPU as one matrix product over its patches than as oneDNN's
# direct convolution (BENCHMARKS.md, "Small convolutions as one matrix product"); larger ones do not.
# With AMX, one that pads itself does too (convnet5's last; BENCHMARKS.md, "CPU kind 3").
MATMUL_CONV_MAX_PIXELS = 9


class _Patches(torch.autograd.Function):
    """The patches of an (n, c, h, w) image in channels_last memory as the rows of one matrix
    (im2col), each row (kernel row, kernel column, channel), for `MatmulConv2d`.

    The forward is one `cat` of strided slices. Autograd through those slices would zero-fill a whole
    image for each kernel position and add the images up; this backward adds each position's
    gradient into one zeroed image instead, last position first, the order in which autograd adds
    them, so the gradient is the same to the bit and costs fewer passes (BENCHMARKS.md, "CPU kind 3
    again").
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
        (kernel_h, kernel_w), (stride_h, stride_w) = kernel_size, stride
        n, channels, height, width = x.shape
        out_h, out_w = (height - kernel_h) // stride_h + 1, (width - kernel_w) // stride_w + 1
        ctx.windows = [
            (slice(i, i + stride_h * (out_h - 1) + 1, stride_h), slice(j, j + stride_w * (out_w - 1) + 1, stride_w))
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        ctx.pixels_shape = (n, height, width, channels)
        pixels = x.permute(0, 2, 3, 1)  # (n, h, w, c): a view of a channels_last tensor
        patches = torch.cat([pixels[:, rows, columns] for rows, columns in ctx.windows], dim=-1)
        return patches.reshape(n * out_h * out_w, kernel_h * kernel_w * channels)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        n, _, _, channels = ctx.pixels_shape
        pieces = grad.reshape(n, -1, len(ctx.windows), channels)  # (image, output pixel, kernel position, channel)
        pixels = torch.zeros(ctx.pixels_shape, dtype=grad.dtype, device=grad.device)
        for position in reversed(range(len(ctx.windows))):
            rows, columns = ctx.windows[position]
            window = pixels[:, rows, columns]
            window.add_(pieces[:, :, position].view(window.shape))
        return pixels.permute(0, 3, 1, 2), None, None


class MatmulConv2d(nn.Conv2d):
    """`nn.Conv2d` computed as one matrix product over its input's patches (im2col).

    The same parameters, state-dict keys and arithmetic as `nn.Conv2d` (products summed in fp32
    under bf16 autocast), in another order of rounding; for layers whose output is a few pixels,
    where a direct convolution's kernels cannot fill the vector units (BENCHMARKS.md). Groups and
    dilation stay 1, as for every cnnlab convolution. A channels_last input gives a channels_last
    output, with no copy but the patches' own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding != (0, 0):
            pad_h, pad_w = self.padding
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.stride
        n, channels, height, width = x.shape
        out_h, out_w = (height - kernel_h) // stride_h + 1, (width - kernel_w) // stride_w + 1
        patches = _Patches.apply(x, self.kernel_size, self.stride)
        weight = self.weight.permute(2, 3, 1, 0).reshape(kernel_h * kernel_w * channels, self.out_channels)
        out = patches @ weight if self.bias is None else torch.addmm(self.bias, patches, weight)
        return out.view(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)


ACTIVATION_MODULES = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}


def _with_activation(module: nn.Module, activation: str) -> nn.Module:
    if activation == "linear":
        return module
    return nn.Sequential(module, ACTIVATION_MODULES[activation]())


def _build_layer(
    layer: LayerSpec,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    generator: torch.Generator | None,
    numerics: int = 3,
    small_convs_as_matmul: bool = False,
    compact_dropout_masks: bool = False,
    padded_small_convs_as_matmul: bool = False,
) -> nn.Module:
    """One spec layer as a module with Keras `numerics` (2 or 3); `in_shape` and `out_shape` are
    channels_last without the batch axis."""
    if isinstance(layer, Conv2D):
        height, width, channels = in_shape
        top, bottom, left, right = 0, 0, 0, 0
        if layer.padding == "same":
            top, bottom = same_padding(height, layer.kernel_size[0], layer.strides[0])
            left, right = same_padding(width, layer.kernel_size[1], layer.strides[1])
        # Padding on both sides alike is the convolution's own, whose direct kernels skip the zeros; a
        # matrix product would multiply them too, so such layers qualify only where asked (with AMX).
        pads_itself = (top, left) != (0, 0) and top == bottom and left == right
        as_matmul = (
            small_convs_as_matmul
            and (padded_small_convs_as_matmul or not pads_itself)
            and out_shape[0] * out_shape[1] <= MATMUL_CONV_MAX_PIXELS
        )
        conv_type = MatmulConv2d if as_matmul else nn.Conv2d
        conv = conv_type(channels, layer.filters, layer.kernel_size, stride=layer.strides, bias=layer.use_bias)
        keras_init_(conv.weight, layer.kernel_initializer, generator, numerics)
        if conv.bias is not None:
            keras_init_(conv.bias, layer.bias_initializer, generator, numerics)
        module: nn.Module = conv
        if top == bottom and left == right:
            conv.padding = (top, left)
        else:
            module = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
        return _with_activation(module, layer.activation)
    if isinstance(layer, MaxPooling2D):
        pool = nn.MaxPool2d(layer.pool_size, layer.strides or layer.pool_size)
        left, right, top, bottom = pool_padding(layer, in_shape)
        if top or bottom or left or right:
            return nn.Sequential(nn.ConstantPad2d((left, right, top, bottom), float("-inf")), pool)
        return pool
    if isinstance(layer, Dropout):
        return FastDropout(layer.rate, compact_dropout_masks)
    if isinstance(layer, Flatten):
        return KerasFlatten()
    if isinstance(layer, Dense):
        linear = nn.Linear(in_shape[0], layer.units, bias=layer.use_bias)
        keras_init_(linear.weight, layer.kernel_initializer, generator, numerics)
        if linear.bias is not None:
            keras_init_(linear.bias, layer.bias_initializer, generator, numerics)
        return _with_activation(linear, layer.activation)
    if isinstance(layer, BatchNormalization):
        return KerasBatchNorm(in_shape[-1], layer, numerics)
    if isinstance(layer, Activation):
        return ACTIVATION_MODULES[layer.activation]()
    raise TypeError(f"unsupported layer {layer!r}")  # parse_spec only makes the types above


def pool_padding(layer: MaxPooling2D, in_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The -inf padding (left, right, top, bottom) a max-pooling layer adds to its channels_last
    `in_shape` (TensorFlow's 'same' padding; none for 'valid')."""
    if layer.padding != "same":
        return 0, 0, 0, 0
    strides = layer.strides or layer.pool_size
    top, bottom = same_padding(in_shape[0], layer.pool_size[0], strides[0])
    left, right = same_padding(in_shape[1], layer.pool_size[1], strides[1])
    return left, right, top, bottom


def relu_after_pooling(spec: ModelSpec) -> frozenset[int]:
    """The layers (indices) whose ReLU the built network applies after the max-pooling layer that
    follows them: ReLU and max-pooling commute (both monotonic, and pooling picks the same element
    either way), so the values and gradients are the same, while the ReLU and its backward touch a
    quarter of the elements (BENCHMARKS.md, "Compact dropout masks"). A Conv2D's own ReLU, before a
    pooling that pads nothing."""
    shapes = [tuple(spec.input_shape)] + spec.output_shapes()
    return frozenset(
        i
        for i, (layer, following) in enumerate(zip(spec.layers, spec.layers[1:]))
        if isinstance(layer, Conv2D)
        and layer.activation == "relu"
        and isinstance(following, MaxPooling2D)
        and not any(pool_padding(following, shapes[i + 1]))
    )


class SequentialNet(nn.Module):
    """A spec's network: one submodule per spec layer, input (N, C, H, W) floats, output logits."""

    def __init__(
        self,
        spec: ModelSpec,
        generator: torch.Generator | None = None,
        numerics: int = 3,
        small_convs_as_matmul: bool = False,
        compact_dropout_masks: bool = False,
        padded_small_convs_as_matmul: bool = False,
    ) -> None:
        super().__init__()
        self.spec, self.numerics = spec, numerics
        shapes = [tuple(spec.input_shape)] + spec.output_shapes()
        head = classifier_head(spec)
        modules: list[nn.Module] = []
        moved_relus = relu_after_pooling(spec)
        for i, layer in enumerate(spec.layers):
            if i >= head:  # a trailing Activation('softmax'): the loss applies it
                modules.append(nn.Identity())
                continue
            if i == head - 1 and isinstance(layer, Dense) and layer.activation == "softmax":
                layer = dataclasses.replace(layer, activation="linear")  # logits out; softmax in the loss
            module = _build_layer(
                layer,
                shapes[i],
                shapes[i + 1],
                generator,
                numerics,
                small_convs_as_matmul,
                compact_dropout_masks,
                padded_small_convs_as_matmul,
            )
            if i in moved_relus:  # Sequential(convolution, ReLU): the ReLU's place stays, so do the keys
                module[-1] = nn.Identity()
            if i - 1 in moved_relus:
                module = nn.Sequential(module, nn.ReLU())
            modules.append(module)
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_model(
    spec: ModelSpec,
    seed: int | None = None,
    numerics: int = 3,
    small_convs_as_matmul: bool = False,
    compact_dropout_masks: bool = False,
    padded_small_convs_as_matmul: bool = False,
) -> SequentialNet:
    """The spec's network with Keras's initialisation, seeded when `seed` is given; `numerics` 2
    gives Keras 2.2.4's batch normalisation and bias fans, 3 (the default) Keras 3's;
    `small_convs_as_matmul` computes convolutions of at most `MATMUL_CONV_MAX_PIXELS` output pixels
    as one matrix product (`MatmulConv2d`: the same weights and initialisation), those that pad
    their input themselves too with `padded_small_convs_as_matmul`; `compact_dropout_masks` draws
    CPU dropout masks with only the random bits their rate needs, in the activations' memory order
    (`FastDropout`)."""
    if numerics not in (2, 3):
        raise ValueError(f"numerics must be 2 (Keras 2.2.4) or 3 (Keras 3), got {numerics!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SequentialNet(
        spec, generator, numerics, small_convs_as_matmul, compact_dropout_masks, padded_small_convs_as_matmul
    )


STEP_COUNT = "num_batches_tracked"  # a Keras-2-numerics BatchNormalization's step count (KerasBatchNorm)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `state_dict` into `model` strictly, except for BatchNormalization's step count, which only
    models built with Keras 2.2.4's numerics have: a saved count the model lacks is ignored (eval-mode
    outputs never read it), one the model has and the state lacks keeps its value (0 when built).
    So the weights of either numerics load into a model of either, e.g. for inference."""
    own = model.state_dict()
    state = {k: v for k, v in state_dict.items() if k in own or k.rsplit(".", 1)[-1] != STEP_COUNT}
    state |= {k: v for k, v in own.items() if k.rsplit(".", 1)[-1] == STEP_COUNT and k not in state}
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Summary and FLOPs


@dataclass(frozen=True)
class LayerSummary:
    """One row of a Keras-style summary."""

    name: str
    layer_type: str
    output_shape: tuple[int, ...]  # channels_last, without the batch axis
    params: int
    non_trainable: int
    flops: int  # forward multiply-adds x 2, per sample


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers and totals, with the numbers Keras's `model.summary()` prints."""

    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[LayerSummary, ...]

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def non_trainable_params(self) -> int:
        return sum(layer.non_trainable for layer in self.layers)

    @property
    def trainable_params(self) -> int:
        return self.total_params - self.non_trainable_params

    @property
    def forward_flops(self) -> int:
        """FLOPs of one sample's forward pass (convolutions and dense layers, 2 per multiply-add)."""
        return sum(layer.flops for layer in self.layers)

    @property
    def training_flops(self) -> int:
        """FLOPs of one sample's training step: forward, plus backward at about twice the forward."""
        return 3 * self.forward_flops

    def to_text(self) -> str:
        """The summary as Keras prints it (plus FLOPs)."""
        rows = [
            (
                f"{layer.name} ({layer.layer_type})",
                "(None, " + ", ".join(map(_plain, layer.output_shape)) + ")",
                format_count(layer.params),
            )
            for layer in self.layers
        ]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) + 3
            for i, h in enumerate(("Layer (type)", "Output Shape", "Param #"))
        ]
        line = lambda cells: "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        rule = "_" * sum(widths)
        out = [f'Model: "{self.name}"', rule, line(("Layer (type)", "Output Shape", "Param #")), "=" * sum(widths)]
        for i, row in enumerate(rows):
            out.append(line(row))
            out.append(rule if i < len(rows) - 1 else "=" * sum(widths))
        out += [
            f"Total params: {format_count(self.total_params)}",
            f"Trainable params: {format_count(self.trainable_params)}",
            f"Non-trainable params: {format_count(self.non_trainable_params)}",
            rule,
            f"FLOPs per sample: {format_flops(self.forward_flops)} inference, "
            f"{format_flops(self.training_flops)} training",
        ]
        return "\n".join(out)


def format_flops(flops: int | float) -> str:
    """Human-readable FLOPs: 12.3 MFLOPs, 1.2 GFLOPs (any size: a spec's counts are Python ints)."""
    for unit, size in (("PFLOPs", 10**15), ("TFLOPs", 10**12), ("GFLOPs", 10**9), ("MFLOPs", 10**6), ("kFLOPs", 10**3)):
        if flops >= size:
            if unit == "PFLOPs" and flops >= 10**18:  # beyond readable units: keep the magnitude
                return f"{scientific_notation(flops)} FLOPs"
            return f"{flops / size:.1f} {unit}"
    return f"{flops:.0f} FLOPs"


def scientific_notation(value: int | float) -> str:
    """A positive number as '2.4e+21', without converting an arbitrarily large int to a float or
    to a string of all its digits (Python refuses over 4300)."""
    if not isinstance(value, int) or value.bit_length() <= 1000:
        return f"{value:.1e}"
    exponent = (value.bit_length() - 1) * 30103 // 100000  # at most log10(value)
    while 10 ** (exponent + 1) <= value:
        exponent += 1
    tenths = (value * 100 // 10**exponent + 5) // 10  # 10..100: the first two digits, rounded
    if tenths == 100:
        tenths, exponent = 10, exponent + 1
    return f"{tenths // 10}.{tenths % 10}e+{exponent}"


def format_count(n: int) -> str:
    """A count with thousands separators, '1,234,567'; in scientific notation past about 1000 digits."""
    return f"{n:,}" if n.bit_length() <= 3300 else scientific_notation(n)


def _plain(n: int) -> str:
    return str(n) if n.bit_length() <= 3300 else scientific_notation(n)


@dataclass(frozen=True)
class LayerCounts:
    """One spec layer's sizes, from the spec alone: what its module holds and computes."""

    trainable: int  # parameters with gradients (kernel, bias, gamma, beta)
    non_trainable: int  # buffers (BatchNormalization's moving mean and variance)
    flops: int  # forward multiply-adds x 2, per sample


def layer_counts(
    layer: LayerSpec, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_module: bool = True
) -> LayerCounts:
    """Parameter counts and FLOPs of one layer, exactly as `_build_layer` makes its module, without
    building it (Python ints: a layer of 10^20 units is counted, not allocated). `in_module` is False
    for a layer past the classifier head (a trailing softmax, built as an Identity)."""
    if not in_module:
        return LayerCounts(0, 0, 0)
    if isinstance(layer, Conv2D):
        kernel = layer.kernel_size[0] * layer.kernel_size[1] * in_shape[-1] * layer.filters
        flops = 2 * math.prod(out_shape) * layer.kernel_size[0] * layer.kernel_size[1] * in_shape[-1]
        return LayerCounts(kernel + (layer.filters if layer.use_bias else 0), 0, flops)
    if isinstance(layer, Dense):
        return LayerCounts(
            in_shape[0] * layer.units + (layer.units if layer.use_bias else 0), 0, 2 * in_shape[0] * layer.units
        )
    if isinstance(layer, BatchNormalization):
        channels = in_shape[-1]
        return LayerCounts(channels * (int(layer.center) + int(layer.scale)), 2 * channels, 0)
    return LayerCounts(0, 0, 0)


def spec_layer_counts(spec: ModelSpec) -> list[LayerCounts]:
    """`layer_counts` of every layer of the spec, in order."""
    shapes = [tuple(spec.input_shape)] + spec.output_shapes()
    head = classifier_head(spec)
    return [layer_counts(layer, shapes[i], shapes[i + 1], in_module=i < head) for i, layer in enumerate(spec.layers)]


def summarize(spec: ModelSpec) -> ModelSummary:
    """Per-layer output shapes, parameter counts and FLOPs, computed from the spec alone: no module
    is built and no weight allocated, so a spec of any size is summarised at once."""
    shapes = spec.output_shapes()
    rows = [
        LayerSummary(
            name, layer.type, shapes[i], counts.trainable + counts.non_trainable, counts.non_trainable, counts.flops
        )
        for i, (layer, name, counts) in enumerate(zip(spec.layers, spec.layer_names(), spec_layer_counts(spec)))
    ]
    return ModelSummary(spec.name, tuple(spec.input_shape), tuple(rows))
