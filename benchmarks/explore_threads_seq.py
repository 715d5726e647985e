"""Step-time sequences of convnet7 (plain) for thread settings, in one process.
arg: sequence like 'default,1,2,1,2' ('default' = no set_num_threads call yet)."""
import sys, time, statistics, torch
from explore_common import ConvNet7, ConvNet3, make_adam, fake_batch, plain_step, mm_rates
cls = {"convnet7": ConvNet7, "convnet3": ConvNet3}[sys.argv[2] if len(sys.argv) > 2 else "convnet7"]
m = cls().train(); opt = make_adam(m); x, y = fake_batch()
for thr in sys.argv[1].split(","):
    if thr != "default":
        torch.set_num_threads(int(thr))
    for _ in range(2): plain_step(m, opt, x, y)
    ts = []
    for i in range(6):
        t0 = time.perf_counter(); plain_step(m, opt, x, y); ts.append((time.perf_counter() - t0) * 1e3)
    print(f"threads={thr} (get_num_threads {torch.get_num_threads()}): median {statistics.median(ts):.0f} min {min(ts):.0f} max {max(ts):.0f}", flush=True)
print(open("/proc/pressure/cpu").readline().strip())
