"""Step-time sequence for convnet7 plain at 2 threads then 1 thread (run under different OMP_* env)."""
import os, time, statistics, torch
from explore_common import build, make_optimizer, fake_batch, train_step, mm_rates
m = build("convnet7"); opt = make_optimizer(m); x, y = fake_batch()
for thr in (2, 1, 2, 1):
    torch.set_num_threads(thr)
    for _ in range(2): train_step(m, opt, x, y)
    ts = []
    for i in range(8):
        t0 = time.perf_counter(); train_step(m, opt, x, y); ts.append((time.perf_counter() - t0) * 1e3)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY','-')} threads={thr}: median {statistics.median(ts):.0f} min {min(ts):.0f} max {max(ts):.0f}", flush=True)
print(mm_rates())
