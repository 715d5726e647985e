"""cnnlab's optimizers follow Keras 3's update rules: Keras's own numbers (fixtures made by
`fixtures/keras_training/make_optim_fixtures.py`), the rules that tell Keras from PyTorch, the shared
learning-rate tensor, eager static state and checkpoints."""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.config import Recipe
from cnnlab.optim import (
    KerasAdam,
    KerasAdamW,
    KerasRMSprop,
    KerasSGD,
    learning_rate,
    make_optimizer,
    mark_static_addresses,
    set_learning_rate,
)
from cnnlab.schedules import learning_rate_at

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "keras_training" / "optimizers.json").read_text())
CASES = {case["name"]: case for case in FIXTURES["cases"]}
RTOL, ATOL = 1e-6, 1e-7  # float32 weights; Keras keeps its learning rate in float32, cnnlab in float64


def keras_run(case, optimizer=None, schedule_offset=0):
    """The fixture case's steps on cnnlab's weights: the weights after each step.

    `optimizer(params)` replaces the recipe's optimizer (tests that must NOT match use it)."""
    recipe = Recipe.from_dict(case["recipe"])
    params = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in FIXTURES["initial"].items()}
    opt = (optimizer or (lambda p: make_optimizer(p, recipe)))(list(params.values()))
    after = []
    for step, grads in enumerate(FIXTURES["gradients"]):
        if recipe.schedule is not None:
            set_learning_rate(opt, learning_rate_at(recipe.schedule, recipe.learning_rate, step + schedule_offset))
        if str(step) in case["set_learning_rate"]:
            new = case["set_learning_rate"][str(step)]
            if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "learning_rate"):
                for group in opt.param_groups:
                    group["lr"] = new
            else:
                set_learning_rate(opt, new)
        for name, p in params.items():
            p.grad = torch.tensor(grads[name])
        opt.step()
        after.append({name: p.detach().clone() for name, p in params.items()})
    return after


def worst(after, case):
    """max |ours - keras| / (ATOL + RTOL |keras|) over every weight and step: <= 1 matches."""
    return max(
        ((ours[name] - torch.tensor(keras[name])).abs() / (ATOL + RTOL * torch.tensor(keras[name]).abs())).max().item()
        for ours, keras in zip(after, case["after"])
        for name in ours
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_keras(name):
    case = CASES[name]
    for step, (ours, keras) in enumerate(zip(keras_run(case), case["after"])):
        for weight in ours:
            expected = torch.tensor(keras[weight])
            torch.testing.assert_close(ours[weight], expected, rtol=RTOL, atol=ATOL, msg=f"{name} step {step} {weight}")


class DecayAfterTheUpdate(KerasAdam):
    """Keras's AdamW with the weight decay moved after the Adam update (the wrong order)."""

    def __init__(self, params, lr, weight_decay):
        super().__init__(params, lr)
        self.decay = weight_decay

    def _update(self, group, params, grads, states, t, lr):
        super()._update(group, params, grads, states, t, lr)
        torch._foreach_mul_(params, 1 - self.decay * lr)


# Other rules, each differing from Keras's in one point, that the fixtures must tell apart.
OTHER_RULES = {
    "torch SGD momentum (lr applied after the velocity)": (
        "sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "torch SGD nesterov": ("sgd_nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "torch RMSprop (epsilon outside the root)": ("rmsprop_default", lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, eps=1e-7)),
    "torch RMSprop with momentum": (
        "rmsprop_momentum", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-7, momentum=0.5)),
    "torch Adam (epsilon after the bias correction)": ("adam_default", lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-7)),
    "torch AdamW": ("adamw_weight_decay", lambda p: torch.optim.AdamW(p, lr=0.005, eps=1e-7, weight_decay=0.1)),
    "AdamW without weight decay": ("adamw_weight_decay", lambda p: KerasAdam(p, lr=0.005)),
    "AdamW decaying after the update": ("adamw_weight_decay", lambda p: DecayAfterTheUpdate(p, 0.005, 0.1)),
    "Adam without its weight decay": ("adam_weight_decay", lambda p: KerasAdam(p, lr=0.005)),
    "SGD without its weight decay": ("sgd_weight_decay", lambda p: KerasSGD(p, lr=0.1, momentum=0.5)),
    "RMSprop without its weight decay": ("rmsprop_weight_decay", lambda p: KerasRMSprop(p, lr=0.01)),
    "SGD momentum without nesterov": ("sgd_nesterov", lambda p: KerasSGD(p, lr=0.05, momentum=0.9)),
}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(OTHER_RULES))
def test_fixtures_tell_other_rules_apart(rule):
    """Each fixture case would catch the mistake it is there for: a rule that differs from Keras's
    in one point is off by more than the tolerance (so the test above can fail for that reason)."""
    name, optimizer = OTHER_RULES[rule]
    assert worst(keras_run(CASES[name], optimizer), CASES[name]) > 10


@pytest.mark.parametrize("name", ["sgd_exponential", "adamw_cosine_warmup", "rmsprop_piecewise"])
def test_schedule_is_evaluated_before_the_update(name):
    """Keras evaluates a schedule at `optimizer.iterations`, the updates already applied: one step
    later is off."""
    assert worst(keras_run(CASES[name]), CASES[name]) <= 1
    assert worst(keras_run(CASES[name], schedule_offset=1), CASES[name]) > 10


def test_matches_keras_formula_including_epsilon_placement():
    """Keras's Adam on one float64 weight, written out by hand; torch.optim.Adam differs."""
    grads = [1e-6, -2e-6, 3e-7, 0.5, -0.25]  # tiny gradients make epsilon matter
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7
    w, m, v, expected = 0.0, 0.0, 0.0, []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (math.sqrt(v) + eps)
        expected.append(w)

    def run(optimizer_cls, **kwargs):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt, out = optimizer_cls([w], **kwargs), []
        for g in grads:
            w.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
            out.append(w.item())
        return out

    for a, b in zip(run(KerasAdam), expected):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    torch_adam = run(torch.optim.Adam, lr=1e-3, eps=1e-7)
    assert not math.isclose(torch_adam[0], expected[0], rel_tol=1e-3)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_cpu_adam_takes_the_foreach_steps_within_rounding(weight_decay):
    """On the CPU Adam runs PyTorch's fused kernel with Keras's epsilon rescaled; the `_foreach`
    update (CUDA, compiled steps) is the formula as Keras writes it. Tiny gradients make epsilon's
    placement matter. In float64, so that rounding does not hide a wrong formula."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=generator, dtype=torch.float64)
    grads = [
        torch.randn(1000, generator=generator, dtype=torch.float64)
        * 10.0 ** -torch.randint(0, 9, (1000,), generator=generator)
        for _ in range(20)
    ]

    def weights(fused_on_cpu: bool, epsilon: float = 1e-7) -> torch.Tensor:
        w = start.clone().requires_grad_()
        opt = KerasAdam([w], lr=1e-3, epsilon=epsilon, weight_decay=weight_decay, fused_on_cpu=fused_on_cpu)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach()

    foreach, fused = weights(False), weights(True)
    torch.testing.assert_close(fused - start, foreach - start, rtol=1e-9, atol=1e-15)
    misplaced = weights(False, epsilon=1e-7 / math.sqrt(1 - 0.999**20))  # epsilon scaled at the last step only
    assert not torch.allclose(foreach - start, misplaced - start, rtol=1e-3, atol=1e-15)


def test_defaults_are_keras_defaults():
    def hyper(opt):
        return {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr")} | {"lr": learning_rate(opt)}

    p = [torch.zeros(1, requires_grad=True)]
    assert hyper(KerasAdam(p)) == dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0)
    assert hyper(KerasAdamW(p)) == dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.004)
    assert hyper(KerasSGD(p)) == dict(lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0)
    assert hyper(KerasRMSprop(p)) == dict(lr=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7, weight_decay=0.0)


@pytest.mark.parametrize(
    ("recipe", "cls", "expected"),
    [
        (Recipe(), KerasAdam, dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0)),
        (
            Recipe(optimizer="adam", learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.1),
            KerasAdam,
            dict(lr=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.1),
        ),
        (
            Recipe(optimizer="adamw"),
            KerasAdamW,
            dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.004),
        ),
        (
            Recipe(optimizer="sgd", momentum=0.9, nesterov=True),
            KerasSGD,
            dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0),
        ),
        (
            Recipe(optimizer="rmsprop", rho=0.8, momentum=0.5, epsilon=1e-6, weight_decay=0.01),
            KerasRMSprop,
            dict(lr=1e-3, rho=0.8, momentum=0.5, epsilon=1e-6, weight_decay=0.01),
        ),
    ],
)
def test_make_optimizer_reads_the_recipe(recipe, cls, expected):
    opt = make_optimizer([torch.zeros(2, requires_grad=True)], recipe)
    assert type(opt) is cls
    got = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr")} | {"lr": learning_rate(opt)}
    assert got == expected


def all_optimizers(params):
    """One of each, with every state they can have (momentum, weight decay), on `params[i]` (a
    list of tensors or of param groups) each."""
    return [
        KerasAdam(params[0]),
        KerasAdamW(params[1], lr=0.01),
        KerasSGD(params[2], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        KerasSGD(params[3], lr=0.1),
        KerasRMSprop(params[4], lr=0.01, momentum=0.5, weight_decay=0.01),
    ]


def new_params(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(3, 2, generator=g).requires_grad_(), torch.randn(2, generator=g).requires_grad_()]
        for _ in range(n)
    ]


def step_with(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


@pytest.mark.parametrize("index", range(5))
def test_learning_rate_is_one_float64_tensor_read_by_every_step(index):
    """`optimizer.learning_rate`: 0-d float64, on the parameters' device, shared by every group;
    `set_learning_rate` changes it in place, and the next step uses the new value."""
    opt = all_optimizers([[{"params": ps[:1]}, {"params": ps[1:]}] for ps in new_params()])[index]
    params = [p for group in opt.param_groups for p in group["params"]]
    lr = opt.learning_rate
    assert lr.dtype == torch.float64 and lr.dim() == 0 and lr.device == params[0].device
    assert all(group["lr"] is lr for group in opt.param_groups)
    address = lr.data_ptr()
    set_learning_rate(opt, 0.25)
    assert lr.data_ptr() == address and learning_rate(opt) == 0.25

    # The same steps at two learning rates: the second step differs only if the change is read.
    first, second = [copy.deepcopy(opt) for _ in range(2)]
    assert all(group["lr"] is first.learning_rate for group in first.param_groups)  # copies keep it shared
    for o in (first, second):
        step_with(o, [p for g in o.param_groups for p in g["params"]], seed=1)
    set_learning_rate(second, 0.5)
    for o in (first, second):
        step_with(o, [p for g in o.param_groups for p in g["params"]], seed=2)
    w1 = [p for g in first.param_groups for p in g["params"]]
    w2 = [p for g in second.param_groups for p in g["params"]]
    assert not any(torch.equal(a, b) for a, b in zip(w1, w2))


def test_set_learning_rate_takes_effect_on_the_next_step_exactly():
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = KerasSGD([w], lr=0.1)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    assert w.item() == 1.0 - 0.1 * 2.0
    set_learning_rate(opt, 0.03)
    opt.step()
    assert w.item() == 1.0 - 0.1 * 2.0 - 0.03 * 2.0
    with pytest.raises(ValueError):
        set_learning_rate(opt, -1.0)


def test_one_learning_rate_for_all_groups():
    with pytest.raises(ValueError, match="one learning rate"):
        KerasSGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}])


@pytest.mark.parametrize("index", range(5))
def test_state_is_made_eagerly_and_marked_static_for_compiling(index):
    """Every state tensor exists before the first step (Keras's: moments only with momentum);
    `mark_static_addresses` marks them and the learning rate for torch.compile."""
    opt = all_optimizers(new_params())[index]
    params = [p for group in opt.param_groups for p in group["params"]]
    expected = [{"m", "v"}, {"m", "v"}, {"momentum"}, set(), {"velocity", "momentum"}][index]
    assert set(opt.state) == set(params)
    tensors = [opt.learning_rate] + [tensor for p in params for tensor in opt.state[p].values()]
    for p in params:
        assert set(opt.state[p]) == {"step"} | expected
        assert all(tensor.device == p.device for tensor in opt.state[p].values())
    assert all(getattr(tensor, "_dynamo_static_input_type", None) is None for tensor in tensors)
    mark_static_addresses(opt)
    assert all(getattr(tensor, "_dynamo_static_input_type", None) == "unguarded" for tensor in tensors)


def test_eager_use_does_not_import_dynamo():
    """Making, stepping, zeroing, saving and loading an optimizer leave torch._dynamo unimported
    (importing it costs about a second of every command's start-up). In a fresh interpreter."""
    script = """
import sys, torch
from cnnlab.optim import KerasAdam, KerasSGD
for make in (KerasAdam, lambda p: KerasSGD(p, momentum=0.9)):
    w = torch.zeros(3, requires_grad=True)
    opt = make([w])
    w.sum().backward()
    opt.step()
    opt.zero_grad()
    again = make([torch.zeros(3, requires_grad=True)])
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["state"][0]["step"] == 1
print("torch._dynamo" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_state_dict_round_trip_continues_identically():
    """Saved after two steps (through torch.save, weights only, as checkpoints are), loaded into
    fresh optimizers: the next steps are bit for bit those of the optimizers that went on."""
    params = new_params(seed=0)
    opts = all_optimizers(params)
    for opt, ps in zip(opts, params):
        set_learning_rate(opt, 0.02)
        step_with(opt, ps, seed=1)
        step_with(opt, ps, seed=2)
    saved = []
    for opt in opts:
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved.append(torch.load(buffer, weights_only=True))
    clones = [[p.detach().clone().requires_grad_() for p in ps] for ps in params]
    fresh = all_optimizers(clones)
    addresses = [[t.data_ptr() for s in o.state.values() for t in s.values()] for o in fresh]
    for opt, state in zip(fresh, saved):
        opt.load_state_dict(state)
    for opt, before in zip(fresh, addresses):
        assert [t.data_ptr() for s in opt.state.values() for t in s.values()] == before  # copied in place
        assert learning_rate(opt) == 0.02 and all(g["lr"] is opt.learning_rate for g in opt.param_groups)
    for a, b, pa, pb in zip(opts, fresh, params, clones):
        for seed in (3, 4):
            step_with(a, pa, seed)
            step_with(b, pb, seed)
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        assert all(
            torch.equal(x, y)
            for s, t in zip(a.state.values(), b.state.values())
            for x, y in zip(s.values(), t.values())
        )


def test_state_dict_holds_the_learning_rate_as_a_number():
    opt = KerasSGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    state = opt.state_dict()
    set_learning_rate(opt, 0.5)
    assert state["param_groups"][0]["lr"] == 0.1  # a later change does not reach a saved dict


def test_load_state_dict_refuses_another_optimizers_state_and_changes_nothing():
    params = [torch.zeros(3, requires_grad=True)]
    sgd = KerasSGD(params, lr=0.1, momentum=0.9)
    adam = KerasAdam([torch.zeros(3, requires_grad=True)], lr=0.5)
    plain = KerasSGD([torch.zeros(3, requires_grad=True)], lr=0.5)  # no momentum: no velocity state
    for target in (adam, plain):
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError):
            target.load_state_dict(sgd.state_dict())
        assert target.state_dict()["param_groups"] == before["param_groups"]
    with pytest.raises(ValueError):
        KerasAdam([torch.zeros(4, requires_grad=True)]).load_state_dict(
            KerasAdam([torch.zeros(3, requires_grad=True)]).state_dict()
        )


def test_loads_cnnlab_0_1_checkpoints():
    """0.1's KerasAdam saved a float lr and no weight_decay: it loads, the decay stays none."""
    path = Path(__file__).parent / "fixtures" / "v0_1" / "interrupted" / "tiny_b" / "seed-1" / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)["optimizer"]
    params = [torch.zeros(s["m"].shape, requires_grad=True) for _, s in sorted(saved["state"].items())]
    opt = KerasAdam(params)
    opt.load_state_dict(saved)
    assert learning_rate(opt) == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.0
    for p, (_, s) in zip(params, sorted(saved["state"].items())):
        assert all(torch.equal(opt.state[p][k], s[k]) for k in ("step", "m", "v"))


def test_compiled_step_reads_the_changed_learning_rate_without_recompiling():
    """torch.compile of `step` (as the engine does): one graph for every step, whatever the
    learning rate, and the same weights as the eager step."""
    compiled_graphs = []

    def backend(gm, example_inputs):  # no inductor: the graph runs eagerly, cheap to make
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eager_params = new_params(seed=0, n=1)[0]
    compiled_params = [p.detach().clone().requires_grad_() for p in eager_params]
    eager = KerasSGD(eager_params, lr=0.1, momentum=0.9, weight_decay=0.01)
    compiled = KerasSGD(compiled_params, lr=0.1, momentum=0.9, weight_decay=0.01)
    step = torch.compile(compiled.step, backend=backend, dynamic=False)
    for seed, lr in enumerate((0.1, 0.05, 0.2)):
        for opt in (eager, compiled):
            set_learning_rate(opt, lr)
        step_with(eager, eager_params, seed)
        g = torch.Generator().manual_seed(seed)
        for p in compiled_params:
            p.grad = torch.randn(p.shape, generator=g)
        step()
        assert all(torch.equal(a, b) for a, b in zip(eager_params, compiled_params))
    assert len(compiled_graphs) == 1
    torch._dynamo.reset()
