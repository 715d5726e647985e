"""Dropout cost in isolation: forward+backward of each variant on the activation
shapes of one training step of each model (batch 128), 1 thread and current threads."""
import sys, time, statistics, torch
from explore_common import DROPS, BYTE_RNG

SHAPES = {
    "convnet3": [((128, 64, 24, 24), .25), ((128, 128, 11, 11), .25), ((128, 256), .5)],
    "convnet5": [((128, 64, 14, 14), .25), ((128, 96, 7, 7), .25), ((128, 128, 3, 3), .25), ((128, 164, 1, 1), .25), ((128, 256), .5)],
    "convnet7": [((128, 64, 14, 14), .15), ((128, 96, 7, 7), .39), ((128, 128, 3, 3), .3), ((128, 164, 1, 1), .4)] + [((128, n), .5) for n in (256, 148, 128)],
}
variants = sys.argv[2:] or list(DROPS)
thr = torch.get_num_threads()
for model, shapes in SHAPES.items() if sys.argv[1] == "all" else [(sys.argv[1], SHAPES[sys.argv[1]])]:
    xs = [(torch.randn(s, requires_grad=True), p) for s, p in shapes]
    n = sum(x.numel() for x, _ in xs)

    def run(fn, bwd=True):
        outs = [fn(x, p, True) for x, p in xs]
        if bwd:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    res = {v: [] for v in variants}
    for v in variants:
        run(DROPS[v])
    for _ in range(5):
        for v in variants:
            BYTE_RNG.buf = None  # count the per-step refill
            t0 = time.perf_counter(); run(DROPS[v]); res[v].append((time.perf_counter() - t0) * 1e3)
    # mask generation only
    gen = {
        "bernoulli_(f32)": lambda: [torch.empty_like(x).bernoulli_(1 - p) for x, p in xs],
        "bernoulli_(u8)": lambda: [torch.empty_like(x, dtype=torch.uint8).bernoulli_(1 - p) for x, p in xs],
        "bernoulli_(bf16)": lambda: [torch.empty_like(x, dtype=torch.bfloat16).bernoulli_(1 - p) for x, p in xs],
        "rand_like<p": lambda: [torch.rand_like(x) >= p for x, p in xs],
        "randint int64->u8 (1 draw)": lambda: torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64).view(torch.uint8) >= 64,
        "randint u8 per elem": lambda: torch.randint(0, 256, (n,), dtype=torch.uint8) >= 64,
    }
    g = {k: [] for k in gen}
    for _ in range(5):
        for k, f in gen.items():
            t0 = time.perf_counter(); f(); g[k].append((time.perf_counter() - t0) * 1e3)
    print(f"== {model}: {n/1e6:.2f} M dropped-layer elements/step, threads {thr}")
    for v, t in res.items():
        print(f"  fwd+bwd {v:12s} {statistics.median(t):7.1f} ms (min {min(t):.1f})")
    for k, t in g.items():
        print(f"  maskgen {k:26s} {statistics.median(t):7.1f} ms (min {min(t):.1f})", flush=True)
