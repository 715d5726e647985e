"""Adam.step for convnet3's 4.06M params: eager default / fused vs torch.compile(opt.step)."""
import os, time, statistics, torch
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from explore_common import ConvNet3, make_adam
opts = {}
for kind, kw in {"default": {}, "fused": {"fused": True}, "compiled": {}}.items():
    torch.manual_seed(0); m = ConvNet3()
    for p in m.parameters(): p.grad = torch.randn_like(p)
    o = make_adam(m, **kw)
    opts[kind] = o.step
    if kind == "compiled":
        st = torch.compile(o.step)
        t0 = time.perf_counter(); st(); print(f"compile opt.step: {time.perf_counter()-t0:.1f}s")
        opts[kind] = st
for f in opts.values(): f(); f()
t = {k: [] for k in opts}
for _ in range(9):
    for k, f in opts.items():
        t0 = time.perf_counter(); f(); t[k].append((time.perf_counter() - t0) * 1e3)
print("  ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in t.items()))
