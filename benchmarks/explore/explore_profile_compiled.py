"""Profile a torch.compile'd model's training step (top ops by self CPU)."""
import os, sys, torch, torch.nn.functional as F
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from torch.profiler import profile, ProfilerActivity
from explore_common import DROPS, build, fake_batch, make_optimizer
name = sys.argv[1]; drop = sys.argv[2] if len(sys.argv) > 2 else "native"
torch.manual_seed(0)
m = build(name, DROPS[drop]); opt = make_optimizer(m, fused=True); x, y = fake_batch()
if os.environ.get("FALLBACK_RANDOM"):
    import torch._inductor.config as ic; ic.fallback_random = True
if os.environ.get("KPROF"):
    import torch._inductor.config as ic; ic.cpp.enable_kernel_profile = True
cm = torch.compile(m)
def step():
    opt.zero_grad(); loss = F.nll_loss(cm(x), y); loss.backward(); opt.step(); return loss.item()
for _ in range(3): step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3): step()
ka = prof.key_averages()
print(f"{name} compiled drop={drop}: profiled ms/step {sum(e.self_cpu_time_total for e in ka)/3/1e3:.1f}")
print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
