"""torch.profiler of a training step: top ops by self CPU time.
Usage: python explore_profile.py MODEL [recipe]   recipe in {plain, best}"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from explore_common import MODELS, fake_batch, make_adam, plain_step, train_flops, mm_gflops, DROPS

name = sys.argv[1]
recipe = sys.argv[2] if len(sys.argv) > 2 else "plain"
nsteps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.manual_seed(0)
if recipe == "plain":
    m = MODELS[name]().train(); opt = make_adam(m); x, y = fake_batch()
    step = lambda: plain_step(m, opt, x, y)
else:
    import explore_recipe
    step = explore_recipe.build(name, compile_=False)
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
