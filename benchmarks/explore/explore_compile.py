"""torch.compile (inductor, CPU) of the model / of the optimizer step / of the whole
step, timed interleaved against the plain eager step in the same process.
Usage: python explore_compile.py MODEL VARIANT[,VARIANT...] [rounds per_round]
VARIANT: model | model_cl | model_fused | model+opt | maxat | ca (compiled autograd whole step) | best_eager
Set TORCHINDUCTOR_CACHE_DIR to a fresh dir to measure cold compile."""
import os, sys, time, torch, torch.nn.functional as F
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
import torch._inductor.config as ic
for _k in os.environ.get("IND_CFG", "").split(","):  # e.g. IND_CFG=fallback_random,layout_optimization=0
    if _k:
        _n, _, _v = _k.partition("=")
        setattr(ic, _n, bool(int(_v)) if _v else True)
        print("inductor config", _n, getattr(ic, _n))
from explore_common import DROPS, build, fake_batch, make_optimizer, time_interleaved, report, train_flops, mm_rates

name = sys.argv[1]
variants = sys.argv[2].split(",")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
per = int(sys.argv[4]) if len(sys.argv) > 4 else 4
print("torch", torch.__version__, "threads", torch.get_num_threads(), "cache", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"))
print("before:", mm_rates(), flush=True)


def eager(drop="native", cl=False, fused=False):
    torch.manual_seed(0)
    m = build(name, DROPS[drop])
    if cl: m = m.to(memory_format=torch.channels_last)
    opt = make_optimizer(m, fused=fused) if fused else make_optimizer(m)
    x, y = fake_batch(channels_last=cl)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(m(x), y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def compiled(kind):
    torch.manual_seed(0)
    cl = kind == "model_cl"
    m = build(name)
    if cl: m = m.to(memory_format=torch.channels_last)
    x, y = fake_batch(channels_last=cl)
    fused = kind in ("model_fused", "ca")
    opt = make_optimizer(m, fused=True) if fused else make_optimizer(m)
    mode = "max-autotune-no-cudagraphs" if kind == "maxat" else None
    cm = torch.compile(m, mode=mode)
    opt_step = torch.compile(opt.step) if kind == "model+opt" else opt.step

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(cm(x), y)
        loss.backward()
        opt_step()
        return loss.item()

    if kind == "ca":
        # whole step (fwd+loss+bwd) in one compiled fn with compiled autograd
        torch._dynamo.config.compiled_autograd = True

        @torch.compile
        def fwd_bwd(x, y):
            loss = F.nll_loss(m(x), y)
            loss.backward()
            return loss

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fwd_bwd(x, y)
            opt.step()
            return loss.item()

    t0 = time.perf_counter(); step(); t1 = time.perf_counter(); step(); t2 = time.perf_counter()
    print(f"[{kind}] first step (compile) {t1 - t0:.1f}s, second step {t2 - t1:.2f}s", flush=True)
    return step


steps = {"eager plain": eager()}
for v in variants:
    if v == "best_eager":
        steps[v] = eager(drop="bytes_f", fused=True)
    else:
        steps[v] = compiled(v)
res = time_interleaved(steps, warmup=2, rounds=rounds, per_round=per)
report(res, base="eager plain", flops=train_flops(name), title=f"{name} compile")
print("after:", mm_rates())
