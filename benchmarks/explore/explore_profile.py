"""torch.profiler of a training step: top ops by self CPU time.
Usage: python explore_profile.py MODEL [recipe [steps [rows [by-shape]]]]   recipe in {plain, cnnlab}
plain: the PyTorch peer's step; cnnlab: cnnlab's own step on the CPU (engine.build_train_step with
the defaults resolved for the CPU, glibc keeping freed memory as cnnlab's runner has it). BENCHMARKS.md's profile table used recipe 'best', the fastest
eager recipe of explore_recipe.py (commit 87f1861), which cnnlab's step has since adopted ('best'
is accepted as another name for 'cnnlab')."""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from explore_common import BATCH, build, fake_batch, load_spec, make_optimizer, train_step

name = sys.argv[1]
recipe = sys.argv[2] if len(sys.argv) > 2 else "plain"
nsteps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.manual_seed(0)
if recipe == "plain":
    m = build(name); opt = make_optimizer(m); x, y = fake_batch()
    step = lambda: train_step(m, opt, x, y)
elif recipe in ("cnnlab", "best"):
    from cnnlab.config import HardwareRequest
    from cnnlab.engine import build_train_step, new_model
    from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware
    from cnnlab.optim import KerasAdam
    hw = resolve_hardware(HardwareRequest(device="cpu"))
    keep_freed_memory_for_reuse()  # as cnnlab's runner does before training on the CPU
    m = new_model(load_spec(name), 0, hw).train(); opt = KerasAdam(m.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    cnnlab_step = build_train_step(m, opt, hw, images, labels, BATCH)
    index = torch.arange(BATCH)
    step = lambda: cnnlab_step(index)
else:
    sys.exit(f"unknown recipe {recipe!r}: plain or cnnlab")
for _ in range(2):
    step()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(nsteps):
        step()
ka = prof.key_averages()
tot = sum(e.self_cpu_time_total for e in ka) / nsteps / 1e3
print(f"{name} [{recipe}] profiled ms/step (sum self CPU): {tot:.1f}")
print(ka.table(sort_by="self_cpu_time_total", row_limit=int(sys.argv[4]) if len(sys.argv) > 4 else 12, max_name_column_width=40))
if len(sys.argv) > 5:
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=30, max_shapes_column_width=70))
