"""Keras 3's optimizers, their update rules and defaults exactly, for PyTorch parameters.

Keras and PyTorch disagree on more than defaults. Keras's Adam updates

    w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

with epsilon = 1e-7, while `torch.optim.Adam` adds epsilon to the bias-corrected sqrt(v); Keras's
SGD keeps a velocity `m = momentum * m - lr * g` (PyTorch: `b = momentum * b + g`, lr applied
after), its RMSprop puts epsilon inside the square root, and its weight decay is decoupled
(`w -= w * weight_decay * lr`, before the update) on every optimizer. So cnnlab brings its own:
`KerasAdam`, `KerasAdamW`, `KerasSGD` and `KerasRMSprop`, made from a recipe by `make_optimizer`.

Keras 2.2.4 (the notebook's, `keras_numerics = 2`; checked against formulas from its
keras/optimizers.py, as it cannot be installed here) has the same Adam (epsilon = K.epsilon() =
1e-7 outside the root; it computes the bias correction in float32, cnnlab in float64 in both modes)
and SGD; its RMSprop puts epsilon outside the square root (`KerasRMSprop(numerics=2)`) and has no
momentum; it has no AdamW and no weight decay (`config.Recipe` refuses those with numerics 2).

Shared by all of them:

- The updates use PyTorch's multi-tensor (`_foreach`) kernels: one launch per operation for all
  parameters. Adam on the CPU uses PyTorch's fused kernel instead (one vectorised pass, Keras's
  epsilon scaled to where it adds it): the same rule, rounded differently.
- The learning rate lives in one 0-d float64 tensor on the parameters' device,
  `optimizer.learning_rate`, shared by every param group and read by every step:
  `set_learning_rate` changes it in place (no host sync), so a compiled step or a captured CUDA
  graph sees the new value on its next replay. Keras keeps it in a float32 variable; float64
  kept cnnlab 0.1's Adam arithmetic (a Python float learning rate) bit for bit.
- The state (step count, moments) is made eagerly, on the parameters' device, at fixed
  addresses: a compiled step updates it in place and CUDA graphs can replay the update (as
  torch.optim does when compiled; `mark_static_addresses` tells torch.compile so).
  `load_state_dict` copies into those same tensors.
- Nothing here imports `torch._dynamo` (about a second of start-up, BENCHMARKS.md "From command
  to table on the CPU"): torch.optim.Optimizer's own methods are called without their
  don't-compile wrapper, since cnnlab calls them outside compiled code only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cnnlab.config import Recipe

__all__ = [
    "KerasAdam",
    "KerasAdamW",
    "KerasOptimizer",
    "KerasRMSprop",
    "KerasSGD",
    "learning_rate",
    "make_optimizer",
    "mark_static_addresses",
    "set_learning_rate",
]


def _unwrapped(method: Any) -> Any:
    """torch.optim.Optimizer's own `method` without its don't-compile wrapper, whose first call
    imports torch._dynamo; for calls made outside compiled code."""
    return getattr(method, "__wrapped__", method)


def mark_static_addresses(optimizer: KerasOptimizer) -> None:
    """Tell torch.compile that the learning rate and the state keep their addresses from step to
    step (they are made eagerly and updated in place), so that a compiled step with CUDA graphs
    reads them where they are instead of copying them in. For compiled steps only: it imports
    torch._dynamo."""
    import torch._dynamo

    torch._dynamo.mark_static_address(optimizer.learning_rate)
    for state in optimizer.state.values():
        for tensor in state.values():
            torch._dynamo.mark_static_address(tensor)


class KerasOptimizer(torch.optim.Optimizer):
    """What Keras's optimizers share: one learning rate for all parameters (a device tensor),
    decoupled weight decay, a step count, and state made eagerly at fixed addresses.

    Subclasses name their per-parameter moments in `MOMENTS` and write `_update`.
    """

    MOMENTS: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        if not defaults["lr"] > 0:
            raise ValueError(f"{type(self).__name__} needs lr > 0, got {defaults['lr']!r}")
        if not defaults["weight_decay"] >= 0:
            raise ValueError(f"{type(self).__name__} needs weight_decay >= 0, got {defaults['weight_decay']!r}")
        self.learning_rate: torch.Tensor | None = None  # made with the first param group, on its device
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102 - torch.optim.Optimizer's
        if "lr" in param_group:
            raise ValueError("Keras's optimizers have one learning rate: give it to the optimizer, not to a group")
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)
        group = self.param_groups[-1]
        if self.learning_rate is None:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            self.learning_rate = torch.tensor(float(self.defaults["lr"]), dtype=torch.float64, device=device)
        group["lr"] = self.learning_rate
        for p in group["params"]:
            self._init_state(p)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles keep the shared learning rate
        return {**super().__getstate__(), "learning_rate": self.learning_rate, "MOMENTS": self.MOMENTS}

    def _init_state(self, p: torch.Tensor) -> None:
        """Moments and step count, made eagerly: a compiled step then updates them in place, and
        their fixed addresses let CUDA graphs replay the update (as torch.optim does when compiled)."""
        state = self.state[p]
        # The step count is a tensor on the parameter's device: no host sync on a GPU, and
        # torch.compile sees one graph for every step.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in self.MOMENTS:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - torch.optim.Optimizer's
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1.0)
            lr = group["lr"]
            if group["weight_decay"]:
                # Keras (base_optimizer.apply): w -= w * weight_decay * lr on every trainable
                # variable, before the update, with the step's learning rate; written
                # w *= 1 - weight_decay * lr as its torch backend does (TorchOptimizer).
                torch._foreach_mul_(params, 1 - group["weight_decay"] * lr)
            self._update(group, params, grads, states, steps[0], lr)
        return loss

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        t: torch.Tensor,
        lr: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:  # noqa: D102 - torch.optim.Optimizer's
        state = _unwrapped(torch.optim.Optimizer.state_dict)(self)
        # The learning rate as a number (one host sync): a checkpoint holds no device tensor of
        # the optimizer's own, and a later `set_learning_rate` does not change a saved dict.
        lr = learning_rate(self)
        state["param_groups"] = [{**group, "lr": lr} for group in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()` (this optimizer's or cnnlab 0.1's KerasAdam's): the hyperparameters
        and learning rate it holds, and its state copied into this optimizer's own tensors, whose
        addresses, device and dtype stay what compiled steps and CUDA graphs were made with.
        Nothing changes unless the whole dict fits (ValueError otherwise)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        name = type(self).__name__
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"loaded state dict's parameter groups do not match {name}'s")
        for saved, group in zip(saved_groups, self.param_groups):
            # Keys a saved group lacks (weight_decay in cnnlab 0.1's checkpoints) keep their values.
            unknown = set(saved) - set(group) - {"param_names"}
            if unknown:
                raise ValueError(f"loaded state dict is not {name}'s: its groups have {sorted(unknown)}")
        pairs = list(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for key, p in pairs:
            saved, ours = saved_state.get(key, {}), self.state[p]
            if set(saved) != set(ours):
                raise ValueError(
                    f"loaded state dict is not {name}'s: a parameter's state has {sorted(saved)}, not {sorted(ours)}"
                )
            for item, value in saved.items():
                if tuple(value.shape) != tuple(ours[item].shape):
                    raise ValueError(
                        f"loaded state {item!r} has shape {tuple(value.shape)}, not {tuple(ours[item].shape)}"
                    )
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names", "lr")})
        for key, p in pairs:
            for item, value in saved_state[key].items():
                self.state[p][item].copy_(value)
        set_learning_rate(self, float(saved_groups[0]["lr"]))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class KerasAdam(KerasOptimizer):
    """Adam with Keras's defaults (lr 1e-3, betas 0.9/0.999, epsilon 1e-7) and Keras's update rule;
    `weight_decay` > 0 adds Keras's decoupled weight decay (as AdamW)."""

    MOMENTS = ("m", "v")

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float = 0.0,
        fused_on_cpu: bool = True,
    ) -> None:
        """`fused_on_cpu` False keeps the `_foreach` update on the CPU too (benchmarks compare them)."""
        if lr <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1 or epsilon <= 0:
            raise ValueError("KerasAdam needs lr > 0, betas in [0, 1) and epsilon > 0")
        defaults = dict(lr=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=weight_decay)
        self.fused_on_cpu = fused_on_cpu
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "fused_on_cpu": self.fused_on_cpu}

    def _update(self, group, params, grads, states, t, lr):
        ms = [state["m"] for state in states]
        vs = [state["v"] for state in states]
        if self.fused_on_cpu and t.device.type == "cpu" and not torch.compiler.is_compiling():
            # PyTorch's fused CPU Adam: one vectorised pass instead of nine over all the weights
            # (BENCHMARKS.md, "CPU kind 2"). Its epsilon is added after the bias correction, so
            # Keras's, added before it, is scaled to match: eps / sqrt(1 - beta_2^t).
            epsilon = group["epsilon"] / math.sqrt(1 - group["beta_2"] ** t.item())
            torch._fused_adam_(params, grads, ms, vs, [], [t] * len(params), lr=lr, beta1=group["beta_1"],
                               beta2=group["beta_2"], weight_decay=0.0, eps=epsilon, amsgrad=False, maximize=False)  # fmt: skip
            return
        t = t.double()  # float64 for the bias corrections: exact for any step count
        beta_1, beta_2 = group["beta_1"], group["beta_2"]
        alpha = lr * torch.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        torch._foreach_lerp_(ms, grads, 1 - beta_1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(vs, beta_2)  # v = b2 v + (1 - b2) g^2
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta_2)
        denominators = torch._foreach_sqrt(vs)
        torch._foreach_add_(denominators, group["epsilon"])
        updates = torch._foreach_div(ms, denominators)
        torch._foreach_mul_(updates, -alpha)
        torch._foreach_add_(params, updates)


class KerasAdamW(KerasAdam):
    """Keras's AdamW: Adam after `w -= w * weight_decay * lr` (weight_decay 0.004 by default)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float = 0.004,
    ) -> None:
        super().__init__(params, lr, beta_1, beta_2, epsilon, weight_decay)


class KerasSGD(KerasOptimizer):
    """Keras's SGD (lr 0.01 by default). With momentum it keeps a velocity `m = momentum * m - lr * g`
    and adds it (`w += m`), or with `nesterov` adds `momentum * m - lr * g`."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0 <= momentum <= 1:
            raise ValueError(f"KerasSGD needs momentum in [0, 1], got {momentum!r}")
        self.MOMENTS = ("momentum",) if momentum != 0 else ()  # Keras makes them only with momentum
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _update(self, group, params, grads, states, t, lr):
        scaled = torch._foreach_mul(grads, lr)  # lr * g
        if not self.MOMENTS:
            torch._foreach_sub_(params, scaled)
            return
        momentum = group["momentum"]
        ms = [state["momentum"] for state in states]
        torch._foreach_mul_(ms, momentum)  # m = momentum * m - lr * g
        torch._foreach_sub_(ms, scaled)
        if group["nesterov"]:
            torch._foreach_sub_(params, scaled)  # w += momentum * m - lr * g
            torch._foreach_add_(params, ms, alpha=momentum)
        else:
            torch._foreach_add_(params, ms)  # w += m


class KerasRMSprop(KerasOptimizer):
    """Keras's RMSprop (uncentered; lr 1e-3, rho 0.9, epsilon 1e-7): v = rho v + (1 - rho) g^2,
    increment = lr g / sqrt(v + epsilon) (epsilon inside the root, unlike PyTorch); with momentum,
    b = momentum b + increment and w -= b, else w -= increment.

    `numerics` 2 is Keras 2.2.4's (keras/optimizers.py): increment = lr g / (sqrt(v) + epsilon),
    epsilon outside the root, and no momentum."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        weight_decay: float = 0.0,
        numerics: int = 3,
    ) -> None:
        if not 0 <= rho < 1 or not 0 <= momentum < 1 or epsilon <= 0:
            raise ValueError("KerasRMSprop needs rho and momentum in [0, 1) and epsilon > 0")
        if numerics not in (2, 3) or (numerics == 2 and momentum > 0):
            raise ValueError(f"KerasRMSprop needs numerics 2 (without momentum) or 3, got {numerics!r}")
        self.numerics = numerics  # an attribute, not a group's setting: a saved state dict does not change it
        self.MOMENTS = ("velocity", "momentum") if momentum > 0 else ("velocity",)
        defaults = dict(lr=lr, rho=rho, momentum=momentum, epsilon=epsilon, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _update(self, group, params, grads, states, t, lr):
        rho = group["rho"]
        vs = [state["velocity"] for state in states]
        torch._foreach_mul_(vs, rho)  # v = rho v + (1 - rho) g^2
        torch._foreach_addcmul_(vs, grads, grads, value=1 - rho)
        if self.numerics == 3:
            denominators = torch._foreach_add(vs, group["epsilon"])  # Keras 3: sqrt(v + epsilon)
            torch._foreach_sqrt_(denominators)
        else:
            denominators = torch._foreach_sqrt(vs)  # Keras 2.2.4: sqrt(v) + epsilon
            torch._foreach_add_(denominators, group["epsilon"])
        increments = torch._foreach_mul(grads, lr)
        torch._foreach_div_(increments, denominators)
        if "momentum" in self.MOMENTS:
            bs = [state["momentum"] for state in states]
            torch._foreach_mul_(bs, group["momentum"])
            torch._foreach_add_(bs, increments)
            torch._foreach_sub_(params, bs)
        else:
            torch._foreach_sub_(params, increments)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles keep the numerics
        return {**super().__getstate__(), "numerics": self.numerics}


def make_optimizer(params: Iterable[torch.nn.Parameter], recipe: Recipe) -> KerasOptimizer:
    """The recipe's optimizer: `recipe.optimizer` with the recipe's learning rate, settings, weight
    decay and Keras numerics (only RMSprop's differ). A schedule is the training loop's: it sets each
    step's rate (`set_learning_rate`)."""
    lr = recipe.learning_rate
    wd = recipe.weight_decay
    if recipe.optimizer == "adam":
        return KerasAdam(params, lr, recipe.beta_1, recipe.beta_2, recipe.epsilon, weight_decay=wd)
    if recipe.optimizer == "adamw":
        return KerasAdamW(params, lr, recipe.beta_1, recipe.beta_2, recipe.epsilon, weight_decay=wd)
    if recipe.optimizer == "sgd":
        return KerasSGD(params, lr, recipe.momentum, recipe.nesterov, weight_decay=wd)
    if recipe.optimizer == "rmsprop":
        return KerasRMSprop(
            params, lr, recipe.rho, recipe.momentum, recipe.epsilon, weight_decay=wd, numerics=recipe.keras_numerics
        )
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def set_learning_rate(optimizer: KerasOptimizer, value: float) -> None:
    """Set the learning rate that every following step uses, in place: no host sync, and a compiled
    step or a captured CUDA graph reads the new value."""
    if not value >= 0:
        raise ValueError(f"a learning rate must be >= 0, got {value!r}")
    optimizer.learning_rate.fill_(value)


def learning_rate(optimizer: KerasOptimizer) -> float:
    """The learning rate the next step uses (waits for the device)."""
    return optimizer.learning_rate.item()
