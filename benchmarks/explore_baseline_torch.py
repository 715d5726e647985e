"""Task 1a: plain eager PyTorch fp32 baseline (pytorch/examples style), ms/step at batch 128."""
import sys, torch
from explore_common import MODELS, fake_batch, make_adam, plain_step, time_interleaved, report, train_flops, mm_gflops

names = sys.argv[1:] or list(MODELS)
print("torch", torch.__version__, "threads", torch.get_num_threads(), "interop", torch.get_num_interop_threads())
print(f"fp32 mm 2048: {mm_gflops():.1f} GFLOP/s")
for name in names:
    torch.manual_seed(0)
    m = MODELS[name]().train()
    opt = make_adam(m)
    x, y = fake_batch()
    res = time_interleaved({name: lambda: plain_step(m, opt, x, y)}, warmup=3, rounds=1, per_round=12)
    report(res, flops=train_flops(m))
print(f"fp32 mm 2048: {mm_gflops():.1f} GFLOP/s")
