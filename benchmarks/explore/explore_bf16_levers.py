"""Levers on cnnlab's CPU training step, measured on a CPU with native bf16 (issue "Speed, round
two", goal 3). Each part times the old way against the new one in the same process, interleaved,
except `allocator`, which needs a fresh process per setting.

    python explore_bf16_levers.py dropout     # cnnlab 0.1's masks against today's, per layer
    python explore_bf16_levers.py adam        # Keras Adam as _foreach kernels against the fused one
    python explore_bf16_levers.py allocator   # a step with and without keep_freed_memory_for_reuse
    python explore_bf16_levers.py layout      # a step in channels_last against NCHW
    python explore_bf16_levers.py relu_pool   # ReLU before max-pooling against after (cnnlab's build
                                              # since 2026-11-28: models.relu_after_pooling)
    python explore_bf16_levers.py passes [fp32|bf16]  # dropout masks in one pass; conv+ReLU fused (not adopted)

Timings are medians in microseconds (dropout, adam) or milliseconds (steps); 2 threads.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from cnnlab.catalog import load_spec
from cnnlab.config import HardwareRequest
from cnnlab.engine import build_train_step, new_model
from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware
from cnnlab.models import FastDropout, build_model, relu_after_pooling
from cnnlab.optim import KerasAdam

MODELS = ["convnet3", "convnet5", "convnet7"]


def interleaved(arms: dict[str, Callable[[], object]], rounds: int = 8, per_round: int = 5) -> dict[str, float]:
    """Median seconds of each arm, the arms taking turns so that a slow spell hits all alike."""
    for f in arms.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, f in arms.items():
            for _ in range(per_round):
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def dropout() -> None:
    rate = 0.25
    threshold = round(rate * 65536)
    limit, scale = threshold - 32768, 65536 / (65536 - threshold)

    def noise_for(x: torch.Tensor) -> torch.Tensor:
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        return words.view(torch.int16)[: x.numel()].view(x.shape)

    def old(x: torch.Tensor) -> torch.Tensor:  # cnnlab 0.1: NCHW noise, a bool mask
        return (noise_for(x) >= limit).to(x.dtype).mul_(scale)

    def new(x: torch.Tensor) -> torch.Tensor:  # 2026-11-27 (to 684b50e): noise in x's layout, 0/1 by clamping
        noise = noise_for(x).contiguous(memory_format=torch.channels_last)
        return noise.clamp_(limit - 1, limit).sub_(limit - 1).to(x.dtype).mul_(scale)

    for dtype in (torch.bfloat16, torch.float32):
        for shape in [(128, 64, 24, 24), (128, 64, 14, 14), (128, 96, 7, 7)]:
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            grad = torch.randn_like(x)
            torch.manual_seed(0)
            keep_old = old(x)
            torch.manual_seed(0)
            keep_new = new(x)
            assert torch.equal(x * keep_old, x * keep_new)  # the same masks
            t = interleaved(
                {
                    "old forward": lambda: x * old(x),
                    "new forward": lambda: x * new(x),
                    "old backward": lambda: grad * keep_old,
                    "new backward": lambda: grad * keep_new,
                }
            )
            print(f"{str(dtype):15s} {shape}: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in t.items()))


def adam() -> None:
    for name in MODELS:
        arms = {}
        for fused in (False, True):
            model = build_model(load_spec(name), 0)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            arms["fused" if fused else "foreach"] = KerasAdam(model.parameters(), fused_on_cpu=fused).step
        t = interleaved(arms)
        print(f"{name}: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in t.items()))


def step_times(models: list[str], hardware_changes: dict[str, dict], steps_per_round: int = 5) -> dict:
    """Median ms of cnnlab's training step per model and hardware variant, interleaved."""
    hardware = resolve_hardware(HardwareRequest())
    torch.set_num_threads(hardware.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6000, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (6000,), generator=generator)
    results = {}
    for name in models:
        arms = {}
        for variant, changes in hardware_changes.items():
            variant_hardware = dataclasses.replace(hardware, **changes.get("hardware", {}))
            model = new_model(load_spec(name), 0, variant_hardware)
            if changes.get("relu_before_pool"):
                relu_before_pool(model)
            step = build_train_step(model, KerasAdam(model.parameters()), variant_hardware, images, labels, 128)
            arms[variant] = lambda step=step: step(torch.randint(0, 6000, (128,), generator=generator))
        results[name] = {k: v * 1e3 for k, v in interleaved(arms, per_round=steps_per_round).items()}
    return results


def relu_before_pool(model: torch.nn.Module) -> None:
    """Undo cnnlab's build (`models.relu_after_pooling`: Conv, MaxPool, ReLU) into the plain
    Conv+ReLU, MaxPool: the same values and gradients."""
    for i in relu_after_pooling(model.spec):
        model.layers[i][-1] = torch.nn.ReLU()
        model.layers[i + 1] = model.layers[i + 1][0]


def allocator() -> None:
    if len(sys.argv) > 2:  # a child: one setting
        if sys.argv[2] == "keep":
            assert keep_freed_memory_for_reuse()
        print(step_times(MODELS, {"step": {}}))
        return
    for round_ in range(2):
        for setting in ("default", "keep"):
            out = subprocess.run([sys.executable, __file__, "allocator", setting], capture_output=True, text=True)
            print(f"round {round_ + 1}, allocator {setting}: {out.stdout.strip() or out.stderr[-500:]}")


def layout() -> None:
    keep_freed_memory_for_reuse()
    print(step_times(MODELS, {"channels_last": {}, "NCHW": {"hardware": {"channels_last": False}}}))


def relu_pool() -> None:
    keep_freed_memory_for_reuse()
    print(step_times(MODELS, {"relu_then_pool": {"relu_before_pool": True}, "pool_then_relu": {}}))


class DropoutBeforePasses(torch.nn.Module):
    """FastDropout's CPU masks as of commit 684b50e: converted to x's layout and dtype in 4 passes."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.threshold = round(rate * 65536)
        self.scale = 65536 / (65536 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        noise = words.view(torch.int16)[: x.numel()].view(x.shape)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            noise = noise.contiguous(memory_format=torch.channels_last)
        limit = self.threshold - 32768
        keep = noise.clamp_(limit - 1, limit).sub_(limit - 1).to(x.dtype).mul_(self.scale)
        return x * keep


class _ConvReLUFunction(torch.autograd.Function):
    """A convolution with ReLU fused into oneDNN's kernel; backward as autograd's ReLU and
    convolution nodes compute it, so values and gradients are the same bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # noqa: ANN001, ANN205 (autograd's signature)
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, [1, 1], 1, "relu", [None], None)
        ctx.save_for_backward(x, weight, out)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            [weight.shape[0]] if ctx.has_bias else None,
            ctx.stride,
            ctx.padding,
            [1, 1],
            False,
            [0, 0],
            1,
            list(ctx.needs_input_grad[:3]),
        )
        return grad_x, grad_weight, grad_bias, None, None


class ConvReLU(torch.nn.Sequential):
    """A candidate not adopted: cnnlab's `Sequential(conv, ReLU)` (conv a Conv2d, or a Sequential of
    ZeroPad2d and Conv2d), training on the CPU as one oneDNN convolution with ReLU fused where
    PyTorch would run the convolution with oneDNN anyway: the same values and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        conv, padded = self[0], x
        if isinstance(conv, torch.nn.Sequential):  # TensorFlow's uneven 'same' padding first
            pad, conv = conv
            padded = pad(x)
        weight, bias = conv.weight, conv.bias
        if torch.is_autocast_enabled("cpu"):  # cast as autocast casts a convolution's arguments
            dtype = torch.get_autocast_dtype("cpu")
            padded, weight = padded.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if not _runs_on_onednn(padded, weight, bias, conv):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _ConvReLUFunction.apply(padded, weight, bias, list(conv.stride), list(conv.padding))


def _runs_on_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: torch.nn.Conv2d) -> bool:
    """Whether PyTorch would run this convolution with oneDNN: only then is the fused kernel the
    same arithmetic (small inputs, float64 and bf16 without AVX-512 take other kernels)."""
    select = getattr(torch._C, "_select_conv_backend", None)  # private: absent, nothing is fused
    if select is None or not torch.backends.mkldnn.is_available():
        return False
    backend = select(
        x, weight, bias, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups, None
    )
    return backend == torch._C._ConvBackend.Mkldnn and conv.groups == 1 and conv.dilation == (1, 1)


def with_dropout_before_passes(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout masks made as at commit 684b50e."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer, FastDropout) and layer.threshold:
            model.layers[i] = DropoutBeforePasses(layer.rate)
    return model


def with_conv_relu_fused(model: torch.nn.Module) -> torch.nn.Module:
    """Each convolution + ReLU as `ConvReLU` (the candidate). Measured before cnnlab moved the ReLU
    of a convolution followed by max-pooling after the pooling; undone here so that every one fuses."""
    relu_before_pool(model)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, torch.nn.Sequential) and isinstance(layer[-1], torch.nn.ReLU):
            conv = layer[0][-1] if isinstance(layer[0], torch.nn.Sequential) else layer[0]
            if isinstance(conv, torch.nn.Conv2d):
                model.layers[i] = ConvReLU(*layer)
    return model


def passes() -> None:
    """Dropout masks in one pass at the activations' size (today) against the four of commit
    684b50e, and convolution + ReLU fused (a candidate): bit-equal after 8 steps, and the median
    step time of each, interleaved."""
    keep_freed_memory_for_reuse()
    precision = sys.argv[2] if len(sys.argv) > 2 else "auto"
    hardware = resolve_hardware(HardwareRequest(precision=precision))
    torch.set_num_threads(hardware.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6000, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (6000,), generator=generator)
    batches = [torch.randint(0, 6000, (128,), generator=generator) for _ in range(8)]
    variants = {
        "dropout as at 684b50e": with_dropout_before_passes,
        "today": lambda model: model,
        "today + conv/ReLU fused": with_conv_relu_fused,
    }
    print(f"precision {hardware.precision}, channels_last {hardware.channels_last}, {hardware.threads} threads")
    for name in MODELS:
        arms, finals = {}, {}
        for variant, change in variants.items():
            torch.manual_seed(1)
            model = change(new_model(load_spec(name), 0, hardware))
            step = build_train_step(model, KerasAdam(model.parameters()), hardware, images, labels, 128)
            for index in batches:
                step(index)
            finals[variant] = [step.totals.clone()] + [p.detach().clone() for p in model.parameters()]
            arms[variant] = lambda step=step: step(torch.randint(0, 6000, (128,), generator=generator))
        first, *others = finals.values()
        equal = all(torch.equal(a, b) for other in others for a, b in zip(first, other, strict=True))
        times = {k: v * 1e3 for k, v in interleaved(arms, rounds=20).items()}
        before = times["dropout as at 684b50e"]
        print(
            f"{name}: bit-equal after 8 steps {equal}; ms/step "
            + ", ".join(f"{k} {v:.2f} ({before / v:.3f}x)" for k, v in times.items())
        )


if __name__ == "__main__":
    {
        "dropout": dropout,
        "adam": adam,
        "allocator": allocator,
        "layout": layout,
        "relu_pool": relu_pool,
        "passes": passes,
    }[sys.argv[1]]()
