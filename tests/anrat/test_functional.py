"""NRAE/RAE numerics against a high-precision reference, over the whole range of lambda."""

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from anrat.errors import InputError
from anrat.functional import (
    KINDS,
    TILTED_BACKENDS,
    error_exponent,
    nrae,
    numpy_path,
    per_sample_loss,
    rae,
    rae_feasible,
    tilted_cpu,
    tilted_mean,
    tilted_stats,
)

T_GRID = [10.0**e for e in range(-8, 9)]  # t = lam ** p from 1e-8 to 1e8


def reference_tilted_mean(losses: torch.Tensor, t: float) -> float:
    """(1/t) log(mean exp(t l)) in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    values = [mpmath.mpf(float(v)) for v in losses.detach().double()]
    s = mpmath.fsum(mpmath.exp(mpmath.mpf(t) * v) for v in values) / len(values)
    return float(mpmath.log(s) / t)


def ce_batch(dtype, n=256, c=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_nrae_matches_high_precision_reference_for_t_from_1e_minus_8_to_1e8(dtype, tol, tilted_backend):
    logits, target = ce_batch(dtype)
    losses = per_sample_loss(logits, target, "ce")
    p = 2.0
    for t in T_GRID:
        value = nrae(logits, target, lam=t ** (1 / p), p=p, kind="ce", backend=tilted_backend)
        ref = reference_tilted_mean(losses, t)
        assert torch.isfinite(value)
        assert abs(value.item() - ref) <= tol * abs(ref), (t, value.item(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_and_torch_ops_paths_agree_on_value_weights_and_t_gradient(dtype):
    """The CPU computes the tilted mean in NumPy, accelerators in torch ops: the same numbers (both
    in float64 whatever the losses' dtype), including d/dt at t = 1e-8, a difference of two tiny terms."""
    losses = per_sample_loss(*ce_batch(dtype), "ce")
    weights = torch.softmax(torch.randn(len(losses), generator=torch.Generator().manual_seed(1)), 0).to(dtype)
    for w in (None, weights):
        for t in T_GRID:
            value, s, dt = tilted_stats(losses, t, w)
            value_np, s_np, dt_np = tilted_cpu(losses.numpy(), t, None if w is None else w.numpy())
            assert value.item() == pytest.approx(value_np, rel=1e-9), t
            torch.testing.assert_close(s, torch.from_numpy(s_np), rtol=1e-9, atol=1e-15)
            assert dt.item() == pytest.approx(dt_np, rel=1e-6, abs=1e-12), t
        # at small t, d NRAE / dt -> var(l) / 2 (weighted variance with weights)
        var = (
            float(losses.double().var(unbiased=False))
            if w is None
            else float((w.double() * (losses.double() - (w.double() * losses.double()).sum()) ** 2).sum())
        )
        assert tilted_cpu(losses.numpy(), 1e-8, None if w is None else w.numpy())[2] == pytest.approx(var / 2, rel=1e-5)


def test_backend_chooses_the_implementation():
    """ "auto" is NumPy on the host (today's choice on every device), "torch" the torch ops; both
    give the same value and gradient, and anything else is refused."""
    assert TILTED_BACKENDS == ("auto", "numpy", "torch") and KINDS == ("ce", "lp", "true_class_sq")
    losses = per_sample_loss(*ce_batch(torch.float64), "ce")
    assert [numpy_path(losses, b) for b in TILTED_BACKENDS] == [True, True, False]
    results = []
    for backend in TILTED_BACKENDS:
        l = losses.clone().requires_grad_()
        value = tilted_mean(l, 0.7, backend=backend)
        results.append((value, *torch.autograd.grad(value, l)))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-10, atol=1e-15)
    with pytest.raises(InputError, match="unknown tilted-mean backend 'gpu'; expected one of"):
        tilted_mean(losses, 0.7, backend="gpu")


def test_textbook_logsumexp_would_fail_in_float32_at_small_t():
    """The reason for the centred formulation: the naive one is off by far more than 1e-4 here."""
    logits, target = ce_batch(torch.float32)
    losses = per_sample_loss(logits, target, "ce")
    t = 1e-8
    naive = (torch.logsumexp(t * losses, 0) - math.log(losses.numel())) / t
    ref = reference_tilted_mean(losses, t)
    assert abs(naive.item() - ref) > 1e-2 * ref
    assert abs(tilted_mean(losses, t).item() - ref) <= 1e-6 * ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nrae_finite_with_logits_of_magnitude_1e3(dtype, tilted_backend):
    logits, target = ce_batch(dtype, scale=1e3)
    for t in T_GRID:
        x = logits.clone().requires_grad_(True)
        value = nrae(x, target, lam=t**0.5, p=2.0, backend=tilted_backend)
        value.backward()
        assert torch.isfinite(value), t
        assert torch.isfinite(x.grad).all(), t
        losses = per_sample_loss(logits, target)
        assert value.item() >= losses.mean().item() * (1 - 1e-6)
        assert value.item() <= losses.max().item() * (1 + 1e-6)


def test_limits_mean_at_small_t_max_at_large_t_and_monotone(tilted_backend):
    logits, target = ce_batch(torch.float32)
    losses = per_sample_loss(logits, target)
    assert tilted_mean(losses, 1e-8, backend=tilted_backend).item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert tilted_mean(losses, 1e8, backend=tilted_backend).item() == pytest.approx(losses.max().item(), rel=1e-6)
    values = [tilted_mean(losses, t, backend=tilted_backend).item() for t in T_GRID]
    assert all(b >= a * (1 - 1e-6) for a, b in zip(values, values[1:]))
    assert min(values) >= losses.mean().item() * (1 - 1e-7)


def test_gradient_is_the_tilted_softmax_weights(tilted_backend):
    losses = torch.rand(50, dtype=torch.float64, requires_grad=True)
    for t in (1e-6, 0.3, 5.0, 1e4):
        (g,) = torch.autograd.grad(tilted_mean(losses, t, backend=tilted_backend), losses)
        torch.testing.assert_close(g, torch.softmax(t * losses.detach(), 0), rtol=1e-9, atol=1e-12)


def test_weighted_tilted_mean_matches_definition(tilted_backend):
    l = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    w = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    for t in (1e-7, 0.5, 30.0):
        expected = math.log(sum(wi * math.exp(t * li) for wi, li in zip(w.tolist(), l.tolist()))) / t
        assert tilted_mean(l, t, weights=w, backend=tilted_backend).item() == pytest.approx(expected, rel=1e-9)


def test_zero_weight_entries_change_nothing_even_when_largest(tilted_backend):
    """A weight-0 entry (an empty shard under torch.distributed) neither shifts nor underflows the rest."""
    l = torch.tensor([0.5, 2.0, 1e4], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    for t in (1e-8, 0.5, 30.0, 1e4):
        value = tilted_mean(l, t, weights=w, backend=tilted_backend)
        (g,) = torch.autograd.grad(value, l)
        expected = tilted_mean(l.detach()[:2], t, backend=tilted_backend)
        assert value.item() == pytest.approx(expected.item(), rel=1e-9), t
        assert g[2].item() == 0.0 and g[:2].sum().item() == pytest.approx(1.0)


def test_rae_definition_overflow_and_feasibility():
    logits, target = ce_batch(torch.float32)
    losses = per_sample_loss(logits, target)
    lam = 0.5
    assert rae(logits, target, lam).item() == pytest.approx(torch.exp(0.25 * losses.double()).mean().item(), rel=1e-5)
    assert rae_feasible(logits, target, lam)
    big = 100.0  # t = 1e4: exp(t * l) overflows float32
    assert torch.isinf(rae(logits, target, big))
    assert not rae_feasible(logits, target, big)
    # float64 represents more: feasible there at a lambda where float32 is not
    lam_mid = math.sqrt(200.0 / losses.max().item())  # t * max(l) = 200: > 88.7, < 709
    assert not rae_feasible(logits, target, lam_mid)
    assert rae_feasible(logits.double(), target, lam_mid)


def test_binary_logistic_with_one_output_column():
    x = torch.randn(64, 1)
    y = torch.randint(0, 2, (64,)).float()
    losses = per_sample_loss(x, y, "ce")
    torch.testing.assert_close(losses, F.binary_cross_entropy_with_logits(x[:, 0], y, reduction="none"))
    assert nrae(x, y, 1e-4).item() == pytest.approx(losses.mean().item(), rel=1e-5)


def test_lp_kind_regression_and_class_probabilities():
    out = torch.randn(32, 3)
    target = torch.randn(32, 3)
    torch.testing.assert_close(per_sample_loss(out, target, "lp", p=2.0), ((out - target) ** 2).sum(1))
    torch.testing.assert_close(per_sample_loss(out, target, "lp", p=1.0), (out - target).abs().sum(1))
    labels = torch.randint(0, 3, (32,))
    expected = ((torch.softmax(out, 1) - F.one_hot(labels, 3).float()) ** 2).sum(1)
    torch.testing.assert_close(per_sample_loss(out, labels, "lp", p=2.0), expected)


def test_ce_matches_cross_entropy_loss_options():
    logits, target = ce_batch(torch.float32, c=4)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    torch.testing.assert_close(
        per_sample_loss(logits, target, weight=weight, label_smoothing=0.1),
        F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, reduction="none"),
    )


def test_autocast_keeps_the_loss_in_float32(tilted_backend):
    layer = torch.nn.Linear(20, 10)
    x = torch.randn(128, 20)
    target = torch.randint(0, 10, (128,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        values = [nrae(logits, target, lam=t**0.5, backend=tilted_backend) for t in T_GRID]
    losses = per_sample_loss(logits.float(), target)
    for t, v in zip(T_GRID, values):
        assert v.dtype == torch.float32
        assert torch.isfinite(v)
        assert v.item() == pytest.approx(reference_tilted_mean(losses, t), rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lambda_is_refused(bad):
    logits, target = ce_batch(torch.float32)
    with pytest.raises(InputError, match="lam must be a finite number > 0"):
        nrae(logits, target, bad)


def test_bad_shapes_and_kinds_are_refused():
    logits, target = ce_batch(torch.float32)
    with pytest.raises(InputError, match="same batch size"):
        nrae(logits, target[:10], 1.0)
    with pytest.raises(InputError, match="unknown loss kind"):
        nrae(logits, target, 1.0, kind="hinge")
    with pytest.raises(InputError, match="expects target of shape"):
        per_sample_loss(torch.randn(8, 3), torch.randn(8, 4), "lp")


# --- kind="true_class_sq": the original ANRAT code's (1 - p_y) ** r ---------------------------------
def reference_true_class_error(logits: torch.Tensor, target: torch.Tensor, r: float) -> list[float]:
    """(1 - softmax(z)_y) ** r per row, in 60-digit arithmetic (1 - p_y as the sum of the other p_k)."""
    mpmath.mp.dps = 60
    out = []
    for z, y in zip(logits.double().tolist(), target.tolist()):
        e = [mpmath.exp(mpmath.mpf(v)) for v in z]
        miss = mpmath.fsum(e[:y] + e[y + 1 :]) / mpmath.fsum(e)
        out.append(float(miss ** mpmath.mpf(r)))
    return out


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("r", [2.0, 1.0, 0.5, 3.0])
def test_true_class_error_matches_a_high_precision_reference(dtype, rtol, r):
    logits, target = ce_batch(dtype, n=64, c=10, scale=3.0)
    logits[0] = 0.0
    logits[0, target[0]] = 30.0  # p_y = 1 - 9e-13 * 9: 1 - p_y is below float32's resolution of 1
    logits[1, target[1]] = -40.0  # p_y ~ 0: the error is ~1, its largest value
    losses = per_sample_loss(logits, target, "true_class_sq", r=r)
    assert losses.dtype == dtype and losses.shape == (64,)
    expected = torch.tensor(reference_true_class_error(logits, target, r), dtype=torch.float64)
    torch.testing.assert_close(losses.double(), expected, rtol=rtol, atol=0.0)
    assert losses[0].item() > 0  # not rounded to 0, as 1 - softmax(z)_y is in float32 (below)
    assert ((losses >= 0) & (losses <= 1)).all()
    naive = 1 - torch.softmax(logits.float(), 1).gather(1, target[:, None])[:, 0]
    assert naive[0].item() == 0.0  # what the direct formula gives in float32


def test_true_class_error_default_exponent_is_two_and_independent_of_p():
    logits, target = ce_batch(torch.float64, n=32, c=5)
    p_y = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    assert error_exponent("true_class_sq", 3.0) == 2.0 and error_exponent("lp", 3.0) == 3.0
    assert error_exponent("lp", 3.0, 1.5) == 1.5
    for p in (1.0, 2.0, 3.0):  # p is t's exponent only
        torch.testing.assert_close(per_sample_loss(logits, target, "true_class_sq", p=p), (1 - p_y) ** 2)
    lam, p = 1.7, 3.0
    value = nrae(logits, target, lam, p=p, kind="true_class_sq", r=1.0)
    assert value.item() == pytest.approx(reference_tilted_mean(1 - p_y, lam**p), rel=1e-10)
    # and for "lp" r unties the norm exponent from p: ||e||_2^2 at t = lam^3
    out, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    value = nrae(out, y, lam, p=p, kind="lp", r=2.0)
    assert value.item() == pytest.approx(reference_tilted_mean(((out - y) ** 2).sum(1), lam**p), rel=1e-10)
    assert per_sample_loss(out, y, "lp", p=3.0).sub(((out - y).abs() ** 3).sum(1)).abs().max() < 1e-12  # as before


@pytest.mark.parametrize("r", [2.0, 0.5])
def test_true_class_error_gradient_passes_gradcheck(r):
    logits, target = ce_batch(torch.float64, n=8, c=4, scale=2.0)
    logits[0, target[0]] = 25.0  # p_y within 1e-10 of 1: the gradient stays finite and exact
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: per_sample_loss(z, target, "true_class_sq", r=r), (x,))
    assert torch.autograd.gradcheck(lambda z: nrae(z, target, 2.0, kind="true_class_sq", r=r), (x,))


def test_true_class_error_is_finite_in_float32_under_autocast_and_with_huge_logits():
    layer = torch.nn.Linear(20, 10)
    x, target = torch.randn(64, 20) * 1e3, torch.randint(0, 10, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        losses = per_sample_loss(logits, target, "true_class_sq")
        value = nrae(logits, target, 10.0, kind="true_class_sq")
    assert losses.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.isfinite(losses).all() and torch.isfinite(value)
    z = logits.float().detach().requires_grad_()
    nrae(z, target, 10.0, kind="true_class_sq").backward()
    assert torch.isfinite(z.grad).all()


def test_true_class_error_refuses_what_it_cannot_score():
    with pytest.raises(InputError, match="kind='true_class_sq' expects"):
        per_sample_loss(torch.randn(8, 3), torch.randn(8, 3), "true_class_sq")  # not class indices
    with pytest.raises(InputError, match="kind='true_class_sq' expects"):
        per_sample_loss(torch.randn(8, 1), torch.zeros(8, dtype=torch.long), "true_class_sq")  # one column
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="r \\(the error's exponent\\) must be a finite number > 0"):
            per_sample_loss(torch.randn(8, 3), torch.zeros(8, dtype=torch.long), "true_class_sq", r=bad)
