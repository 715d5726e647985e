"""What is left of cnnlab's CPU step once the OpenMP threads are left to spin (issue "Speed, round
two", goal 3; BENCHMARKS.md, "The OpenMP wait policy" and "Small convolutions as one matrix
product"). 2 threads; medians in milliseconds.

    python explore_cpu_rest.py step [MODELS]       # cnnlab's default step per model (comma-separated):
                                                   # run it under different OMP_* / GOMP_* settings
    python explore_cpu_rest.py step_ab [PRECISION [MODELS [FIELD]]]  # the step with a Hardware switch
                                                   # off / on (FIELD: small_convs_as_matmul, the default,
                                                   # compact_dropout_masks, padded_small_convs_as_matmul
                                                   # or compiled)
    python explore_cpu_rest.py im2col              # convnet7's convolutions as nn.Conv2d and MatmulConv2d, bf16
    python explore_cpu_rest.py im2col_shapes       # the same on other small images, channels and kernels
    python explore_cpu_rest.py patches_backward [MODELS]  # MatmulConv2d's patches' own backward against
                                                   # slices and cat under autograd: layers, then steps
    python explore_cpu_rest.py fp32_layers         # convnet7's convolutions in fp32 against bf16
    python explore_cpu_rest.py pool_backward       # max-pool backward writing each gradient once (torch.where)
    python explore_cpu_rest.py masks [PRECISION]   # dropout forward + backward, cnnlab 0.1's masks / compact ones
    python explore_cpu_rest.py overlap [PRECISION] # convnet5's convolution backwards: data and weights one
                                                   # after another on 2 threads, or at once on 1 thread each

The layer parts time forward + backward of one layer at batch 128 in channels_last, three rounds
of 15 calls each, the arms alternating between rounds. Measured 2026-11-28 on a Zen 5 EPYC (2
cores, avx512_bf16), nothing else running, no OpenMP variable set: see BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from cnnlab.catalog import load_spec
from cnnlab.config import Hardware, HardwareRequest
from cnnlab.engine import build_train_step, new_model
from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware
import cnnlab.models as models
from cnnlab.models import FastDropout, MatmulConv2d
from cnnlab.optim import KerasAdam
from explore_bf16_levers import interleaved  # run from this folder, as every explore script

BATCH = 128
# convnet7's convolutions after the first: name, in channels, out channels, input size, stride.
CONVNET7_LAYERS = [
    ("conv2", 16, 32, 28, 2),
    ("conv3", 32, 64, 14, 1),
    ("conv4", 64, 96, 14, 1),
    ("conv5", 96, 128, 7, 1),
    ("conv6", 128, 164, 3, 1),
    ("conv7", 164, 164, 3, 1),
]


def median_ms(fn: Callable[[], object], reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def rounds(arms: dict[str, Callable[[], object]], n: int = 3) -> str:
    results: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(n):
        for name, fn in arms.items():
            results[name].append(median_ms(fn))
    return "  ".join(f"{name} {' '.join(f'{t:.2f}' for t in ts)}" for name, ts in results.items())


def default_step(name: str, hardware: Hardware) -> Callable[[], object]:
    """One call: cnnlab's CPU training step of `name` on a fixed random batch, as bench_cpu.py times it."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    model = new_model(load_spec(name), 0, hardware).train()
    train_step = build_train_step(model, KerasAdam(model.parameters()), hardware, images, labels, BATCH)
    return functools.partial(train_step, torch.arange(BATCH))


def step(models: list[str]) -> None:
    """cnnlab's default CPU step, for running under different OpenMP settings."""
    keep_freed_memory_for_reuse()
    hardware = resolve_hardware(HardwareRequest(device="cpu"))
    for name in models:
        print(
            f"{name} {hardware.precision}: {median_ms(default_step(name, hardware), reps=25):.1f} ms/step", flush=True
        )


def channels_last(shape: tuple[int, ...], dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def conv_arm(conv: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, pad: bool, bf16: bool) -> Callable[[], None]:
    """Forward + backward of `conv`, after convnet7's bottom-right 'same' padding where `pad`."""

    def run() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            y = conv(F.pad(x, (0, 1, 0, 1)) if pad else x)
        y.backward(grad)

    return run


def im2col() -> None:
    """convnet7's convolutions (after its first) as nn.Conv2d and as MatmulConv2d, in bf16."""
    for name, cin, cout, size, stride in CONVNET7_LAYERS:
        direct = torch.nn.Conv2d(cin, cout, 2, stride=stride)
        matmul = MatmulConv2d(cin, cout, 2, stride=stride)
        matmul.load_state_dict(direct.state_dict())
        x = channels_last((BATCH, cin, size, size), torch.bfloat16, grad=True)
        grad = channels_last((BATCH, cout, size // stride, size // stride), torch.bfloat16)
        arms = {
            conv_name: conv_arm(conv, x, grad, stride == 1, True)
            for conv_name, conv in (("direct", direct), ("matmul", matmul))
        }
        print(name, rounds(arms), flush=True)


def im2col_shapes() -> None:
    """MatmulConv2d against nn.Conv2d on small images beyond convnet7's: where does the matrix product win?"""
    for channels, size, kernel in [(16, 4, 2), (32, 4, 2), (64, 4, 2), (256, 4, 2), (64, 5, 3), (128, 5, 3),
                                   (128, 3, 3), (64, 6, 2), (128, 6, 2), (64, 5, 2)]:  # fmt: skip
        direct = torch.nn.Conv2d(channels, channels, kernel)
        matmul = MatmulConv2d(channels, channels, kernel)
        matmul.load_state_dict(direct.state_dict())
        out = size - kernel + 1
        x = channels_last((BATCH, channels, size, size), torch.bfloat16, grad=True)
        grad = channels_last((BATCH, channels, out, out), torch.bfloat16)
        arms = {
            conv_name: conv_arm(conv, x, grad, False, True)
            for conv_name, conv in (("direct", direct), ("matmul", matmul))
        }
        print(
            f"{channels}->{channels} on {size}x{size}, {kernel}x{kernel} kernel, {out}x{out} out",
            rounds(arms),
            flush=True,
        )


class SlicePatches:
    """`models._Patches` as it was at commit 94b6414: the patches made by slices and `cat` under plain
    autograd, whose backward zero-fills an image per kernel position and adds them up (now
    `models._Patches` does the backward with one image, bit-equal)."""

    @staticmethod
    def apply(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
        (kernel_h, kernel_w), (stride_h, stride_w) = kernel_size, stride
        n, channels, height, width = x.shape
        out_h, out_w = (height - kernel_h) // stride_h + 1, (width - kernel_w) // stride_w + 1
        pixels = x.permute(0, 2, 3, 1)
        windows = [
            pixels[:, i : i + stride_h * (out_h - 1) + 1 : stride_h, j : j + stride_w * (out_w - 1) + 1 : stride_w]
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        return torch.cat(windows, dim=-1).reshape(n * out_h * out_w, kernel_h * kernel_w * channels)


def with_slice_patches(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` run with every MatmulConv2d making its patches as `SlicePatches` does."""

    def run() -> None:
        own = models._Patches
        models._Patches = SlicePatches
        try:
            fn()
        finally:
            models._Patches = own

    return run


def patches_backward(names: list[str]) -> None:
    """MatmulConv2d (its patches' own backward) against its slices-and-cat form: convnet7's 3x3-pixel
    convolutions (after their bottom-right padding) and convnet5's last (5x5, padding itself), bit-equal
    results? forward + backward in bf16; then cnnlab's bf16 step of each model each way, 15 rounds x 5."""
    for cin, cout, size, kernel, pad in [(128, 164, 3, 2, False), (164, 164, 3, 2, False), (128, 164, 3, 5, True)]:
        conv = MatmulConv2d(cin, cout, kernel, padding=kernel // 2 if pad else 0)
        x = channels_last((BATCH, cin, size, size), torch.bfloat16, grad=True)
        grad = channels_last((BATCH, cout, size, size), torch.bfloat16)
        results = []

        def forward_backward() -> None:
            x.grad = conv.weight.grad = conv.bias.grad = None
            with torch.autocast("cpu", torch.bfloat16):
                y = conv(x if pad else F.pad(x, (0, 1, 0, 1)))
            y.backward(grad)
            results.append([y.view(torch.int16), x.grad.view(torch.int16), conv.weight.grad, conv.bias.grad])

        with_slice_patches(forward_backward)()
        forward_backward()
        equal = all(torch.equal(a, b) for a, b in zip(*results))
        x.grad = None
        own = conv_arm(conv, x, grad, not pad, True)
        arms = {"slices": with_slice_patches(own), "own": own}
        print(f"{cin}->{cout} on {size}x{size}, {kernel}x{kernel}: bit-equal {equal}; {rounds(arms)}", flush=True)
    keep_freed_memory_for_reuse()
    hardware = resolve_hardware(HardwareRequest(device="cpu", precision="bf16"))
    for name in names:
        arms = {"slices": with_slice_patches(default_step(name, hardware)), "own": default_step(name, hardware)}
        seconds = interleaved(arms, rounds=15, per_round=5)
        before, after = seconds["slices"] * 1000, seconds["own"] * 1000
        print(f"{name} bf16 step: slices {before:.2f} ms, own backward {after:.2f} ms: {before / after:.3f}x", flush=True)

def step_ab(precision: str, models: list[str], field: str = "small_convs_as_matmul") -> None:
    """cnnlab's step with the Hardware switch `field` off and on (whatever the precision, the other
    switches as resolved), 15 interleaved rounds x 5."""
    keep_freed_memory_for_reuse()
    hardware = resolve_hardware(HardwareRequest(device="cpu", precision=precision))
    for name in models:
        arms = {arm: default_step(name, dataclasses.replace(hardware, **{field: arm == "on"})) for arm in ("off", "on")}
        seconds = interleaved(arms, rounds=15, per_round=5)
        off, on = seconds["off"] * 1000, seconds["on"] * 1000
        print(f"{name} {hardware.precision} {field}: off {off:.2f} ms, on {on:.2f} ms: {off / on:.3f}x", flush=True)


def fp32_layers() -> None:
    """convnet7's convolutions (after its first) in fp32 against bf16, both nn.Conv2d."""
    for name, cin, cout, size, stride in CONVNET7_LAYERS:
        conv = torch.nn.Conv2d(cin, cout, 2, stride=stride)
        x16 = channels_last((BATCH, cin, size, size), torch.bfloat16, grad=True)
        x32 = x16.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
        g16 = channels_last((BATCH, cout, size // stride, size // stride), torch.bfloat16)
        arms = {
            "bf16": conv_arm(conv, x16, g16, stride == 1, True),
            "fp32": conv_arm(conv, x32, g16.float(), stride == 1, False),
        }
        print(name, rounds(arms), flush=True)


class WhereMaxPool2x2(torch.autograd.Function):
    """2x2 max-pooling whose backward writes every input gradient once, choosing by the pooling indices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, indices = F.max_pool2d_with_indices(x, 2, 2)
        ctx.save_for_backward(indices)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        ho, wo = indices.shape[2], indices.shape[3]
        position = torch.arange(h * w).view(1, 1, h, w)[:, :, : 2 * ho, : 2 * wo].reshape(1, 1, ho, 2, wo, 2)
        result = torch.empty(ctx.input_shape, dtype=grad.dtype, memory_format=torch.channels_last)
        if h != 2 * ho or w != 2 * wo:
            result.zero_()  # the rows and columns floor-mode pooling leaves out
        windows = result[:, :, : 2 * ho, : 2 * wo].unflatten(2, (ho, 2)).unflatten(4, (wo, 2))
        chosen = position == indices.unsqueeze(3).unsqueeze(5)
        torch.where(chosen, grad.unsqueeze(3).unsqueeze(5), torch.zeros((), dtype=grad.dtype), out=windows)
        return result


def pool_and_back(pool: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> None:
    pool(x).backward(grad)


def pool_backward() -> None:
    keep_freed_memory_for_reuse()
    for channels, size in [(64, 24), (96, 14), (128, 7), (32, 14)]:  # convnet3's pool, convnet7's and others
        x = channels_last((BATCH, channels, size, size), torch.bfloat16, grad=True)
        grad = channels_last((BATCH, channels, size // 2, size // 2), torch.bfloat16)
        gradients = []
        for pool in (lambda t: F.max_pool2d(t, 2, 2), WhereMaxPool2x2.apply):
            x.grad = None
            pool(x).backward(grad)
            gradients.append(x.grad)
        x.grad = None
        arms = {
            "aten": functools.partial(pool_and_back, lambda t: F.max_pool2d(t, 2, 2), x, grad),
            "where": functools.partial(pool_and_back, WhereMaxPool2x2.apply, x, grad),
        }
        print(f"{channels}x{size}x{size}: same gradients {torch.equal(*gradients)}; {rounds(arms)}", flush=True)


def dropout_and_back(dropout: FastDropout, x: torch.Tensor, grad: torch.Tensor) -> None:
    dropout(x).backward(grad)


def masks(precision: str) -> None:
    """Each built-in model's dropout layers (channels_last activations at batch 128), forward +
    backward, with cnnlab 0.1's masks and with compact ones."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # (channels, size) or (units,), with the rate: convnet3's, convnet5's last, convnet7's.
    shapes = [((64, 24, 24), 0.25), ((128, 11, 11), 0.25), ((256,), 0.5), ((64, 5, 5), 0.25), ((16, 28, 28), 0.25)]
    for shape, rate in shapes:
        x = torch.randn((BATCH, *shape)).to(dtype)
        x = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x).requires_grad_()
        arms = {
            arm: functools.partial(dropout_and_back, FastDropout(rate, compact).train(), x, torch.ones_like(x))
            for arm, compact in (("nchw", False), ("compact", True))
        }
        print(f"{'x'.join(map(str, shape))} rate {rate}: {rounds(arms)}", flush=True)


def overlap(precision: str) -> None:
    """convnet5's three big convolutions' backward (128 images, channels_last, 5x5 'same'): data and
    weight gradients in one call on 2 threads, each alone on 2 and on 1 thread, and both at once on
    two worker threads of 1 thread each (as TensorFlow's executor runs independent ops)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    workers = ThreadPoolExecutor(2)
    for ready in [workers.submit(torch.set_num_threads, 1) for _ in range(4)]:
        ready.result()
    for cin, cout, size in [(32, 64, 28), (64, 96, 14), (96, 128, 7)]:
        x, grad = channels_last((BATCH, cin, size, size), dtype), channels_last((BATCH, cout, size, size), dtype)
        weight = channels_last((cout, cin, 5, 5), dtype)
        args = (grad, x, weight, [cout], [1, 1], [2, 2], [1, 1], False, [0, 0], 1)
        backward = functools.partial(torch.ops.aten.convolution_backward, *args)
        data, weights = (
            functools.partial(backward, [True, False, False]),
            functools.partial(backward, [False, True, True]),
        )

        def at_once(data: Callable[[], object] = data, weights: Callable[[], object] = weights) -> None:
            for future in [workers.submit(data), workers.submit(weights)]:
                future.result()

        torch.set_num_threads(2)
        both, data_2, weights_2, overlapped = (
            median_ms(f) for f in (functools.partial(backward, [True] * 3), data, weights, at_once)
        )
        torch.set_num_threads(1)
        data_1, weights_1 = median_ms(data), median_ms(weights)
        torch.set_num_threads(2)
        print(
            f"{cin}->{cout} on {size}x{size} {precision}: both {both:.1f}, data {data_2:.1f} (1 thread {data_1:.1f}), "
            f"weights {weights_2:.1f} (1 thread {weights_1:.1f}), at once on 1 thread each {overlapped:.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    torch.set_num_threads(2)
    part = sys.argv[1] if len(sys.argv) > 1 else "step"
    if part == "step":
        step(sys.argv[2].split(",") if len(sys.argv) > 2 else ["convnet7", "convnet3"])
    elif part == "step_ab":
        step_ab(
            sys.argv[2] if len(sys.argv) > 2 else "bf16",
            sys.argv[3].split(",") if len(sys.argv) > 3 else ["convnet7"],
            *sys.argv[4:5],
        )
    elif part in ("masks", "overlap"):
        globals()[part](sys.argv[2] if len(sys.argv) > 2 else "bf16")
    elif part == "patches_backward":
        patches_backward(sys.argv[2].split(",") if len(sys.argv) > 2 else ["convnet7", "convnet5"])
    elif part in ("im2col", "im2col_shapes", "fp32_layers", "pool_backward"):
        globals()[part]()
    else:
        sys.exit(
            f"unknown part {part!r}: step, step_ab, im2col, im2col_shapes, patches_backward, fp32_layers, pool_backward, "
            "masks or overlap"
        )
