"""Optimizers on stacked tensors: SGD and Adam for the K members of a batched run at once.

Each update takes all trained tensors at once and steps them with ``torch._foreach_*`` ops: the
same kernels, in the same order, as one op per tensor, with a fraction of the per-op Python
overhead that dominates the small networks' steps.

Why not torch.optim: its hyperparameters are one number per parameter group, while a stacked
(K, ...) tensor holds K members with K learning rates, momenta and weight decays along dim 0. A
group per member would need each member's slice as a parameter of its own, but slices of the
stacked tensor are not leaf tensors, and K separate tensors would undo the one vectorised step.
So the two update rules the members may use (SGD with momentum and weight decay, and Adam) are
written here with per-member tensors of hyperparameters (tests/anrat/test_batched.py checks each
member against the single-model Trainer, which steps torch.optim's), and any other optimizer is
refused by :func:`anrat.members.unsupported_option`, the one check RunConfig and the BatchedTrainer share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anrat.errors import InputError
from anrat.trainer import lambda_learning_rate, lr_factor

if TYPE_CHECKING:
    from anrat.members import Member

_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the Trainer uses them


class StackedSGD:
    """``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov) on (K, ...) tensors
    with per-member hyperparameters: ``d = g + wd p; buf = momentum buf + d; p -= lr buf``."""

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)}

    def update(
        self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], hps: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The stepped parameters and states (new tensors; the caller commits them member by member)."""
        d = torch._foreach_add(grads, torch._foreach_mul([hp["weight_decay"] for hp in hps], params))
        bufs = torch._foreach_add(
            torch._foreach_mul([hp["momentum"] for hp in hps], [s["momentum_buffer"] for s in states]), d
        )
        lrs = [hp["lr"].to(p.dtype) for hp, p in zip(hps, params)]
        new = torch._foreach_sub(params, torch._foreach_mul(lrs, bufs))
        return new, [{"momentum_buffer": b} for b in bufs]


class StackedAdam:
    """``torch.optim.Adam`` (default betas and eps, L2 weight decay) on (K, ...) tensors:
    ``m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)`` at step n of the member."""

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        steps = torch.zeros((param.shape[0],) + (1,) * (param.dim() - 1), dtype=torch.float64, device=param.device)
        return {"step": steps, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def update(
        self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], hps: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The stepped parameters and states (new tensors; the caller commits them member by member)."""
        b1, b2 = _ADAM_BETAS
        g = torch._foreach_add(grads, torch._foreach_mul([hp["weight_decay"] for hp in hps], params))
        steps = torch._foreach_add([s["step"] for s in states], 1)
        m = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - b1)
        v = torch._foreach_add(
            torch._foreach_mul([s["exp_avg_sq"] for s in states], b2),
            torch._foreach_mul(torch._foreach_mul(g, g), 1 - b2),
        )
        # 1 - b^n as (-b^n) + 1: the same float
        bias1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(b1, steps)), 1)
        bias2 = torch._foreach_sqrt(torch._foreach_add(torch._foreach_neg(torch._foreach_pow(b2, steps)), 1))
        step_size = [s.to(p.dtype) for s, p in zip(torch._foreach_div([hp["lr"] for hp in hps], bias1), params)]
        denom = torch._foreach_add(
            torch._foreach_div(torch._foreach_sqrt(v), [b.to(p.dtype) for b, p in zip(bias2, params)]), _ADAM_EPS
        )
        new = torch._foreach_sub(params, torch._foreach_mul(step_size, torch._foreach_div(m, denom)))
        return new, [{"step": n, "exp_avg": a, "exp_avg_sq": q} for n, a, q in zip(steps, m, v)]


OPTIMIZER_CLASSES = {"sgd": StackedSGD, "adam": StackedAdam}


def _per_member(values: Sequence[float], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A (K, 1, ..., 1) tensor of per-member values that broadcasts against ``like`` (K, ...)."""
    t = torch.tensor(list(values), dtype=dtype or like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def member_hyperparameters(
    members: Sequence[Member], trained: dict[str, Tensor], layers: set[str], epoch: int
) -> dict[str, dict[str, Tensor]]:
    """Per trained (K, ...) tensor, the members' lr, momentum and weight decay in ``epoch`` as the
    single-model Trainer's parameter groups give them: the learning rate decayed by
    :func:`anrat.trainer.lr_factor`, L2 on the weights of the layers ``train.l2`` names (one of
    ``layers``), and for lambda's theta (``"__theta__"``) ``lambda_lr`` and no decay."""
    for k, m in enumerate(members):
        unknown = sorted(set(m.train.l2) - layers)
        if unknown:
            raise InputError(f"member {k}: L2 prior names unknown layers {unknown}")
    hp = {}
    for name, p in trained.items():
        theta = name == "__theta__"
        layer, _, leaf = name.rpartition(".")
        lrs = [
            lambda_learning_rate(m.train, m.schedule) if theta else m.train.lr * lr_factor(m.train, epoch)
            for m in members
        ]
        decay = [0.0 if theta or leaf != "weight" else m.train.l2.get(layer, 0.0) for m in members]
        hp[name] = {
            "lr": _per_member(lrs, p, torch.float64),
            "weight_decay": _per_member(decay, p),
            "momentum": _per_member([m.train.momentum for m in members], p),
        }
    return hp


__all__ = ["OPTIMIZER_CLASSES", "StackedAdam", "StackedSGD", "member_hyperparameters"]
