"""KerasAdam follows Keras's update rule, epsilon placement included."""

from __future__ import annotations

import copy
import math

import torch

from cnnlab.optim import KerasAdam


def keras_adam_reference(grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """Keras's Adam on one scalar weight starting at 0, written out by hand."""
    w, m, v = 0.0, 0.0, 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w -= alpha * m / (math.sqrt(v) + eps)
        out.append(w)
    return out


def run(optimizer_cls, grads, **kwargs):
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optimizer_cls([w], **kwargs)
    out = []
    for g in grads:
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        out.append(w.item())
    return out


def test_matches_keras_formula_including_epsilon_placement():
    grads = [1e-6, -2e-6, 3e-7, 0.5, -0.25]  # tiny gradients make epsilon matter
    ours = run(KerasAdam, grads)
    expected = keras_adam_reference(grads)
    for a, b in zip(ours, expected):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    # torch.optim.Adam with the same epsilon differs: it adds epsilon after bias correction.
    torch_adam = run(torch.optim.Adam, grads, lr=1e-3, eps=1e-7)
    assert not math.isclose(torch_adam[0], expected[0], rel_tol=1e-3)


def test_defaults_are_keras_defaults():
    opt = KerasAdam([torch.zeros(1, requires_grad=True)])
    group = opt.param_groups[0]
    assert (group["lr"], group["beta_1"], group["beta_2"], group["epsilon"]) == (1e-3, 0.9, 0.999, 1e-7)


def test_state_dict_round_trip_continues_identically():
    grads = [0.1, -0.2, 0.3, 0.05]
    w1 = torch.zeros(2, requires_grad=True)
    opt1 = KerasAdam([w1])
    for g in grads[:2]:
        w1.grad = torch.full((2,), g)
        opt1.step()
    w2 = w1.detach().clone().requires_grad_(True)
    opt2 = KerasAdam([w2])
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as if saved to disk and loaded
    for g in grads[2:]:
        for w, opt in ((w1, opt1), (w2, opt2)):
            w.grad = torch.full((2,), g)
            opt.step()
    assert torch.equal(w1, w2)
