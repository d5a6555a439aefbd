"""The loss modules: twins of the functions, ANRAT's lambda gradient, the running normaliser."""

import math

import pytest
import torch

from anrat import ANRATLoss, NRAELoss, PlainLoss
from anrat.errors import InputError
from anrat.functional import nrae, per_sample_loss, tilted_mean
from anrat.losses import RAELoss


def batch(n=128, c=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * 2).to(dtype), torch.randint(0, c, (n,), generator=g)


def test_modules_are_twins_of_the_functions(tilted_backend):
    logits, target = batch()
    assert PlainLoss()(logits, target).item() == pytest.approx(
        torch.nn.CrossEntropyLoss()(logits, target).item(), rel=1e-6
    )
    for lam in (0.01, 1.0, 30.0):
        assert NRAELoss(lam, p=2.0, backend=tilted_backend)(logits, target).item() == pytest.approx(
            nrae(logits, target, lam, p=2.0, backend=tilted_backend).item(), rel=1e-6
        )
    anrat = ANRATLoss(init_lambda=3.0, p=2.0, a=0.1, q=1.0, backend=tilted_backend)
    assert anrat.lam == pytest.approx(3.0, rel=1e-6)
    assert anrat(logits, target).item() == pytest.approx(
        nrae(logits, target, 3.0, backend=tilted_backend).item() + 0.1 / 3.0, rel=1e-5
    )


@pytest.mark.parametrize("parameterization", ["log", "softplus", "direct"])
@pytest.mark.parametrize("lam, p, a, q", [(0.3, 2.0, 0.01, 1.0), (3.0, 2.0, 0.5, 2.0), (10.0, 1.0, 1.0, 1.0)])
def test_lambda_gradient_matches_the_closed_form(parameterization, lam, p, a, q, tilted_backend):
    logits, target = batch(dtype=torch.float64)
    loss = ANRATLoss(init_lambda=lam, p=p, a=a, q=q, parameterization=parameterization, backend=tilted_backend)
    lam_t = loss.lambda_tensor()
    lam_t.retain_grad()
    # d loss / d lambda through autograd ...
    losses = per_sample_loss(logits, target)
    value = tilted_mean(losses, lam_t.pow(p), backend=tilted_backend) + a * lam_t.pow(-q)
    value.backward()
    # ... against (p / lam) * (sum_i w_i l_i - nrae) - a q lam^(-q-1), w = softmax(t l)
    lam_v = lam_t.item()
    t = lam_v**p
    l = losses.detach()
    w = torch.softmax(t * l, 0)
    nrae_v = tilted_mean(l, t).item()
    closed = (p / lam_v) * ((w * l).sum().item() - nrae_v) - a * q * lam_v ** (-q - 1)
    assert lam_t.grad.item() == pytest.approx(closed, rel=1e-4, abs=1e-7)
    # and the module's own forward gives theta the chain-rule gradient of the same thing
    loss.zero_grad()
    loss(logits, target).backward()
    dlam_dtheta = {"log": lam_v, "softplus": -math.expm1(-lam_v), "direct": 1.0}[parameterization]  # exp / sigmoid / 1
    assert loss.theta.grad.item() == pytest.approx(closed * dlam_dtheta, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("parameterization", ["log", "softplus", "direct"])
@pytest.mark.parametrize("lr", [1e6, 1e12, -1e12])
def test_lambda_stays_positive_and_finite_under_a_huge_step(parameterization, lr, tilted_backend):
    logits, target = batch()
    loss = ANRATLoss(init_lambda=10.0, parameterization=parameterization, backend=tilted_backend)
    opt = torch.optim.SGD(loss.parameters(), lr=abs(lr), maximize=lr < 0)
    for _ in range(3):
        opt.zero_grad()
        loss(logits, target).backward()
        opt.step()
        assert 0 < loss.lam < math.inf
        assert torch.isfinite(loss(logits, target))
    # not stuck at a bound: the gradient still reaches theta
    opt.zero_grad()
    loss(logits, target).backward()
    assert loss.theta.grad is not None and loss.theta.grad.item() != 0


def test_anrat_lambda_falls_without_penalty_and_settles_with_it():
    """NRAE rises with lambda, so a = 0 drives lambda down; a large a pushes it up."""
    logits, target = batch()
    down = ANRATLoss(init_lambda=2.0, a=0.0)
    up = ANRATLoss(init_lambda=2.0, a=100.0)
    for loss in (down, up):
        opt = torch.optim.SGD(loss.parameters(), lr=0.01)
        for _ in range(20):
            opt.zero_grad()
            loss(logits, target).backward()
            opt.step()
    assert down.lam < 2.0 < up.lam


def test_bad_arguments_are_refused_with_clear_messages():
    with pytest.raises(InputError, match="init_lambda must be"):
        ANRATLoss(init_lambda=0.0)
    with pytest.raises(InputError, match="a \\(penalty weight\\) must be >= 0"):
        ANRATLoss(a=-1.0)
    with pytest.raises(InputError, match="q \\(penalty exponent\\) must be > 0"):
        ANRATLoss(q=0.0)
    with pytest.raises(InputError, match="lambda must be a finite number > 0"):
        NRAELoss(lam=-2.0)
    with pytest.raises(InputError, match="unknown normalizer"):
        NRAELoss(normalizer="global")
    with pytest.raises(InputError, match="unknown tilted-mean backend 'cuda'"):
        NRAELoss(backend="cuda")
    with pytest.raises(InputError, match="unknown tilted-mean backend 'cuda'"):
        ANRATLoss(backend="cuda")
    loss = NRAELoss(lam=1.0)
    with pytest.raises(InputError):
        loss.lam = 0.0


def sample_weights(loss_module, losses):
    """d(objective)/d(l_i): the weight each sample's gradient gets."""
    l = losses.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_module.aggregate(l), l)
    return g


def test_running_normaliser_weights_approach_the_full_batch_weights():
    """On a fixed dataset, the running form weights samples as the full-batch NRAE does."""
    torch.manual_seed(0)
    n, m, t = 4096, 64, 3.0
    losses = torch.distributions.Exponential(2.0).sample((n,))  # fixed per-sample losses
    full = torch.softmax(t * losses, 0)  # full-batch tilted weights, sum 1
    n_batches = n // m
    running = NRAELoss(lam=t**0.5, p=2.0, normalizer="running", momentum=0.005)
    per_batch = NRAELoss(lam=t**0.5, p=2.0, normalizer="batch")
    order = torch.randperm(n)
    for _ in range(20):  # warm-up passes for the running estimate
        for b in range(n_batches):
            running.aggregate(losses[order[b * m : (b + 1) * m]])
    w_running = torch.empty(n)
    w_batch = torch.empty(n)
    for b in range(n_batches):
        idx = order[b * m : (b + 1) * m]
        w_running[idx] = sample_weights(running, losses[idx]) / n_batches
        w_batch[idx] = sample_weights(per_batch, losses[idx]) / n_batches
    err_running = ((w_running - full).abs().sum() / full.sum()).item()
    err_batch = ((w_batch - full).abs().sum() / full.sum()).item()
    assert err_running < 0.05  # measured 0.021
    assert err_batch > 0.5  # measured 1.06: per-batch normalising misweights the hard samples
    # the value reported is the running estimate of the dataset NRAE
    assert running.running_nrae.item() == pytest.approx(tilted_mean(losses, t).item(), rel=0.01)


@pytest.mark.parametrize("lam", [1e-3, 3.0, 1e3])
@pytest.mark.parametrize(
    "make",
    [
        lambda lam: ANRATLoss(lam),
        lambda lam: NRAELoss(lam),
        lambda lam: NRAELoss(lam, normalizer="running"),
        lambda lam: PlainLoss(),
        lambda lam: ANRATLoss(lam, parameterization="direct", kind="true_class_sq"),
        lambda lam: RAELoss(min(lam, 1.0), kind="true_class_sq", r=1.5),
    ],
    ids=["anrat", "nrae", "nrae-running", "plain", "anrat-direct-true-class", "rae-true-class"],
)
def test_losses_trace_into_one_graph_under_torch_compile(make, lam):
    """Under torch.compile the losses take the torch-ops tilted mean (no host copy, no graph break)
    and agree with eager values and gradients, in the input and in lambda."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(32, 5, generator=g) * 3).requires_grad_()
    target = torch.randint(0, 5, (32,), generator=g)
    eager, traced = make(lam), make(lam)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    for _ in range(2):  # the running normaliser's second step starts from its buffer
        expected = eager(logits, target)
        value = compiled(logits, target)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
        grads = torch.autograd.grad(value, [logits, *traced.parameters()])
        expected_grads = torch.autograd.grad(expected, [logits, *eager.parameters()])
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# --- the faithful variants: lambda updated directly, RAE itself, the error's exponent r ------------
@pytest.mark.parametrize("lam", [0.05, 1.0, 7.0])
def test_direct_lambda_gradient_is_the_papers_eq6_with_the_sign_fixed(lam):
    """With lambda = theta, dJ/dtheta = (p / lam) (sum_i pi_i l_i - NRAE) - a q lam^(-q-1): checked
    by gradcheck (float64, in lambda and the losses) and against central finite differences."""
    logits, target = batch(n=16, c=4, seed=1, dtype=torch.float64)
    losses = per_sample_loss(logits, target)
    p, a, q = 2.0, 0.3, 1.5
    loss = ANRATLoss(1.0, p=p, a=a, q=q, parameterization="direct", backend="torch")

    def objective(z: torch.Tensor, lam_t: torch.Tensor) -> torch.Tensor:  # the module with theta = lam_t
        return torch.func.functional_call(loss, {"theta": lam_t}, (z, target))

    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(objective, (logits.clone().requires_grad_(), lam_t))
    (grad,) = torch.autograd.grad(objective(logits, lam_t), lam_t)
    t = lam**p
    w = torch.softmax(t * losses, 0)
    closed = (p / lam) * ((w * losses).sum().item() - reference_nrae(losses, t)) - a * q * lam ** (-q - 1)
    h = 1e-6 * lam
    fd = (objective(logits, lam_t.detach() + h) - objective(logits, lam_t.detach() - h)).item() / (2 * h)
    assert grad.item() == pytest.approx(closed, rel=1e-9, abs=1e-12)
    assert grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


def reference_nrae(losses: torch.Tensor, t: float) -> float:
    return (torch.logsumexp(t * losses, 0) - math.log(losses.numel())).item() / t


def test_direct_lambda_is_projected_back_onto_its_bounds_after_a_step():
    logits, target = batch()
    loss = ANRATLoss(init_lambda=2.0, a=0.0, parameterization="direct", min_lambda=1e-3, max_lambda=50.0)
    assert loss.theta.item() == pytest.approx(2.0)  # theta is lambda
    opt = torch.optim.SGD(loss.parameters(), lr=1e6)  # a = 0: the gradient only pushes lambda down
    opt.zero_grad()
    loss(logits, target).backward()
    opt.step()
    assert loss.theta.item() < 0  # the raw SGD step overshoots 0 ...
    loss.project_()
    assert loss.theta.item() == pytest.approx(1e-3) and loss.lam == pytest.approx(1e-3)  # ... the rule: to min_lambda
    loss.theta.data.fill_(1e3)
    loss.project_()
    assert loss.lam == pytest.approx(50.0)
    for parameterization in ("log", "softplus"):  # the others are left alone (straight-through clamp)
        other = ANRATLoss(parameterization=parameterization)
        other.theta.data.fill_(-1e3)
        other.project_()
        assert other.theta.item() == -1e3


@pytest.mark.parametrize("lam", [0.1, 1.0, 2.5])
def test_rae_loss_is_mean_exp_and_its_gradient(lam):
    logits, target = batch(dtype=torch.float64)
    losses = per_sample_loss(logits, target)
    p = 2.0
    t = lam**p
    l = losses.clone().requires_grad_()
    value = RAELoss(lam, p).aggregate(l)
    expected = torch.exp(t * losses).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    value.backward()
    torch.testing.assert_close(l.grad, t * torch.exp(t * losses) / losses.numel())
    small = (losses[:8] / losses.max()).clone().requires_grad_()  # t * l <= t: finite differences stay accurate
    assert torch.autograd.gradcheck(lambda z: RAELoss(lam, p).aggregate(z), (small,))
    # float32 losses: computed in float64, returned in float32; inf once t * max(l) > 88.7
    assert RAELoss(lam, p).aggregate(losses.float()).dtype == torch.float32
    assert torch.isinf(RAELoss(10.0, p).aggregate(losses.float()))
    assert RAELoss(lam, p)(logits, target).item() == pytest.approx(expected.item(), rel=1e-12)


def test_modules_take_the_errors_exponent_apart_from_p():
    out, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    squared = ((out - y) ** 2).sum(1)
    torch.testing.assert_close(PlainLoss("lp", p=3.0, r=2.0)(out, y), squared.mean())
    torch.testing.assert_close(PlainLoss("lp", p=3.0)(out, y), ((out - y).abs() ** 3).sum(1).mean())  # as before
    assert NRAELoss(1.5, p=3.0, kind="lp", r=2.0)(out, y).item() == pytest.approx(
        reference_nrae(squared, 1.5**3), rel=1e-10
    )
    anrat = ANRATLoss(1.5, p=3.0, a=0.0, kind="lp", r=2.0)
    assert anrat(out, y).item() == pytest.approx(reference_nrae(squared, 1.5**3), rel=1e-6)
    logits, target = batch(dtype=torch.float64)
    miss = 1 - torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(PlainLoss("true_class_sq")(logits, target), (miss**2).mean())
    torch.testing.assert_close(PlainLoss("true_class_sq", r=1.0)(logits, target), miss.mean())
    assert ", r=2" in repr(NRAELoss(kind="lp", r=2.0)) and ", r=" not in repr(NRAELoss(kind="lp"))


def test_bad_exponents_and_parameterizations_are_refused():
    with pytest.raises(InputError, match="r \\(the error's exponent\\) applies to kind 'lp' and 'true_class_sq' only"):
        NRAELoss(kind="ce", r=2.0)
    for bad in (0.0, -2.0, float("inf")):
        with pytest.raises(InputError, match="r \\(the error's exponent\\) must be a finite number > 0"):
            PlainLoss("lp", r=bad)
    with pytest.raises(InputError, match="expected one of \\('log', 'softplus', 'direct'\\)"):
        ANRATLoss(parameterization="identity")
    with pytest.raises(InputError, match="lambda must be a finite number > 0"):
        RAELoss(0.0)
