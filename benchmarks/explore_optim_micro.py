"""Adam.step() alone (grads already populated), default vs foreach vs fused, per model."""
import time, statistics, torch
from explore_common import MODELS, make_adam
print("threads", torch.get_num_threads())
for name, cls in MODELS.items():
    opts = {}
    for kind, kw in {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items():
        torch.manual_seed(0); m = cls()
        for p in m.parameters(): p.grad = torch.randn_like(p)
        opts[kind] = make_adam(m, **kw)
    t = {k: [] for k in opts}
    for o in opts.values(): o.step(); o.step()
    for _ in range(7):
        for k, o in opts.items():
            t0 = time.perf_counter(); o.step(); t[k].append((time.perf_counter() - t0) * 1e3)
    print(name, "  ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in t.items()), flush=True)
