"""Adam exactly as Keras computes it.

Keras and PyTorch place Adam's epsilon differently. Keras (all versions) updates

    w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

with epsilon = 1e-7, while `torch.optim.Adam` adds epsilon to the bias-corrected sqrt(v). The two
differ in the first steps and whenever v is tiny, so the notebook's recipe needs this optimizer.
The update uses PyTorch's multi-tensor (`_foreach`) kernels: one pass over all parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class KerasAdam(torch.optim.Optimizer):
    """Adam with Keras's defaults (lr 1e-3, betas 0.9/0.999, epsilon 1e-7) and Keras's update rule."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
    ) -> None:
        if lr <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1 or epsilon <= 0:
            raise ValueError("KerasAdam needs lr > 0, betas in [0, 1) and epsilon > 0")
        super().__init__(params, dict(lr=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon))
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        """Moments and step count, made eagerly: a compiled step then updates them in place, and
        their fixed addresses let CUDA graphs replay the update (as torch.optim does when compiled)."""
        state = self.state[p]
        # The step count is a tensor on the parameter's device: no host sync on a GPU, and
        # torch.compile sees one graph for every step.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for tensor in state.values():
            torch._dynamo.mark_static_address(tensor)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, ms, vs = [p.grad for p in params], [], []
            for p in params:
                state = self.state[p]
                ms.append(state["m"])
                vs.append(state["v"])
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            t = steps[0].double()  # float64 for the bias corrections: exact for any step count
            beta_1, beta_2 = group["beta_1"], group["beta_2"]
            alpha = group["lr"] * torch.sqrt(1 - beta_2**t) / (1 - beta_1**t)
            torch._foreach_lerp_(ms, grads, 1 - beta_1)  # m = b1 m + (1 - b1) g
            torch._foreach_mul_(vs, beta_2)  # v = b2 v + (1 - b2) g^2
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta_2)
            denominators = torch._foreach_sqrt(vs)
            torch._foreach_add_(denominators, group["epsilon"])
            updates = torch._foreach_div(ms, denominators)
            torch._foreach_mul_(updates, -alpha)
            torch._foreach_add_(params, updates)
        return None
