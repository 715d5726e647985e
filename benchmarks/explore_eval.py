"""Evaluation throughput under torch.inference_mode: batch 1000 vs 128 (images/s),
and no_grad for reference; metrics accumulated on-tensor."""
import os, time, statistics, torch, torch.nn.functional as F
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from explore_common import MODELS, mm_rates
print("threads", torch.get_num_threads(), mm_rates())
X = torch.rand(2000, 1, 28, 28); Y = torch.randint(0, 10, (2000,))
import sys
for name, cls in [(n, MODELS[n]) for n in (sys.argv[1:] or MODELS)]:
    torch.manual_seed(0); m = cls().eval()

    def run(bs, ctx, n=1000):
        loss = torch.zeros(()); correct = torch.zeros((), dtype=torch.long)
        with ctx():
            for i in range(0, n, bs):
                out = m(X[i:i + bs]); loss += F.cross_entropy(out, Y[i:i + bs], reduction="sum"); correct += (out.argmax(1) == Y[i:i + bs]).sum()
        return loss.item(), correct.item()
    cfg = {"b1000 inference_mode": (1000, torch.inference_mode), "b128 inference_mode": (128, torch.inference_mode),
           "b1000 no_grad": (1000, torch.no_grad)}
    for bs, c in cfg.values(): run(bs, c, 256)
    t = {k: [] for k in cfg}
    for _ in range(2):
        for k, (bs, c) in cfg.items():
            t0 = time.perf_counter(); run(bs, c); t[k].append(1000 / (time.perf_counter() - t0))
    print(name, "  ".join(f"{k}: {statistics.median(v):.0f} img/s" for k, v in t.items()), flush=True)
