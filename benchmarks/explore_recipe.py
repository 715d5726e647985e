"""The winning eager recipe as a step builder (used by explore_profile.py 'best')."""
import torch, torch.nn.functional as F
from explore_common import MODELS, DROPS, fake_batch, make_adam

CHANNELS_LAST = {"convnet3": False, "convnet5": False, "convnet7": True}


def build(name, compile_=False, cl=None):
    cl = CHANNELS_LAST[name] if cl is None else cl
    torch.manual_seed(0)
    m = MODELS[name](DROPS["bytes_f"]).train()
    if cl:
        m = m.to(memory_format=torch.channels_last)
    opt = make_adam(m, fused=True)
    x, y = fake_batch(channels_last=cl)
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        out = m(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            loss_sum.add_(loss.detach())
            correct.add_((out.argmax(1) == y).sum())
        return loss
    return step
