"""Does training N seeds of one model together, as one vectorised model, beat N sequential steps on the CPU?

GitHub issue "Speed, round two", goal 1. Each arm does one training step for each of N seeds (its
own initial weights, its own batch of 128 from its own permutation, dropout active), with cnnlab's
step semantics: forward, cross-entropy on logits, backward, KerasAdam, loss and correct counts
accumulated on the device.

- `sequential`: N of cnnlab's own `TrainStep`s (eager, channels_last as `resolve_hardware` sets it),
  one after the other: what a run does today, one unit per seed.
- `vmap`: `torch.func.functional_call` + `torch.vmap(randomness="different")` over stacked (N, ...)
  parameters of cnnlab's own `SequentialNet` (its `FastDropout` and `KerasBatchNorm` included),
  gradients by autograd through vmap (one backward of the sum of the N mean losses), KerasAdam on
  the stacked tensors. `vmap_grad` is the same with `vmap(torch.func.grad(...))`.
- `groups`: an explicit "seeds as channel groups" network: the N batches side by side as channels
  (B, N*C, H, W); convolutions with groups=N; dense layers as `baddbmm` over (N, B, F); per-seed
  batch norm; max-pool and ReLU unchanged; Keras-order Flatten per seed. Its dropout draws one mask
  for the whole (N-seed) tensor with FastDropout's trick. `groups_exact` draws each seed's mask from
  that seed's own generator, in FastDropout's order and shape, so that even with dropout on its
  losses are those of N separate cnnlab runs (up to float rounding).

First a correctness check (`--check-seeds` seeds, 10 steps): the batched arms' initial weights,
unstacked per seed, must be bit-equal to `build_model(spec, seed=s)`, and their per-seed losses must
match N separate runs on the same batches (cnnlab's TrainStep, each from torch.manual_seed(seed)),
with dropout off, and for `groups_exact` with dropout on. In float32 the models with batch norm after
dense layers (convnet5, convnet7) amplify rounding within a few steps, as much as cnnlab's own NCHW
and channels_last runs differ (reported beside it); where float32 differs by more than 1e-5 the check
is repeated in float64, where rounding no longer hides a semantic difference. Then interleaved
timing (A B C ... A B C ...), median ms per step of all N seeds, ratios against `sequential`
measured in the same run.

Usage (from the repository root or this folder, with the project's venv):

    python benchmarks/explore/explore_batched_seeds.py --models convnet3 convnet7 --seeds 5 --precision bf16 fp32

`--also-seeds 2 3` adds smaller N (`--also-seeds-for convnet7`: for those models only); `--rounds`/
`--per-round` set the timing; `--out` the JSON (benchmarks/results/batched_seeds_cpu.json).
`BENCH_THREADS=N` sets torch's thread count.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning threads on a busy 2-core machine make steps 2-9x slower
# (explore_omp_wait.py); CI sets the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import datetime
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from cnnlab.catalog import load_spec  # noqa: E402
from cnnlab.config import Hardware  # noqa: E402
from cnnlab.engine import TrainStep, _autocast, new_model, to_input  # noqa: E402
from cnnlab.hardware import cpu_name  # noqa: E402
from cnnlab.models import FastDropout, KerasBatchNorm, KerasFlatten, SequentialNet, build_model  # noqa: E402
from cnnlab.optim import KerasAdam  # noqa: E402

BATCH = 128
N_TRAIN = 4096  # random uint8 images; only speed and equality are measured, not accuracy


def hardware_for(precision: str) -> Hardware:
    """What `resolve_hardware` gives on this CPU with --compile off: eager, channels_last."""
    return Hardware("cpu", cpu_name(), precision, False, channels_last=True, threads=torch.get_num_threads())


def fake_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N_TRAIN, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 10, (N_TRAIN,), generator=g)


def seed_batches(seeds: list[int], steps: int) -> list[torch.Tensor]:
    """Step i's (N, B) indices: each seed's batch i of its own permutation (cnnlab's shuffle stream)."""
    orders = [torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(s + 1)) for s in seeds]
    per_epoch = N_TRAIN // BATCH
    return [
        torch.stack([o[(i % per_epoch) * BATCH : (i % per_epoch + 1) * BATCH] for o in orders]) for i in range(steps)
    ]


def seed_model(spec, seed: int, dtype: torch.dtype = torch.float32) -> SequentialNet:
    """build_model(spec, seed) in `dtype` (float64 only for the check; BN's moving averages stay float32,
    as KerasBatchNorm writes float32 into them; a training forward never reads them)."""
    model = build_model(spec, seed=seed)
    if dtype != torch.float32:
        model.to(dtype)
        for m in model.modules():
            if isinstance(m, KerasBatchNorm):
                m.running_mean, m.running_var = m.running_mean.float(), m.running_var.float()
    return model


def dropout_off(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (FastDropout, SeedDropout)):
            m.threshold = 0


# ---------------------------------------------------------------------------------------------
# Arm 0: N sequential cnnlab steps


class Sequential:
    """N of cnnlab's TrainSteps, stepped one after the other."""

    def __init__(self, spec, seeds, hardware, images, labels):
        self.models = [new_model(spec, s, hardware) for s in seeds]
        self.steps = [TrainStep(m.train(), KerasAdam(m.parameters()), hardware, images, labels) for m in self.models]

    def __call__(self, index: torch.Tensor) -> None:
        for step, seed_index in zip(self.steps, index):
            step(seed_index)

    def seed_state_dict(self, s: int) -> dict[str, torch.Tensor]:
        return self.models[s].state_dict()

    def modules(self):
        return [m for model in self.models for m in model.modules()]


# ---------------------------------------------------------------------------------------------
# Arm (a): torch.func over stacked parameters


class VmapSeeds:
    """cnnlab's SequentialNet run by `functional_call` under `vmap` over (N, ...) stacked weights."""

    def __init__(self, spec, seeds, hardware, images, labels, use_grad=False, dtype=torch.float32):
        self.hardware, self.images, self.labels, self.use_grad, self.dtype = hardware, images, labels, use_grad, dtype
        models = [seed_model(spec, s, dtype) for s in seeds]
        self.base = copy.deepcopy(models[0]).train()  # the template functional_call swaps weights into
        names = [k for k, _ in self.base.named_parameters()]
        self.params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in names}
        for p in self.params.values():
            p.requires_grad_(not use_grad)
        self.buffers = {
            k: torch.stack([dict(m.named_buffers())[k] for m in models]) for k, _ in self.base.named_buffers()
        }
        self.optimizer = KerasAdam(list(self.params.values()))
        self.totals = torch.zeros(len(seeds), 2)

    def _forward(self, params, buffers, x, y):
        with _autocast(self.hardware):
            logits = functional_call(self.base, (params, buffers), (x,))
        logits = logits.to(self.dtype)
        loss = F.cross_entropy(logits, y)
        return loss, (loss.detach(), (logits.detach().argmax(dim=1) == y).sum())

    def __call__(self, index: torch.Tensor) -> None:
        n, b = index.shape
        x = to_input(self.images[index.flatten()], self.hardware.channels_last).to(self.dtype).unflatten(0, (n, b))
        y = self.labels[index]
        if self.use_grad:
            grads, (losses, correct) = vmap(grad(self._forward, has_aux=True), randomness="different")(
                self.params, self.buffers, x, y
            )
            for k, p in self.params.items():
                p.grad = grads[k]
        else:
            self.optimizer.zero_grad(set_to_none=True)
            losses, (_, correct) = vmap(self._forward, randomness="different")(self.params, self.buffers, x, y)
            losses.sum().backward()  # seeds share no weights: the sum's gradient is each seed's own
        self.totals[:, 0] += losses.detach() * b
        self.totals[:, 1] += correct
        self.optimizer.step()

    def seed_state_dict(self, s: int) -> dict[str, torch.Tensor]:
        return {k: v[s] for k, v in {**self.params, **self.buffers}.items()}

    def modules(self):
        return list(self.base.modules())


# ---------------------------------------------------------------------------------------------
# Arm (b): seeds as channel groups


class GroupedConv(nn.Module):
    """N seeds' Conv2d as one convolution with groups=N: (B, N*C, H, W) -> (B, N*O, H', W')."""

    def __init__(self, convs: list[nn.Conv2d], channels_last: bool):
        super().__init__()
        c = convs[0]
        self.n, self.stride, self.padding = len(convs), c.stride, c.padding
        weight = torch.cat([m.weight.detach() for m in convs])  # seed-major output channels
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in convs])) if c.bias is not None else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.n)

    def seed(self, s):
        o = self.weight.shape[0] // self.n
        out = {"weight": self.weight[s * o : (s + 1) * o]}
        if self.bias is not None:
            out["bias"] = self.bias[s * o : (s + 1) * o]
        return out


class BatchedLinear(nn.Module):
    """N seeds' Linear as one baddbmm: (N, B, F) -> (N, B, O)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))  # (N, O, F)
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]))  # (N, O)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def seed(self, s):
        return {"weight": self.weight[s], "bias": self.bias[s]}


class SeedBatchNorm(nn.Module):
    """N seeds' KerasBatchNorm (Keras 3 numerics): each seed normalised with its own batch's moments.
    Dense: (N, B, F), moments over B. Convolution: (B, N*C, H, W), i.e. KerasBatchNorm over N*C channels."""

    def __init__(self, norms: list[KerasBatchNorm]):
        super().__init__()
        if norms[0].numerics != 3:
            raise ValueError("only Keras 3 numerics here")
        self.momentum, self.epsilon = norms[0].momentum, norms[0].epsilon
        stack = lambda name: torch.stack([getattr(m, name).detach() for m in norms])  # noqa: E731
        self.weight = nn.Parameter(stack("weight")) if norms[0].weight is not None else None
        self.bias = nn.Parameter(stack("bias")) if norms[0].bias is not None else None
        self.register_buffer("running_mean", stack("running_mean"))
        self.register_buffer("running_var", stack("running_var"))

    def forward(self, x):
        if x.dim() == 3:  # (N, B, F)
            axes, shape = [1], (x.shape[0], 1, -1)
        else:  # (B, N*C, H, W)
            axes, shape = [0, 2, 3], (1, -1, 1, 1)
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        with torch.no_grad():
            self.running_mean.view(-1).lerp_(mean.detach().float().view(-1), 1 - self.momentum)
            self.running_var.view(-1).lerp_(var.detach().float().view(-1), 1 - self.momentum)
        scale = torch.rsqrt(var + self.epsilon).view(shape)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        shift = -mean.view(shape) * scale
        if self.bias is not None:
            shift = shift + self.bias.view(shape)
        return x * scale.to(x.dtype) + shift.to(x.dtype)

    def seed(self, s):
        out = {"running_mean": self.running_mean[s], "running_var": self.running_var[s]}
        out |= {"weight": self.weight[s]} if self.weight is not None else {}
        return out | ({"bias": self.bias[s]} if self.bias is not None else {})


class SeedDropout(FastDropout):
    """FastDropout over all N seeds at once (one draw), or, with `generators`, each seed's mask drawn
    from its own generator exactly as its own FastDropout would (same count, same order, same shape)."""

    def __init__(self, rate: float, n: int, generators: list[torch.Generator] | None):
        super().__init__(rate)
        self.n, self.generators = n, generators

    def forward(self, x):
        if not self.training or self.threshold == 0:
            return x
        if self.generators is None:
            return super().forward(x)
        if x.dim() == 3:  # (N, B, F): seed s is x[s]
            shape, dim = tuple(x.shape[1:]), 0
        else:  # (B, N*C, H, W): seed s is channels s*C..(s+1)*C, its FastDropout saw (B, C, H, W) in NCHW order
            b, nc, h, w = x.shape
            shape, dim = (b, nc // self.n, h, w), 1
        count = math.prod(shape)
        masks = []
        for g in self.generators:
            words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, generator=g)
            masks.append(words.view(torch.int16)[:count].view(shape))
        noise = torch.stack(masks) if dim == 0 else torch.cat(masks, dim=1)
        keep = (noise >= self.threshold - 32768).to(x.dtype).mul_(self.scale)
        return x * keep


class SeedFlatten(nn.Module):
    """(B, N*C, H, W) -> (N, B, H*W*C): each seed's Keras-order Flatten."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.unflatten(1, (self.n, -1)).permute(1, 0, 3, 4, 2).flatten(2)


def group_layer(layers: list[nn.Module], channels_last: bool, generators) -> nn.Module:
    """The N seeds' copies of one SequentialNet layer as one layer over all seeds."""
    first, n = layers[0], len(layers)
    if isinstance(first, nn.Sequential):
        return nn.Sequential(
            *[group_layer([m[j] for m in layers], channels_last, generators) for j in range(len(first))]
        )
    if isinstance(first, nn.Conv2d):
        return GroupedConv(layers, channels_last)
    if isinstance(first, nn.Linear):
        return BatchedLinear(layers)
    if isinstance(first, KerasBatchNorm):
        return SeedBatchNorm(layers)
    if isinstance(first, FastDropout):
        return SeedDropout(first.rate, n, generators)
    if isinstance(first, KerasFlatten):
        return SeedFlatten(n)
    if isinstance(first, (nn.ReLU, nn.MaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Identity)):
        return copy.deepcopy(first)  # elementwise or per channel: seed-blind
    raise TypeError(f"no grouped version of {type(first).__name__}")


class GroupedSeeds:
    """The seeds-as-channel-groups network and its step."""

    def __init__(self, spec, seeds, hardware, images, labels, exact_dropout=False, dtype=torch.float32):
        self.hardware, self.images, self.labels, self.n, self.dtype = hardware, images, labels, len(seeds), dtype
        models, generators = [], []
        for s in seeds:
            # engine.train: torch.manual_seed(seed), then the model is built (nn.Conv2d's and nn.Linear's
            # own initialisation draw from that generator before keras_init_ overwrites them), then
            # dropout draws. So a seed's dropout stream is the global state right after building.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                models.append(seed_model(spec, s, dtype))
                generators.append(torch.Generator())
                generators[-1].set_state(torch.get_rng_state())
        generators = generators if exact_dropout else None
        self.layers = nn.ModuleList(
            group_layer([m.layers[i] for m in models], hardware.channels_last, generators)
            for i in range(len(models[0].layers))
        ).train()
        self.optimizer = KerasAdam(self.layers.parameters())
        self.totals = torch.zeros(len(seeds), 2)

    def __call__(self, index: torch.Tensor) -> None:
        n, b = index.shape
        x = self.images[index].movedim(0, 1).float().div_(255.0).to(self.dtype)  # (B, N, H, W): seed s as channel s
        if self.hardware.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.labels[index]
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.hardware):
            for layer in self.layers:
                x = layer(x)
        logits = x.to(self.dtype)  # (N, B, classes)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, b).mean(dim=1)
        self.totals[:, 0] += losses.detach() * b
        self.totals[:, 1] += (logits.detach().argmax(dim=2) == y).sum(dim=1)
        losses.sum().backward()
        self.optimizer.step()

    def seed_state_dict(self, s: int) -> dict[str, torch.Tensor]:
        """Seed s's weights under SequentialNet's names (what a per-seed checkpoint would hold)."""
        out = {}
        for name, module in self.layers.named_modules():
            if hasattr(module, "seed"):
                out |= {f"layers.{name}.{k}": v for k, v in module.seed(s).items()}
        return out

    def modules(self):
        return list(self.layers.modules())


ARMS: dict[str, Callable] = {
    "sequential": Sequential,
    "vmap": VmapSeeds,
    "vmap_grad": lambda *a, **k: VmapSeeds(*a, use_grad=True, **k),
    "groups": GroupedSeeds,
    "groups_exact": lambda *a, **k: GroupedSeeds(*a, exact_dropout=True, **k),
}


# ---------------------------------------------------------------------------------------------
# Correctness


def reference_losses(spec, seeds, hardware, images, labels, batches, dropout: bool, dtype=torch.float32):
    """Per-seed losses (N, steps) and final state dicts of N separate runs, each from
    torch.manual_seed(seed) as engine.train does: cnnlab's own TrainStep in float32; in float64 the
    same step written out (TrainStep casts logits to float32), on the same SequentialNet."""
    losses, states = torch.zeros(len(seeds), len(batches)), []
    for i, s in enumerate(seeds):
        torch.manual_seed(s)
        model = seed_model(spec, s, dtype).train()
        if hardware.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if not dropout:
            dropout_off(model)
        optimizer = KerasAdam(model.parameters())
        step = TrainStep(model, optimizer, hardware, images, labels)
        for t, index in enumerate(batches):
            if dtype == torch.float32:
                step.reset()
                step(index[i])
                losses[i, t] = step.totals[0] / BATCH
                continue
            x = to_input(images[index[i]], hardware.channels_last).to(dtype)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), labels[index[i]])
            loss.backward()
            optimizer.step()
            losses[i, t] = loss.detach()
        states.append(model.state_dict())
    return losses, states


def check(name: str, seeds: list[int], arms: list[str], steps: int = 10) -> dict:
    """Initial weights bit-equal per seed; per-seed losses over `steps` steps against N separate runs
    with dropout off (and, for groups_exact, on), in float32. convnet5/convnet7 (batch norm after
    dense layers) amplify rounding over a few steps, so the float32 differences are set beside the
    difference between two cnnlab float32 runs that differ only in layout (NCHW vs channels_last),
    and, where float32 differs by more than 1e-5, the comparison is repeated in float64."""
    spec = load_spec(name)
    images, labels = fake_data()
    batches = seed_batches(seeds, steps)
    result: dict = {"seeds": seeds, "steps": steps}
    hardware = hardware_for("fp32")
    floor_cl, _ = reference_losses(spec, seeds, hardware, images, labels, batches, dropout=False)
    floor_nchw, _ = reference_losses(
        spec, seeds, Hardware("cpu", "", "fp32", False, False, 1), images, labels, batches, dropout=False
    )
    result["fp32_cnnlab_nchw_vs_channels_last"] = {
        "max_abs_loss_diff_step1": (floor_cl[:, 0] - floor_nchw[:, 0]).abs().max().item(),
        "max_abs_loss_diff": (floor_cl - floor_nchw).abs().max().item(),
    }
    print(f"check {name} cnnlab NCHW vs channels_last (fp32, dropout off): max |loss diff| "
          f"{result['fp32_cnnlab_nchw_vs_channels_last']['max_abs_loss_diff']:.2e}", flush=True)  # fmt: skip
    for dtype in (torch.float32, torch.float64):
        label = "fp32" if dtype == torch.float32 else "fp64"
        if dtype == torch.float64 and all(
            v["max_abs_loss_diff"] <= 1e-5 for k, v in result.items() if k.startswith("fp32/")
        ):
            break
        for dropout in (False, True):
            wanted = [a for a in arms if a != "sequential" and (a == "groups_exact") == dropout]
            if dtype == torch.float64:  # float64 convolutions are slow here; vmap_grad is vmap's forward
                wanted = [a for a in wanted if a != "vmap_grad"]
            if not wanted:
                continue
            reference, reference_states = reference_losses(
                spec, seeds, hardware, images, labels, batches, dropout, dtype
            )
            for arm_name in wanted:
                arm = ARMS[arm_name](spec, seeds, hardware, images, labels, dtype=dtype)
                init = [seed_model(spec, s, dtype).state_dict() for s in seeds]
                bit_equal = all(
                    torch.equal(arm.seed_state_dict(i)[k], v) for i in range(len(seeds)) for k, v in init[i].items()
                )
                if not dropout:
                    for m in arm.modules():
                        if isinstance(m, FastDropout):
                            m.threshold = 0
                losses = torch.zeros(len(seeds), steps)
                for t in range(steps):
                    arm.totals.zero_()
                    arm(batches[t])
                    losses[:, t] = arm.totals[:, 0] / BATCH
                trained = [arm.seed_state_dict(i) for i in range(len(seeds))]
                weights_diff = max(
                    (trained[i][k].double() - v.double()).abs().max().item()
                    for i in range(len(seeds)) for k, v in reference_states[i].items()
                )  # fmt: skip
                entry = {
                    "initial_weights_bit_equal": bit_equal,
                    "max_abs_loss_diff_step1": (losses[:, 0] - reference[:, 0]).abs().max().item(),
                    "max_abs_loss_diff": (losses - reference).abs().max().item(),
                    "max_abs_weight_diff_after": weights_diff,
                }
                result[f"{label}/{arm_name}/dropout_{'on' if dropout else 'off'}"] = entry
                print(f"check {name} {label} {arm_name:12s} dropout {'on ' if dropout else 'off'}: init bit-equal "
                      f"{bit_equal}, max |loss diff| step 1 {entry['max_abs_loss_diff_step1']:.1e}, "
                      f"{steps} steps {entry['max_abs_loss_diff']:.1e}; max |weight diff| after {weights_diff:.1e}",
                      flush=True)  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------
# Timing


def time_arms(name: str, precision: str, seeds: list[int], arms: list[str], warmup: int, rounds: int, per_round: int):
    """Interleaved: every arm `per_round` steps, `rounds` times, after `warmup` steps each."""
    spec, hardware = load_spec(name), hardware_for(precision)
    images, labels = fake_data()
    batches = seed_batches(seeds, N_TRAIN // BATCH)
    built = {a: ARMS[a](spec, seeds, hardware, images, labels) for a in arms}
    cursor = {a: 0 for a in arms}

    def one(a):
        built[a](batches[cursor[a] % len(batches)])
        cursor[a] += 1

    for a in arms:
        for _ in range(warmup):
            one(a)
    times = {a: [] for a in arms}
    for _ in range(rounds):
        for a in arms:
            for _ in range(per_round):
                started = time.perf_counter()
                one(a)
                times[a].append((time.perf_counter() - started) * 1e3)
    base = statistics.median(times["sequential"])
    out = {}
    for a in arms:
        med = statistics.median(times[a])
        out[a] = {"median_ms": round(med, 2), "min_ms": round(min(times[a]), 2), "max_ms": round(max(times[a]), 2),
                  "speedup_vs_sequential": round(base / med, 3), "n": len(times[a]),
                  "ms": [round(t, 1) for t in times[a]]}  # fmt: skip
        totals = [s.totals for s in built[a].steps] if a == "sequential" else [built[a].totals]
        ok = all(bool(torch.isfinite(t).all()) for t in totals)
        print(f"{name} {precision} N={len(seeds)} {a:12s} median {med:8.1f} ms (min {min(times[a]):7.1f}, "
              f"max {max(times[a]):7.1f}, n={len(times[a])})  x{base / med:5.2f} vs sequential"
              f"{'' if ok else '  NON-FINITE'}", flush=True)  # fmt: skip
    return out


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["convnet3", "convnet5", "convnet7"])
    parser.add_argument("--seeds", type=int, default=5, help="N, the number of seeds trained together")
    parser.add_argument("--also-seeds", type=int, nargs="*", default=[], help="smaller N also timed")
    parser.add_argument("--also-seeds-for", nargs="*", default=None, help="models the smaller N are timed for (all)")
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--arms", nargs="+", default=["vmap", "vmap_grad", "groups", "groups_exact"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=1)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-seeds", type=int, default=3, help="seeds in the correctness check")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (written atomically)")
    args = parser.parse_args()
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    import warnings

    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's lerp_ fallback
    started = time.time()
    results = {
        "question": "N seeds of one model trained as one vectorised model vs N sequential cnnlab steps, CPU",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "flags": cpu_flags(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "-"),
            "loadavg_before": os.getloadavg(),
            "cpu_pressure_before": pressure(),
        },  # fmt: skip
        "batch": BATCH,
        "check": {},
        "timing": {},
    }
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}", flush=True)  # fmt: skip
    for name in args.models:
        if not args.skip_check:
            results["check"][name] = check(
                name, list(range(args.check_seeds)), ["sequential", "vmap", "vmap_grad", "groups", "groups_exact"]
            )
        for precision in args.precision:
            also = args.also_seeds if args.also_seeds_for is None or name in args.also_seeds_for else []
            for n in [args.seeds] + also:
                key = f"{name}/{precision}/N={n}"
                results["timing"][key] = time_arms(
                    name,
                    precision,
                    list(range(n)),
                    ["sequential"] + args.arms,
                    args.warmup,
                    args.rounds,
                    args.per_round,
                )
    results["machine"] |= {"loadavg_after": os.getloadavg(), "cpu_pressure_after": pressure(),
                           "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                           "wall_s": round(time.time() - started)}  # fmt: skip
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
