"""Scratch helpers for the explore_* benchmarks (not part of the package).

Three models of the seed notebook, written plainly (like pytorch/examples
mnist/main.py), with a pluggable dropout function so dropout variants can be
compared on identical networks.  Timing helpers interleave variants and
report medians, because the 2-core machine is shared.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 128


# --------------------------------------------------------------------------
# dropout variants:  drop(x, p, training) -> tensor
# --------------------------------------------------------------------------
def drop_native(x, p, training):
    return F.dropout(x, p, training)


def drop_rand_lt(x, p, training):
    """mask from torch.rand_like(x) >= p (float32 uniform)"""
    if not training:
        return x
    keep = torch.rand_like(x) >= p
    return x * keep * (1.0 / (1.0 - p))


def drop_bernoulli_u8(x, p, training):
    """bernoulli drawn straight into a uint8 buffer"""
    if not training:
        return x
    keep = torch.empty_like(x, dtype=torch.uint8).bernoulli_(1.0 - p)
    return x * keep * (1.0 / (1.0 - p))


def drop_bernoulli_bf16(x, p, training):
    if not training:
        return x
    keep = torch.empty_like(x, dtype=torch.bfloat16).bernoulli_(1.0 - p)
    return x * keep * (1.0 / (1.0 - p))


class _ByteRNG:
    """One random draw per step for all dropout layers: int64 words viewed as
    bytes (8 random bytes per generator call); each layer takes a slice and
    keeps where byte >= round(p*256)."""

    def __init__(self):
        self.buf = None
        self.pos = 0

    def refill(self, nbytes):
        words = (nbytes + 7) // 8
        self.buf = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64).view(torch.uint8)
        self.pos = 0

    def take(self, n):
        if self.buf is None or self.pos + n > self.buf.numel():
            self.refill(max(n, 8 << 20))
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


BYTE_RNG = _ByteRNG()


def drop_bytes(x, p, training):
    if not training:
        return x
    thr = int(round(p * 256))
    keep = BYTE_RNG.take(x.numel()).view(x.shape) >= thr
    return x * keep * (256.0 / (256 - thr))


def drop_bytes_f(x, p, training):
    """same random bytes, but materialise one float mask (keep*scale) and do a
    single multiply; autograd's backward is then one multiply too."""
    if not training:
        return x
    thr = int(round(p * 256))
    b = BYTE_RNG.take(x.numel())
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape  # random bytes are random in any order: view them NHWC, no copy
        b = b.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        b = b.view(x.shape)
    m = b.ge(thr).to(x.dtype).mul_(256.0 / (256 - thr))
    return x * m


class _DropMaskFn(torch.autograd.Function):
    """y = x * keep * scale, saving only the bool mask (1 byte/elem)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, g * ctx.scale, 0.0), None, None


def drop_bytes_fn(x, p, training):
    if not training:
        return x
    thr = int(round(p * 256))
    keep = BYTE_RNG.take(x.numel()).view(x.shape) >= thr
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        keep = keep.contiguous(memory_format=torch.channels_last)
    return _DropMaskFn.apply(x, keep, 256.0 / (256 - thr))


DROPS: Dict[str, Callable] = {
    "native": drop_native,
    "rand_lt": drop_rand_lt,
    "bern_u8": drop_bernoulli_u8,
    "bern_bf16": drop_bernoulli_bf16,
    "bytes": drop_bytes,
    "bytes_fn": drop_bytes_fn,
    "bytes_f": drop_bytes_f,
}


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
class ConvNet3(nn.Module):
    def __init__(self, drop=drop_native):
        super().__init__()
        self.drop = drop
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3)
        self.fc1 = nn.Linear(15488, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        d, t = self.drop, self.training
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = d(x, 0.25, t)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(x, 2)
        x = d(x, 0.25, t)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = d(x, 0.5, t)
        return self.fc2(x)


class ConvNet5(nn.Module):
    def __init__(self, drop=drop_native):
        super().__init__()
        self.drop = drop
        ch = [1, 32, 64, 96, 128, 164]
        self.convs = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 5, padding=2) for i in range(5))
        self.fc1 = nn.Linear(164, 256)
        self.bn = nn.BatchNorm1d(256, eps=1e-3, momentum=0.01)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        d, t = self.drop, self.training
        x = F.relu(self.convs[0](x))
        for conv in self.convs[1:]:
            x = F.relu(conv(x))
            x = F.max_pool2d(x, 2)
            x = d(x, 0.25, t)
        x = torch.flatten(x, 1)
        x = self.bn(F.relu(self.fc1(x)))
        x = d(x, 0.5, t)
        return self.fc2(x)


def _same2(x):
    # TF 'same' padding for a 2x2 kernel, stride 1: 0 top/left, 1 bottom/right
    return F.pad(x, (0, 1, 0, 1))


class ConvNet7(nn.Module):
    def __init__(self, drop=drop_native):
        super().__init__()
        self.drop = drop
        self.c1 = nn.Conv2d(1, 16, 2)
        self.c2 = nn.Conv2d(16, 32, 2, stride=2)  # 28 -> 14, TF 'same' pads 0 here
        self.c3 = nn.Conv2d(32, 64, 2)
        self.c4 = nn.Conv2d(64, 96, 2)
        self.c5 = nn.Conv2d(96, 128, 2)
        self.c6 = nn.Conv2d(128, 164, 2)
        self.c7 = nn.Conv2d(164, 164, 2)
        self.f1 = nn.Linear(164, 256)
        self.b1 = nn.BatchNorm1d(256, eps=1e-3, momentum=0.01)
        self.f2 = nn.Linear(256, 148)
        self.b2 = nn.BatchNorm1d(148, eps=1e-3, momentum=0.01)
        self.f3 = nn.Linear(148, 128)
        self.b3 = nn.BatchNorm1d(128, eps=1e-3, momentum=0.01)
        self.f4 = nn.Linear(128, 10)

    def forward(self, x):
        d, t = self.drop, self.training
        x = F.relu(self.c1(_same2(x)))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(_same2(x)))
        x = d(x, 0.15, t)
        x = F.relu(self.c4(_same2(x)))
        x = F.max_pool2d(x, 2)
        x = d(x, 0.39, t)
        x = F.relu(self.c5(_same2(x)))
        x = F.max_pool2d(x, 2)
        x = d(x, 0.3, t)
        x = F.relu(self.c6(_same2(x)))
        x = F.relu(self.c7(_same2(x)))
        x = F.max_pool2d(x, 2)
        x = d(x, 0.4, t)
        x = torch.flatten(x, 1)
        x = d(self.b1(F.relu(self.f1(x))), 0.5, t)
        x = d(self.b2(F.relu(self.f2(x))), 0.5, t)
        x = d(self.b3(F.relu(self.f3(x))), 0.5, t)
        return self.f4(x)


MODELS = {"convnet3": ConvNet3, "convnet5": ConvNet5, "convnet7": ConvNet7}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------
# FLOPs: forward MACs of conv/linear via hooks; training = 2*MACs*3
# --------------------------------------------------------------------------
def train_flops(model, batch=BATCH):
    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            macs[0] += out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs[0] += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(batch, 1, 28, 28))
    model.train(was)
    for h in hs:
        h.remove()
    return 2 * macs[0] * 3


# --------------------------------------------------------------------------
# data + a plain training step (pytorch/examples style)
# --------------------------------------------------------------------------
def fake_batch(batch=BATCH, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def make_adam(model, **kw):
    return torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, **kw)


def plain_step(model, opt, x, y, set_to_none=True, item=True):
    opt.zero_grad(set_to_none=set_to_none)
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    return loss.item() if item else loss


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
def time_interleaved(variants: Dict[str, Callable[[], object]], warmup=3, rounds=3, per_round=4):
    """variants: name -> zero-arg callable doing ONE step (must synchronise,
    e.g. via .item()).  Warm each up, then `rounds` rounds in which every
    variant runs `per_round` timed steps.  Returns name -> (median_ms, all)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), v) for k, v in times.items()}


def report(res, base=None, flops=None, title=""):
    if title:
        print(f"--- {title}")
    b = res[base][0] if base else None
    for k, (med, v) in res.items():
        extra = f"  x{b / med:5.2f} vs {base}" if b else ""
        gf = f"  {flops / med / 1e6:6.1f} GFLOP/s" if flops else ""
        print(f"{k:28s} median {med:8.1f} ms  (min {min(v):7.1f}, max {max(v):7.1f}, n={len(v)}){extra}{gf}", flush=True)


def mm_gflops(n=2048, reps=5):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def mm_rates():
    """fp32 2048^2 mm GFLOP/s at 1 and 2 threads (restores 2)."""
    n0 = torch.get_num_threads()
    torch.set_num_threads(1); r1 = mm_gflops(reps=3)
    torch.set_num_threads(2); r2 = mm_gflops(reps=3)
    torch.set_num_threads(n0)
    try:
        psi = open("/proc/pressure/cpu").readline().split()[1]
    except OSError:
        psi = "?"
    return f"fp32 mm2048 GFLOP/s: 1thr {r1:.1f}, 2thr {r2:.1f}; cpu pressure {psi}; torch threads now {torch.get_num_threads()}"
