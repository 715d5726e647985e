"""Scratch helpers for the explore_* scripts (not part of the package).

The networks are the PyTorch peer's (benchmarks/peers/torch_peer.py: the seed notebook's three
models written plainly, like pytorch/examples mnist/main.py), whose dropout function is pluggable
so that the dropout variants below can be compared on identical networks. Timing helpers
interleave variants and report medians, because the 2-core machine is shared.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the peers

from cnnlab.catalog import load_spec  # noqa: E402
from cnnlab.models import FastDropout, summarize  # noqa: E402
from peers.torch_peer import MODELS, build, make_optimizer, parameter_count, train_step  # noqa: E402,F401 (re-exported)

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


def drop_cnnlab(x, p, training):
    """cnnlab's own masks (models.FastDropout: four 16-bit uniforms from each 64-bit draw)."""
    return FastDropout(p).train(training)(x)


DROPS: Dict[str, Callable] = {
    "native": drop_native,
    "cnnlab": drop_cnnlab,
    "rand_lt": drop_rand_lt,
    "bern_u8": drop_bernoulli_u8,
    "bern_bf16": drop_bernoulli_bf16,
    "bytes": drop_bytes,
    "bytes_fn": drop_bytes_fn,
    "bytes_f": drop_bytes_f,
}


# --------------------------------------------------------------------------
# FLOPs of a training step: cnnlab's count for the same network (3 x forward)
# --------------------------------------------------------------------------
def train_flops(name, batch=BATCH):
    return summarize(load_spec(name)).training_flops * batch


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
