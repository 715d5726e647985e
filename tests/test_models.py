"""The built-in models against Keras's numbers, and the Keras semantics of each layer."""

from __future__ import annotations

import math

import pytest
import torch

from cnnlab.catalog import builtin_models, load_spec
from cnnlab.models import KerasBatchNorm, MatmulConv2d, build_model, keras_init_, relu_after_pooling, summarize
from cnnlab.spec import BatchNormalization, parse_spec

# (total, trainable, non-trainable) as Keras's model.summary() prints them in the notebook.
KERAS_TOTALS = {
    "convnet3": (4_060_426, 4_060_426, 0),
    "convnet5": (1_083_918, 1_083_406, 512),
    "convnet7": (379_014, 377_950, 1_064),
}

# Per-layer output shape and parameter count, copied from the notebook's summaries.
KERAS_LAYERS = {
    "convnet3": [
        ((26, 26, 32), 320),
        ((24, 24, 64), 18496),
        ((24, 24, 64), 0),
        ((22, 22, 128), 73856),
        ((11, 11, 128), 0),
        ((11, 11, 128), 0),
        ((15488,), 0),
        ((256,), 3965184),
        ((256,), 0),
        ((10,), 2570),
    ],
    "convnet5": [
        ((28, 28, 32), 832),
        ((28, 28, 64), 51264),
        ((14, 14, 64), 0),
        ((14, 14, 64), 0),
        ((14, 14, 96), 153696),
        ((7, 7, 96), 0),
        ((7, 7, 96), 0),
        ((7, 7, 128), 307328),
        ((3, 3, 128), 0),
        ((3, 3, 128), 0),
        ((3, 3, 164), 524964),
        ((1, 1, 164), 0),
        ((1, 1, 164), 0),
        ((164,), 0),
        ((256,), 42240),
        ((256,), 1024),
        ((256,), 0),
        ((10,), 2570),
    ],
    "convnet7": [
        ((28, 28, 16), 80),
        ((14, 14, 32), 2080),
        ((14, 14, 64), 8256),
        ((14, 14, 64), 0),
        ((14, 14, 96), 24672),
        ((7, 7, 96), 0),
        ((7, 7, 96), 0),
        ((7, 7, 128), 49280),
        ((3, 3, 128), 0),
        ((3, 3, 128), 0),
        ((3, 3, 164), 84132),
        ((3, 3, 164), 107748),
        ((1, 1, 164), 0),
        ((1, 1, 164), 0),
        ((164,), 0),
        ((256,), 42240),
        ((256,), 1024),
        ((256,), 0),
        ((148,), 38036),
        ((148,), 592),
        ((148,), 0),
        ((128,), 19072),
        ((128,), 512),
        ((128,), 0),
        ((10,), 1290),
    ],
}


def test_zoo_has_the_seed_models():
    assert builtin_models() == ["convnet3", "convnet5", "convnet7"]


@pytest.mark.parametrize("name", builtin_models())
def test_parameter_totals_match_keras(name):
    summary = summarize(load_spec(name))
    assert (summary.total_params, summary.trainable_params, summary.non_trainable_params) == KERAS_TOTALS[name]
    model = build_model(load_spec(name))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    assert (trainable + buffers, buffers) == (KERAS_TOTALS[name][0], KERAS_TOTALS[name][2])


@pytest.mark.parametrize("name", builtin_models())
def test_layer_shapes_and_params_match_keras(name):
    summary = summarize(load_spec(name))
    assert [(row.output_shape, row.params) for row in summary.layers] == KERAS_LAYERS[name]


@pytest.mark.parametrize("name", builtin_models())
def test_forward_backward_shapes(name):
    model = build_model(load_spec(name), seed=0)
    x = torch.rand(4, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Every layer's actual output shape equals the Keras shape (channels_last in the summary).
    model.eval()
    out = x
    for layer, (shape, _) in zip(model.layers, KERAS_LAYERS[name]):
        out = layer(out)
        actual = tuple(out.shape[1:]) if out.dim() == 2 else (out.shape[2], out.shape[3], out.shape[1])
        assert actual == shape


def test_summary_text_is_keras_style():
    text = summarize(load_spec("convnet5")).to_text()
    assert "conv2d_1 (Conv2D)" in text and "(None, 28, 28, 32)" in text
    assert "batch_normalization_1 (BatchNormalization)" in text
    assert "Total params: 1,083,918" in text and "Non-trainable params: 512" in text


def test_flops_of_convnet3():
    # conv layers: 26*26*32*9*1 + 24*24*64*9*32 + 22*22*128*9*64 MACs, dense 15488*256 + 256*10 MACs
    macs = 26 * 26 * 32 * 9 + 24 * 24 * 64 * 9 * 32 + 22 * 22 * 128 * 9 * 64 + 15488 * 256 + 256 * 10
    summary = summarize(load_spec("convnet3"))
    assert summary.forward_flops == 2 * macs
    assert summary.training_flops == 6 * macs


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (build_model(load_spec("convnet7"), seed=s) for s in (1, 1, 2))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()) if pa.dim() > 1)


def _spec(layers, input_shape=(6, 6, 1), num_classes=2):
    return parse_spec({"input_shape": list(input_shape), "num_classes": num_classes, "layers": layers})


def test_same_padding_puts_the_extra_row_bottom_right_for_even_kernels():
    # A 2x2 kernel of ones over a single bright pixel in the top-left corner, stride 1, 'same':
    # TensorFlow pads 0 rows above/left and 1 below/right, so output[0, 0] sees the pixel and the
    # output is the same size. Padding top/left instead would move the response to output[1, 1].
    spec = _spec(
        [
            {"type": "Conv2D", "filters": 1, "kernel_size": 2, "padding": "same", "use_bias": False},
            {"type": "Flatten"},
            {"type": "Dense", "units": 2},
        ]
    )
    model = build_model(spec)
    conv_block = model.layers[0]
    conv = conv_block[1]
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 1.0
    out = conv_block(x)
    assert out.shape == (1, 1, 6, 6)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0].sum() == 1.0
    # Bottom-right corner: the padded zeros are on the far side.
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 5, 5] = 1.0
    out = conv_block(x)
    assert out[0, 0, 4, 4] == 1.0 and out[0, 0, 5, 5] == 1.0 and out[0, 0].sum() == 4.0


def test_same_padding_with_stride_two_matches_tensorflow_sizes():
    spec = _spec(
        [
            {"type": "Conv2D", "filters": 3, "kernel_size": 3, "strides": 2, "padding": "same"},
            {"type": "Flatten"},
            {"type": "Dense", "units": 2},
        ],
        input_shape=(7, 8, 1),
    )
    assert spec.output_shapes()[0] == (4, 4, 3)
    assert build_model(spec).layers[0](torch.zeros(1, 1, 7, 8)).shape == (1, 3, 4, 4)


def test_batch_norm_uses_keras_constants():
    bn = KerasBatchNorm(4, BatchNormalization())
    assert bn.momentum == 0.99 and bn.epsilon == 1e-3
    x = torch.randn(64, 4) * 3 + 5
    bn.train()
    y = bn(x)
    # Normalised with the biased batch variance and epsilon 1e-3.
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)
    torch.testing.assert_close(y, expected)
    # Moving statistics move 1% of the way to the batch's (momentum 0.99), variance biased as Keras 3.
    torch.testing.assert_close(bn.running_mean, 0.01 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * x.var(0, unbiased=False))
    bn.eval()
    torch.testing.assert_close(bn(x), (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-3))


def test_batch_norm_computes_in_float32_under_bf16_like_keras_mixed_precision():
    # Keras casts a bf16 input to float32, normalises, and casts the output back. A large mean
    # against a small spread is where bf16 moments would fail (20's bf16 spacing is 0.125).
    bn = KerasBatchNorm(4, BatchNormalization())
    x = (torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 0.05 + 20).bfloat16()
    y = bn.train()(x)
    exact = x.float()
    expected = (exact - exact.mean(0)) / torch.sqrt(exact.var(0, unbiased=False) + 1e-3)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, 0.01 * exact.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * exact.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_batch_norm_center_and_scale_flags_change_parameters():
    spec = _spec(
        [
            {"type": "Flatten"},
            {"type": "Dense", "units": 8},
            {"type": "BatchNormalization", "center": False, "scale": False},
            {"type": "Dense", "units": 2},
        ]
    )
    summary = summarize(spec)
    assert summary.layers[2].params == 16 and summary.layers[2].non_trainable == 16


def test_he_normal_is_keras_truncated_normal():
    weight = torch.empty(256, 15488)
    keras_init_(weight, "he_normal", torch.Generator().manual_seed(0))
    target = math.sqrt(2 / 15488)
    assert weight.std().item() == pytest.approx(target, rel=0.01)  # the samples keep stddev sqrt(2 / fan_in)
    assert weight.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-9  # truncated at 2 sigma
    assert weight.mean().item() == pytest.approx(0, abs=target / 100)


def test_glorot_uniform_limit_and_zero_biases():
    model = build_model(load_spec("convnet3"), seed=0)
    conv = model.layers[1][0]  # 3x3, 32 -> 64
    limit = math.sqrt(6 / (9 * 32 + 9 * 64))
    assert conv.weight.abs().max().item() <= limit
    assert conv.weight.abs().max().item() > 0.95 * limit
    assert torch.count_nonzero(conv.bias) == 0


def test_dropout_is_inverted_and_only_in_training():
    model = build_model(_spec([{"type": "Flatten"}, {"type": "Dropout", "rate": 0.5}, {"type": "Dense", "units": 2}]))
    dropout = model.layers[1]
    x = torch.ones(1000, 36)
    dropout.train()
    y = dropout(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert 0.45 < (y == 0).float().mean().item() < 0.55
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_flatten_uses_keras_channel_last_order():
    model = build_model(
        _spec(
            [{"type": "Conv2D", "filters": 2, "kernel_size": 1}, {"type": "Flatten"}, {"type": "Dense", "units": 2}],
            input_shape=(2, 2, 1),
        )
    )
    x = torch.arange(8.0).reshape(1, 2, 2, 2)  # N, C, H, W
    assert model.layers[1](x).tolist() == [[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]]


def test_output_softmax_becomes_logits():
    model = build_model(load_spec("convnet7"), seed=0).eval()
    logits = model(torch.rand(3, 1, 28, 28))
    assert not torch.allclose(logits.sum(1), torch.ones(3))  # not probabilities


@pytest.mark.parametrize("rate", [0.15, 0.39])
def test_fast_dropout_honours_odd_rates(rate):
    from cnnlab.models import FastDropout

    dropout = FastDropout(rate).train()
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(rate, abs=0.003)  # 400k draws: about 5 standard errors
    assert y.max().item() == pytest.approx(1 / (1 - rate), rel=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the expectation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fast_dropout_drops_the_same_elements_in_either_memory_layout(dtype):
    # channels_last only changes where elements live, never which are dropped: a seed's masks and
    # so its training are the ones cnnlab 0.1 drew, and NCHW and NHWC runs share them.
    from cnnlab.models import FastDropout

    x = torch.rand(3, 5, 4, 6, generator=torch.Generator().manual_seed(1)).to(dtype) + 1
    dropout = FastDropout(0.25).train()
    torch.manual_seed(7)
    nchw = dropout(x)
    torch.manual_seed(7)
    nhwc = dropout(x.contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, nhwc)
    torch.manual_seed(7)  # the mask as cnnlab 0.1 made it, from the same 16-bit draws
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
    noise = words.view(torch.int16)[: x.numel()].view(x.shape)
    expected = x * (noise >= dropout.threshold - 32768).to(dtype).mul_(dropout.scale)
    assert torch.equal(nchw, expected) and 0 < (nchw == 0).sum() < x.numel()


def _words(count: int, seed: int) -> torch.Tensor:
    """The 64-bit words a compact mask draws after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return torch.empty(count, dtype=torch.int64).random_(-(2**63), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rate, bits", [(0.5, 1), (0.25, 2), (0.75, 2), (0.125, 4), (3 / 256, 8), (0.15, 16)])
def test_compact_dropout_masks_take_the_bits_their_rate_needs_in_memory_order(dtype, rate, bits):
    from cnnlab.models import FastDropout

    x = torch.rand(3, 5, 4, 6, generator=torch.Generator().manual_seed(1)).to(dtype) + 1
    dropout = FastDropout(rate, compact_masks=True).train()
    assert dropout.bits == bits
    n = x.numel()
    # Element i in memory order takes bits [i * bits, (i + 1) * bits) of the little-endian random
    # words, read as an unsigned number u: dropped when u < rate * 2**bits; with 16 bits, cnnlab
    # 0.1's comparison: the signed 16-bit number plus 32768 below the rate rounded to 1/65536.
    words = _words(-(-n * bits // 64), seed=7)
    raw = words.view(torch.uint8).to(torch.int64)
    bit = ((raw.unsqueeze(1) >> torch.arange(8)) & 1).view(-1)[: n * bits].view(n, bits)
    value = (bit << torch.arange(bits)).sum(1)
    if bits == 16:
        value = (value + 32768) % 65536
    dropped = value < round(rate * 2**bits)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(7)
        y = dropout(x.contiguous(memory_format=layout))
        assert y.is_contiguous(memory_format=layout)
        memory_order = y.permute(0, 2, 3, 1) if layout == torch.channels_last else y
        expected_zero = dropped.view(memory_order.shape)
        assert torch.equal(memory_order == 0, expected_zero) and 0 < expected_zero.sum() < n
        x_memory_order = x.permute(0, 2, 3, 1) if layout == torch.channels_last else x
        kept = x_memory_order[~expected_zero] * torch.tensor(dropout.scale, dtype=dtype)
        assert torch.equal(memory_order[~expected_zero], kept)  # the survivors scaled, as cnnlab 0.1 scales them


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.125, 0.15, 0.39])
def test_compact_dropout_masks_honour_the_rate(rate):
    from cnnlab.models import FastDropout

    dropout = FastDropout(rate, compact_masks=True).train()
    torch.manual_seed(0)
    y = dropout(torch.ones(400_001, dtype=torch.bfloat16))  # an element count no byte divides
    assert y.shape == (400_001,)
    assert (y == 0).float().mean().item() == pytest.approx(rate, abs=0.003)  # about 5 standard errors
    assert y.float().mean().item() == pytest.approx(1.0, abs=0.01)
    pairs = (y[:-1] == 0) & (y[1:] == 0)  # neighbours sharing a random byte are dropped independently
    assert pairs.float().mean().item() == pytest.approx(rate**2, abs=0.003)


def test_compact_dropout_masks_are_off_unless_asked_and_follow_the_model():
    from cnnlab.models import FastDropout

    spec = load_spec("convnet3")
    assert {m.compact_masks for m in build_model(spec).modules() if isinstance(m, FastDropout)} == {False}
    compact = build_model(spec, seed=3, compact_dropout_masks=True)
    assert {m.compact_masks for m in compact.modules() if isinstance(m, FastDropout)} == {True}
    assert [m.bits for m in compact.modules() if isinstance(m, FastDropout)] == [2, 2, 1]
    plain = build_model(spec, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), compact.state_dict().values()))


def _relu_before_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """`model` rebuilt the plain way: each moved ReLU back before its max-pooling."""
    from torch import nn

    for i in relu_after_pooling(model.spec):
        model.layers[i][-1] = nn.ReLU()
        model.layers[i + 1] = model.layers[i + 1][0]
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_relu_after_max_pooling_computes_the_same_values_and_gradients(precision):
    spec = load_spec("convnet5")
    assert relu_after_pooling(spec) == {1, 4, 7, 10}  # each convolution followed by a pooling
    moved, plain = build_model(spec, seed=2), _relu_before_pooling(build_model(spec, seed=2))
    assert moved.state_dict().keys() == plain.state_dict().keys()
    assert [type(m).__name__ for m in moved.layers[1:3]] == ["Sequential", "Sequential"]
    assert isinstance(moved.layers[1][-1], torch.nn.Identity) and isinstance(moved.layers[2][-1], torch.nn.ReLU)
    x = torch.randn(8, 1, 28, 28)
    results = []
    for model in (moved, plain):
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            logits = model.train()(x)
        logits.float().square().sum().backward()
        results.append([logits, *(p.grad for p in model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_relu_stays_before_a_pooling_that_pads_or_after_another_layer():
    spec = _spec(
        [
            {"type": "Conv2D", "filters": 2, "kernel_size": 1, "activation": "relu"},
            {"type": "MaxPooling2D", "pool_size": 3, "padding": "same"},  # 8x8 pooled by 3: padded
            {"type": "Conv2D", "filters": 2, "kernel_size": 1, "activation": "tanh"},
            {"type": "MaxPooling2D", "pool_size": 2},
            {"type": "Conv2D", "filters": 2, "kernel_size": 1, "activation": "relu"},
            {"type": "MaxPooling2D", "pool_size": 1},
            {"type": "Flatten"},
            {"type": "Dense", "units": 2},
        ],
        input_shape=(8, 8, 1),
    )
    assert relu_after_pooling(spec) == {4}


def test_glorot_bias_uses_keras_fans():
    spec = _spec(
        [
            {"type": "Flatten"},
            {"type": "Dense", "units": 600, "bias_initializer": "glorot_uniform"},
            {"type": "Dense", "units": 2},
        ]
    )
    bias = build_model(spec, seed=0).layers[1].bias
    limit = math.sqrt(6 / (600 + 600))  # Keras: fan_in = fan_out = 600 for a bias
    assert bias.abs().max().item() <= limit and bias.abs().max().item() > 0.95 * limit


@pytest.mark.parametrize(
    ("channels", "filters", "size", "kernel", "stride", "padding", "bias"),
    [(164, 164, 4, 2, 1, 0, True), (3, 5, 7, (3, 2), 1, 0, True), (4, 6, 8, 2, 2, 0, False),
     (2, 3, 5, 3, (2, 1), 1, True), (1, 4, 3, 3, 1, 0, True)],
)  # fmt: skip
def test_matmul_convolution_equals_the_convolution(channels, filters, size, kernel, stride, padding, bias):
    """Outputs and every gradient as nn.Conv2d's, in float64 (where only rounding order can differ)."""
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(channels, filters, kernel, stride=stride, padding=padding, bias=bias).double()
    matmul = MatmulConv2d(channels, filters, kernel, stride=stride, padding=padding, bias=bias).double()
    matmul.load_state_dict(reference.state_dict())
    x = torch.randn(3, channels, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x_ref, x_mm = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_mm = reference(x_ref), matmul(x_mm)
    assert y_mm.shape == y_ref.shape and y_mm.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_mm.backward(grad)
    torch.testing.assert_close(y_mm, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_mm.grad, x_ref.grad, rtol=0, atol=1e-12)
    for p_mm, p_ref in zip(matmul.parameters(), reference.parameters()):
        torch.testing.assert_close(p_mm.grad, p_ref.grad, rtol=0, atol=1e-11)


def test_matmul_convolution_rounds_like_the_convolution_in_bf16():
    """Under bf16 autocast both multiply bf16 operands, sum in fp32 and round the sum to bf16 once:
    the matrix product's error is of the direct convolution's size."""
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(164, 164, 2)
    matmul = MatmulConv2d(164, 164, 2)
    matmul.load_state_dict(reference.state_dict())
    x = torch.randn(16, 164, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_mm = reference(x), matmul(x)
    assert y_mm.dtype == y_ref.dtype == torch.bfloat16
    as_bf16 = lambda t: t.detach().bfloat16().double()  # what autocast gives the kernels
    exact = torch.nn.functional.conv2d(as_bf16(x), as_bf16(reference.weight), as_bf16(reference.bias))
    assert (y_mm.double() - exact).abs().max() <= 2 * (y_ref.double() - exact).abs().max()
    assert (y_mm.double() - exact).abs().max() <= 2**-8 * exact.abs().max()


def patches_through_autograd(conv: MatmulConv2d, x: torch.Tensor) -> torch.Tensor:
    """MatmulConv2d's forward with its patches made by slices and `cat` under plain autograd (as
    before its patches had their own backward): the reference for the bit-for-bit test below."""
    if conv.padding != (0, 0):
        x = torch.nn.functional.pad(x, (conv.padding[1],) * 2 + (conv.padding[0],) * 2)
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    pixels = x.permute(0, 2, 3, 1)
    windows = [
        pixels[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] for i in range(kh) for j in range(kw)
    ]
    patches = torch.cat(windows, dim=-1).reshape(n * oh * ow, kh * kw * c)
    weight = conv.weight.permute(2, 3, 1, 0).reshape(kh * kw * c, conv.out_channels)
    out = patches @ weight if conv.bias is None else torch.addmm(conv.bias, patches, weight)
    return out.view(n, oh, ow, conv.out_channels).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "channels, filters, size, kernel, stride, padding, bias, pad_bottom_right",
    [
        (128, 164, 3, 2, 1, 0, True, True),  # convnet7's 3x3-pixel layers, after their 'same' padding
        (128, 164, 3, 5, 1, 2, True, False),  # convnet5's last, padding itself (with AMX)
        (16, 32, 6, 2, 2, 0, True, False),  # stride 2: patches that do not overlap
        (8, 12, 5, 3, 1, 1, False, False),
    ],
)
def test_matmul_convolution_patches_backward_is_autograds_to_the_bit(
    channels, filters, size, kernel, stride, padding, bias, pad_bottom_right
):
    """The patches' own backward adds the kernel positions' gradients in autograd's order: the same
    bf16 training as through slices and `cat`, bit for bit (the golden numbers depend on it)."""
    torch.manual_seed(0)
    conv = MatmulConv2d(channels, filters, kernel, stride=stride, padding=padding, bias=bias)
    image = torch.randn(32, channels, size, size).bfloat16().contiguous(memory_format=torch.channels_last)
    results = []
    for forward in (conv, lambda t: patches_through_autograd(conv, t)):
        x = image.clone().requires_grad_()
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(torch.nn.functional.pad(x, (0, 1, 0, 1)) if pad_bottom_right else x)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).bfloat16())
        results.append([y, x.grad] + [p.grad for p in conv.parameters()])
    ours, autograds = results
    assert ours[1].is_contiguous(memory_format=torch.channels_last)
    bits = lambda t: t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # -0.0 and 0.0 differ
    for a, b in zip(ours, autograds):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def test_small_convolutions_as_matmuls_keep_the_weights_and_their_names():
    spec = load_spec("convnet7")
    plain, fast = build_model(spec, seed=3), build_model(spec, seed=3, small_convs_as_matmul=True)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    assert sum(isinstance(m, MatmulConv2d) for m in fast.modules()) == 2
    assert not any(isinstance(m, MatmulConv2d) for m in plain.modules())
    # convnet5's last convolution has 3x3 pixels too, but pads them itself (5x5 'same'): a matrix
    # product would multiply its padding zeros, which the direct convolution skips.
    assert not any(
        isinstance(m, MatmulConv2d) for m in build_model(load_spec("convnet5"), small_convs_as_matmul=True).modules()
    )
    # With AMX it qualifies all the same (padded_small_convs_as_matmul), with the same weights and outputs.
    plain5 = build_model(load_spec("convnet5"), seed=3)
    fast5 = build_model(load_spec("convnet5"), seed=3, small_convs_as_matmul=True, padded_small_convs_as_matmul=True)
    assert [m.padding for m in fast5.modules() if isinstance(m, MatmulConv2d)] == [(2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(plain5.state_dict().values(), fast5.state_dict().values()))
    x5 = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fast5.eval()(x5), plain5.eval()(x5), rtol=1e-5, atol=1e-5)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
