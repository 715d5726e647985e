"""One conv layer fwd+bwd (convnet3 conv3 / convnet5 conv2 / convnet7 c4): mkldnn NCHW vs channels_last vs
mkldnn disabled (im2col+MKL), GFLOP/s vs torch.mm in the same run."""
import time, statistics, torch, torch.nn.functional as F
from explore_common import mm_gflops
print("threads", torch.get_num_threads(), f"mm {mm_gflops(reps=3):.1f} GFLOP/s")
LAYERS = {"c3.conv3 64->128 3x3 @24": (64, 128, 3, 24, 0), "c5.conv2 32->64 5x5 @28": (32, 64, 5, 28, 2),
          "c7.c4 64->96 2x2 @15": (64, 96, 2, 15, 0)}
for lname, (ci, co, k, hw, pad) in LAYERS.items():
    res = {}
    for cfg in ("nchw", "cl", "nchw", "cl", "mkldnn_off"):
        x = torch.randn(128, ci, hw, hw, requires_grad=True); w = torch.randn(co, ci, k, k, requires_grad=True)
        if cfg == "cl":
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(); w = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        ctx = torch.backends.mkldnn.flags(enabled=cfg != "mkldnn_off")
        with ctx:
            y = F.conv2d(x, w, padding=pad); g = torch.ones_like(y)
            def run(): out = F.conv2d(x, w, padding=pad); out.backward(g)
            run(); ts = []
            for _ in range(3 if cfg == "mkldnn_off" else 5):
                t0 = time.perf_counter(); run(); ts.append(time.perf_counter() - t0)
        fl = 2 * y.numel() * ci * k * k * 3
        res.setdefault(cfg, []).append(fl / statistics.median(ts) / 1e9)
    print(lname, "  ".join(f"{c}: {max(v):.1f} GFLOP/s" for c, v in res.items()), flush=True)
print(f"mm {mm_gflops(reps=3):.1f} GFLOP/s")
