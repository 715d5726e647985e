"""Task 2: eager PyTorch fp32 levers, each interleaved against the plain baseline
in the same process.  Usage: python explore_levers.py MODEL GROUP [rounds per_round]
GROUP: layout | threads | dropout | optim | metrics | combo"""
import sys, contextlib, torch, torch.nn.functional as F
from explore_common import (DROPS, build as build_peer, fake_batch, make_optimizer, time_interleaved, report,
                            train_flops, mm_rates)


BASE_THREADS = 2


def build(name, drop="native", cl=False, mkldnn=True, threads=None, opt_kw=None,
          set_to_none=True, item=True):
    torch.manual_seed(0)
    m = build_peer(name, DROPS[drop])
    if cl:
        m = m.to(memory_format=torch.channels_last)
    opt = make_optimizer(m, **(opt_kw or {}))
    x, y = fake_batch(channels_last=cl)
    acc = {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}

    def step():
        if threads:
            torch.set_num_threads(threads)
        ctx = contextlib.nullcontext() if mkldnn else torch.backends.mkldnn.flags(enabled=False)
        with ctx:
            opt.zero_grad(set_to_none=set_to_none)
            out = m(x)
            loss = F.nll_loss(out, y)
            loss.backward()
            opt.step()
            if item:
                r = loss.item()
                (out.argmax(1) == y).sum().item()
            else:
                with torch.no_grad():
                    acc["loss"] += loss.detach()
                    acc["correct"] += (out.argmax(1) == y).sum()
                r = None
        if threads:
            torch.set_num_threads(BASE_THREADS)
        return r
    return step


GROUPS = {
    "layout": {"plain": {}, "channels_last": {"cl": True}},
    "mkldnn": {"plain": {}, "mkldnn_off": {"mkldnn": False}},
    "threads": {"plain(2thr)": {}, "1thread": {"threads": 1}},
    "dropout": {"plain": {}, "rand_lt": {"drop": "rand_lt"}, "bern_u8": {"drop": "bern_u8"},
                "bytes": {"drop": "bytes"}, "bytes_f": {"drop": "bytes_f"}, "cnnlab": {"drop": "cnnlab"}},
    "optim": {"plain": {}, "foreach": {"opt_kw": {"foreach": True}}, "fused": {"opt_kw": {"fused": True}},
              "zero_grad(set_to_none=False)": {"set_to_none": False}},
    "metrics": {"plain(.item x2)": {}, "on-tensor": {"item": False}},
}

if __name__ == "__main__":
    import os
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        BASE_THREADS = int(os.environ["BENCH_THREADS"])
    if os.environ.get("INTEROP"):
        torch.set_num_interop_threads(int(os.environ["INTEROP"]))
    print("threads", torch.get_num_threads(), "interop", torch.get_num_interop_threads(), "OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "-"))
    name, group = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    per = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    variants = GROUPS.get(group)
    if group == "combo":
        import json
        variants = {"plain": {}, **json.loads(sys.argv[5])}
    print("before:", mm_rates(), flush=True)
    steps = {k: build(name, **kw) for k, kw in variants.items()}
    res = time_interleaved(steps, warmup=2, rounds=rounds, per_round=per)
    report(res, base=next(iter(variants)), flops=train_flops(name), title=f"{name} {group}")
    print("after:", mm_rates())
