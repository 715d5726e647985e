"""Sanity: param counts, training FLOPs per step, fp32 mm rate, bf16 vs fp32 conv."""
import time, statistics, torch, torch.nn.functional as F
from explore_common import MODELS, build, parameter_count, train_flops, mm_gflops

for name in MODELS:
    m = build(name)
    print(f"{name}: params {parameter_count(m):,}  train GFLOP/step(b128) {train_flops(name)/1e9:.2f}")
print(f"fp32 mm 2048: {mm_gflops():.1f} GFLOP/s")

def t(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
# convnet3 conv3 forward at b=32: 32x64x24x24 -> 128, 3x3
for dt in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
    x = torch.randn(32, 64, 24, 24, dtype=dt); w = torch.randn(128, 64, 3, 3, dtype=dt)
    ms = t(lambda: F.conv2d(x, w))
    fl = 2*32*22*22*128*64*9
    print(f"conv fwd {dt}: {ms:.1f} ms  {fl/ms/1e6:.1f} GFLOP/s")
