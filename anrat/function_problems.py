"""Regression problems whose global minimum is known, for the local-minimum experiments.

Each problem is a full training set (:class:`anrat.data.Split`, float32 inputs ``x`` of shape
(N, d) and float32 targets ``y`` of shape (N, 1)) together with the MLP to fit it (``arch``, for
:func:`anrat.models.build_model`) and a set of *reference weights* for that very architecture that
fit the data exactly (mean squared error 0 up to float32 rounding). The global minimum of the
training error over the architecture is therefore known: 0.

Targets are standardised to mean 0 and variance 1 over the training set, so errors are in units
of the target variance on every problem: a mean squared error of 0.01 means R^2 = 0.99. The
standardisation is folded into the reference weights' output layer, so they stay exact.

The error of a model is the mean over samples of the per-sample loss ``(out_i - y_i)^2``
(``anrat.functional.per_sample_loss(kind="lp", p=2)``, one output): the plain MSE.

Problems (each built deterministically from ``seed``):

- ``teacher``: a two-layer ReLU teacher ``f(x) = sum_j relu(w_j . x)`` with ``k = d`` orthonormal
  random rows ``w_j`` and unit output weights, Gaussian inputs; the student has the teacher's
  architecture. This is the setting of Safran & Shamir (ICML 2018, "Spurious local minima are
  common in two-layer ReLU networks"; there the student has fixed unit output weights and no
  biases), where gradient descent from random initialisation ends in a spurious local minimum
  with a probability that grows with k.
- ``wave``: a one-dimensional wave with ``hidden / 2`` periods on [-1, 1],
  ``f(x) = sum_j (-1)^j tanh(beta * (x - c_j))``, fitted by a one-hidden-layer tanh MLP with
  exactly ``hidden`` units: each unit must find its own transition ``c_j``; units that pile up on
  the same transition leave oscillations unfitted (a classic poor minimum).
- ``relu_sum``: Safran & Shamir's exact setting, a sum of k ReLUs of orthonormal rows fitted by a
  student of the same form with its output weights fixed at 1 and no biases: spurious local
  minima are proven to exist there (6 <= k <= 20), so a failure is a local minimum, not a plateau.
- ``parity``: N-bit parity of {0, 1}^N, all 2^N patterns, fitted by a tanh MLP with N hidden
  units, the fewest that can represent it (parity is a classic backpropagation benchmark since
  Rumelhart, Hinton & Williams 1986; with so few units plain MSE training stalls from most seeds
  here). With the bit count ``s``, ``s mod 2 = sum_{k=1}^N (-1)^(k+1) [s >= k]``, and
  ``tanh(G (s - k + 1/2))`` with gain G = 40 is the step ``2 [s >= k] - 1`` to within 2 exp(-40)
  (below float32 resolution), so N hidden units fit the data to rounding error: the global
  minimum is 0 (an infimum, approached as G grows). The data set itself does not depend on the
  seed: the seed only sets the order of the patterns.

The default sizes (``dim=4``, ``hidden=8`` with ``sharpness=2``, ``bits=6`` with tanh units) were
chosen from runs of plain MSE alone (Adam, learning rate 1e-2, 2000 full-batch steps), as sizes at
which MSE succeeds from some initial seeds and stalls from others, so that a comparison of methods
can move either way. The first candidates (a 10-10-1 teacher, a wave with ``sharpness=4``, parity
with ReLU units) stalled under MSE from every one of 10-20 seeds and were made easier; nothing
about NRAE or ANRAT entered the choice.

The success threshold of every problem is a mean squared error of ``SUCCESS_THRESHOLD`` (R^2 >=
0.999 on the training set); see each generator for why that separates the global basin from the
poor minima.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from anrat.data import Split
from anrat.errors import InputError
from anrat.models import build_model

# Mean squared error (in units of the target variance) below which a run counts as a success.
SUCCESS_THRESHOLD = 1e-3


@dataclass
class FunctionProblem:
    """A regression training set, the MLP that must fit it, and weights that fit it exactly.

    Attributes:
        name: the problem's registry name.
        description: one line, for reports.
        train: the whole training set (float32; targets standardised, shape (N, 1)).
        arch: ``{"name": "mlp", "kwargs": {...}}`` for :func:`anrat.models.build_model`.
        threshold: success means a final training MSE below this (units of target variance).
        global_minimum: the known global minimum of the training MSE over ``arch`` (0.0).
        reference_state: a ``state_dict`` of ``arch`` attaining ``global_minimum``.
        seed: the seed the problem was generated from.
        params: the generator's arguments (JSON-able), for reports.
    """

    name: str
    description: str
    train: Split
    arch: dict[str, Any]
    threshold: float
    global_minimum: float
    reference_state: dict[str, Tensor]
    seed: int
    params: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        """A freshly initialised student of the problem's architecture (uses the global RNG)."""
        return build_model(self.arch["name"], **self.arch["kwargs"])

    def reference_model(self) -> nn.Module:
        """The architecture with the reference weights loaded: it attains the global minimum."""
        model = self.build_model()
        model.load_state_dict(self.reference_state)
        return model

    def metadata(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "threshold": self.threshold,
            "global_minimum": self.global_minimum,
            "seed": self.seed,
            "num_samples": len(self.train),
            "params": self.params,
        }


def _check_int(what: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{what} must be an integer from {low} to {high}, got {value!r}")


def _standardise(y: Tensor) -> tuple[Tensor, float, float]:
    """``(y - mean) / std`` over the data set (float64), with the mean and std used."""
    mean, std = float(y.mean()), float(y.std(unbiased=False))
    return (y - mean) / std, mean, std


def _two_layer_problem(
    name: str,
    description: str,
    x: Tensor,
    y: Tensor,
    activation: str,
    weights: tuple[Tensor, Tensor, Tensor, Tensor],
    seed: int,
    params: dict[str, Any],
) -> FunctionProblem:
    """A problem fitted by ``mlp(d, (hidden,), 1, activation)`` with reference weights
    ``weights = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)`` (float64, stored as float32)."""
    w1, b1, w2, b2 = weights
    state = {
        "fc1.weight": w1.float(),
        "fc1.bias": b1.float(),
        "fc2.weight": w2.reshape(1, -1).float(),
        "fc2.bias": b2.reshape(1).float(),
    }
    arch = {
        "name": "mlp",
        "kwargs": {"in_features": x.shape[1], "hidden": [w1.shape[0]], "out_features": 1, "activation": activation},
    }
    return _exact_problem(name, description, x, y, arch, state, seed, params)


def _exact_problem(
    name: str,
    description: str,
    x: Tensor,
    y: Tensor,
    arch: dict[str, Any],
    state: dict[str, Tensor],
    seed: int,
    params: dict[str, Any],
) -> FunctionProblem:
    """A problem whose reference weights ``state`` of ``arch`` fit ``(x, y)`` exactly (float32 data):
    global minimum 0, success below :data:`SUCCESS_THRESHOLD`."""
    return FunctionProblem(
        name=name,
        description=description,
        train=Split(x.float(), y.float()),
        arch=arch,
        threshold=SUCCESS_THRESHOLD,
        global_minimum=0.0,
        reference_state=state,
        seed=seed,
        params=params,
    )


def student_teacher(seed: int = 0, dim: int = 4, num_samples: int = 1000) -> FunctionProblem:
    """Safran & Shamir's teacher: ``y = sum_{j=1}^{dim} relu(w_j . x)``, orthonormal ``w_j``.

    Inputs x ~ N(0, I_dim); the teacher's rows are a random orthonormal basis (QR of a Gaussian
    matrix), no biases, unit output weights; targets are then standardised (folded into the
    output layer of the reference weights). The student is ``mlp(dim, (dim,), 1, "relu")``.
    With ``num_samples`` >> the number of weights (dim^2 + 2 dim + 1) the empirical loss is close
    to the population loss. The poor minima that plain MSE training reaches here have errors of
    several per cent of the target variance (units that die or share a teacher direction), far
    above the threshold; the global minimum is reached to float32 rounding.
    """
    _check_int("dim", dim, 1, 1000)
    _check_int("num_samples", num_samples, 1, 10**7)
    g = torch.Generator().manual_seed(seed)
    w1, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    x = torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
    raw = torch.relu(x @ w1.T).sum(dim=1, keepdim=True)
    y, mean, std = _standardise(raw)
    weights = (
        w1,
        torch.zeros(dim, dtype=torch.float64),
        torch.full((dim,), 1.0 / std, dtype=torch.float64),
        torch.tensor(-mean / std, dtype=torch.float64),
    )
    return _two_layer_problem(
        "teacher",
        f"student-teacher, ReLU {dim}-{dim}-1, orthonormal teacher (Safran & Shamir), {num_samples} Gaussian inputs",
        x,
        y,
        "relu",
        weights,
        seed,
        {"dim": dim, "num_samples": num_samples},
    )


def oscillating_wave(seed: int = 0, hidden: int = 8, num_samples: int = 256, sharpness: float = 2.0) -> FunctionProblem:
    """A wave on [-1, 1] with ``hidden`` transitions: ``sum_j (-1)^j tanh(beta (x - c_j))``.

    Transitions ``c_j`` sit at the centres of ``hidden`` equal cells of [-1, 1], each moved by a
    uniform random fraction of up to +-1/4 cell (from ``seed``); ``beta = sharpness / cell``
    (with the default 2, each transition spans about a cell: a rounded square wave with
    ``hidden / 2`` periods). Inputs: ``num_samples`` points uniform on [-1, 1]. The student is
    ``mlp(1, (hidden,), 1, "tanh")``; the reference weights are ``fc1.weight = beta``,
    ``fc1.bias = -beta c_j`` and alternating output weights. A fit that misses one of the
    ``hidden / 2`` periods leaves an error of order (1 / hidden) of the variance, far above the
    threshold.
    """
    _check_int("hidden", hidden, 2, 10_000)
    _check_int("num_samples", num_samples, 2, 10**7)
    if not (math.isfinite(sharpness) and sharpness > 0):
        raise InputError(f"sharpness must be a finite number > 0, got {sharpness!r}")
    g = torch.Generator().manual_seed(seed)
    cell = 2.0 / hidden
    centres = -1.0 + cell * (torch.arange(hidden, dtype=torch.float64) + 0.5)
    centres = centres + cell * (torch.rand(hidden, generator=g, dtype=torch.float64) - 0.5) / 2
    beta = sharpness / cell
    signs = (-1.0) ** torch.arange(hidden, dtype=torch.float64)
    x = torch.rand(num_samples, 1, generator=g, dtype=torch.float64) * 2 - 1
    raw = (signs * torch.tanh(beta * (x - centres))).sum(dim=1, keepdim=True)
    y, mean, std = _standardise(raw)
    weights = (
        torch.full((hidden, 1), beta, dtype=torch.float64),
        -beta * centres,
        signs / std,
        torch.tensor(-mean / std, dtype=torch.float64),
    )
    return _two_layer_problem(
        "wave",
        f"1-D square wave, {hidden // 2} periods on [-1, 1], tanh 1-{hidden}-1, {num_samples} points",
        x,
        y,
        "tanh",
        weights,
        seed,
        {"hidden": hidden, "num_samples": num_samples, "sharpness": sharpness},
    )


def parity(seed: int = 0, bits: int = 6, gain: float = 40.0) -> FunctionProblem:
    """``bits``-bit parity of all 2^bits patterns in {0, 1}^bits, fitted by a tanh MLP with ``bits`` units.

    Target: ``(sum x) mod 2`` as -1 / +1 (mean 0 and variance 1 exactly: half the patterns are
    odd). Reference weights: hidden unit k (k = 1..bits) is ``tanh(gain * (s - k + 1/2))`` with
    ``s = sum x``, output weights ``(-1)^(k+1)``, output bias ``(bits mod 2) - 1``; the residual is
    at most about 2 bits exp(-gain) per pattern. A poor minimum misfits at least one whole
    class of patterns with the same bit count (each class holds at least 1/2^bits of the data;
    stalled fits typically leave several classes near 0 instead of +-1, for errors of a few per
    cent of the variance or more), above the threshold. The seed sets only the order of the
    patterns: the data set is the same for every seed.
    """
    _check_int("bits", bits, 1, 20)
    if not (math.isfinite(gain) and gain > 0):
        raise InputError(f"gain must be a finite number > 0, got {gain!r}")
    g = torch.Generator().manual_seed(seed)
    codes = torch.randperm(2**bits, generator=g)
    x = ((codes.unsqueeze(1) >> torch.arange(bits)) & 1).to(torch.float64)
    s = x.sum(dim=1, keepdim=True)
    y = 2 * torch.remainder(s, 2) - 1
    k = torch.arange(1, bits + 1, dtype=torch.float64)
    weights = (
        torch.full((bits, bits), gain, dtype=torch.float64),
        -gain * (k - 0.5),
        (-1.0) ** (k + 1),
        torch.tensor(float(bits % 2) - 1.0, dtype=torch.float64),
    )
    return _two_layer_problem(
        "parity",
        f"{bits}-bit parity, all {2**bits} patterns, tanh {bits}-{bits}-1",
        x,
        y,
        "tanh",
        weights,
        seed,
        {"bits": bits, "gain": gain},
    )


def relu_sum_teacher(seed: int = 0, k: int = 10, num_samples: int = 2000) -> FunctionProblem:
    """Safran & Shamir's exact setting: ``y = sum_{j=1}^{k} relu(w_j . x)`` with orthonormal
    ``w_j`` in k dimensions, fitted by a student of the same form (:func:`anrat.models.relu_sum`:
    k ReLU units, output weights fixed at 1, no biases; only the rows are trained).

    For this very network and input distribution (x ~ N(0, I)), Safran & Shamir (ICML 2018) prove
    that the population loss has spurious local minima for 6 <= k <= 20, and found that gradient
    descent from random initialisation ends in one with a probability that grows with k. Unlike
    ``teacher`` (trainable output weights and biases) the obstacle here is known to be a local
    minimum, not a plateau or slow fitting. Targets are standardised; the student's fixed output
    scale and shift (``1/std``, ``-mean/std``) are part of the architecture, so the teacher's rows
    fit the data exactly and the global minimum is 0. ``num_samples`` >> k^2 keeps the empirical
    loss close to the population loss.
    """
    _check_int("k", k, 1, 1000)
    _check_int("num_samples", num_samples, 1, 10**7)
    g = torch.Generator().manual_seed(seed)
    w1, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    x = torch.randn(num_samples, k, generator=g, dtype=torch.float64)
    y, mean, std = _standardise(torch.relu(x @ w1.T).sum(dim=1, keepdim=True))
    scale, shift = 1.0 / std, -mean / std
    arch = {"name": "relu_sum", "kwargs": {"in_features": k, "hidden": k, "scale": scale, "shift": shift}}
    state = {
        "fc1.weight": w1.float(),
        "scale": torch.tensor(scale, dtype=torch.float32),
        "shift": torch.tensor(shift, dtype=torch.float32),
    }
    description = f"sum of {k} ReLUs, output weights fixed (Safran & Shamir's spurious minima), {num_samples} inputs"
    return _exact_problem("relu_sum", description, x, y, arch, state, seed, {"k": k, "num_samples": num_samples})


PROBLEMS: dict[str, Callable[..., FunctionProblem]] = {
    "teacher": student_teacher,
    "wave": oscillating_wave,
    "parity": parity,
    "relu_sum": relu_sum_teacher,
}


def make_problem(name: str, seed: int = 0, **kwargs: Any) -> FunctionProblem:
    """Build the registered problem ``name`` from ``seed`` (and the generator's keyword arguments)."""
    if name not in PROBLEMS:
        raise InputError(f"unknown problem {name!r}; expected one of {', '.join(PROBLEMS)}")
    try:
        return PROBLEMS[name](seed=seed, **kwargs)
    except TypeError as exc:
        raise InputError(f"bad arguments for problem {name!r}: {exc}") from None


__all__ = [
    "PROBLEMS",
    "SUCCESS_THRESHOLD",
    "FunctionProblem",
    "make_problem",
    "oscillating_wave",
    "parity",
    "relu_sum_teacher",
    "student_teacher",
]
