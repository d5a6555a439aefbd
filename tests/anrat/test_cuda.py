"""The same code on CUDA: values and gradients match the CPU's, and a training epoch runs there.

Skipped where no CUDA device exists (CI); run them on a GPU machine with
``python -m pytest tests/anrat/test_cuda.py``.
"""

import pytest
import torch

from anrat import ANRATLoss, NRAELoss
from anrat.data import Split
from anrat.functional import TiltedBackend, nrae, per_sample_loss
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

T_GRID = [10.0**e for e in range(-8, 9)]


@pytest.fixture(params=["numpy", "torch"], ids=["host", "device"])
def backend(request: pytest.FixtureRequest) -> TiltedBackend:
    """Both paths of the tilted mean for CUDA tensors: NumPy on the host after one copy ("numpy",
    what "auto" takes), and torch ops on the device ("torch"); see anrat.functional.numpy_path."""
    return request.param


def batch(n=256, c=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_nrae_on_cuda_matches_the_cpu_for_t_from_1e_minus_8_to_1e8(scale, backend):
    logits, target = batch(scale=scale)
    for t in T_GRID:
        cpu_x = logits.detach().clone().requires_grad_()
        cuda_x = logits.detach().cuda().requires_grad_()
        cpu_v = nrae(cpu_x, target, lam=t**0.5)
        cuda_v = nrae(cuda_x, target.cuda(), lam=t**0.5, backend=backend)
        cpu_v.backward()
        cuda_v.backward()
        assert torch.isfinite(cuda_v) and torch.isfinite(cuda_x.grad).all(), t
        assert cuda_v.item() == pytest.approx(cpu_v.item(), rel=1e-5), t
        torch.testing.assert_close(cuda_x.grad.cpu(), cpu_x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("parameterization", ["log", "softplus", "direct"])
@pytest.mark.parametrize("lam", [1e-4, 0.3, 10.0, 1e3])
def test_anrat_value_and_lambda_gradient_on_cuda_match_the_cpu(parameterization, lam, backend):
    logits, target = batch()
    results = []
    for device in ("cpu", "cuda"):
        loss = ANRATLoss(
            init_lambda=lam, a=0.01, parameterization=parameterization, backend=backend if device == "cuda" else "auto"
        ).to(device)
        x = logits.detach().to(device).clone().requires_grad_()
        value = loss(x, target.to(device))
        value.backward()
        results.append((value.item(), loss.theta.grad.item(), x.grad.cpu()))
    (v_cpu, g_cpu, x_cpu), (v_cuda, g_cuda, x_cuda) = results
    assert v_cuda == pytest.approx(v_cpu, rel=1e-5)
    assert g_cuda == pytest.approx(g_cpu, rel=1e-4, abs=1e-8)
    torch.testing.assert_close(x_cuda, x_cpu, rtol=1e-4, atol=1e-6)


def test_loss_stays_float32_under_cuda_autocast(backend):
    layer = torch.nn.Linear(20, 10).cuda()
    x, target = torch.randn(128, 20, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = layer(x)
        values = [NRAELoss(t**0.5, backend=backend)(logits, target) for t in T_GRID]
    reference = per_sample_loss(logits.float(), target)
    for t, v in zip(T_GRID, values):
        assert v.dtype == torch.float32 and torch.isfinite(v), t
        assert v.item() >= reference.mean().item() * (1 - 1e-5)
        assert v.item() <= reference.max().item() * (1 + 1e-5)


def test_an_anrat_epoch_on_cuda_learns_and_moves_lambda(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1, 28, 28, generator=g)
    y = x.flatten(1)[:, :10].argmax(1)  # a learnable rule: the brightest of the first 10 pixels
    train = Split(x.cuda(), y.cuda())
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[64]).cuda()
    trainer = Trainer(
        model,
        LambdaSchedule(ScheduleConfig(name="adaptive", lam0=3.0), backend=backend),
        train,
        None,
        TrainConfig(epochs=3, lr=0.1, lambda_lr=0.1, batch_size=64),
        progress=False,
    )
    before = trainer.evaluate(train)["error"]
    trainer.fit()
    after = trainer.evaluate(train)["error"]
    lam = trainer.history[-1]["lam"]
    assert after < before - 0.2, (before, after)
    assert lam != pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("lam", [1e-3, 3.0, 1e3])
def test_compiled_anrat_on_cuda_matches_the_cpu(lam, backend):
    """torch.compile (inductor, fused kernels) of the loss on CUDA: value and gradients as eager on
    the CPU; under compile the torch-ops path is traced whichever path eager CUDA takes."""
    logits, target = batch()
    results = []
    for device, compile in (("cpu", False), ("cuda", True)):
        loss = ANRATLoss(init_lambda=lam, a=0.01, backend=backend if device == "cuda" else "auto").to(device)
        x = logits.detach().to(device).clone().requires_grad_()
        step = torch.compile(loss, fullgraph=True) if compile else loss
        value = step(x, target.to(device))
        value.backward()
        results.append((value.item(), x.grad.cpu(), loss.theta.grad.item()))
    (cpu_v, cpu_g, cpu_t), (cuda_v, cuda_g, cuda_t) = results
    assert cuda_v == pytest.approx(cpu_v, rel=1e-5)
    torch.testing.assert_close(cuda_g, cpu_g, rtol=1e-4, atol=1e-6)
    assert cuda_t == pytest.approx(cpu_t, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("r", [2.0, 0.5])
def test_true_class_error_on_cuda_matches_the_cpu_under_autocast(r):
    logits, target = batch(scale=30.0)  # many rows with p_y within float32's resolution of 1
    cpu_x = logits.clone().requires_grad_()
    cuda_x = logits.cuda().requires_grad_()
    cpu_v = nrae(cpu_x, target, 3.0, kind="true_class_sq", r=r)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cuda_v = nrae(cuda_x, target.cuda(), 3.0, kind="true_class_sq", r=r)
    assert cuda_v.dtype == torch.float32
    cpu_v.backward()
    cuda_v.backward()
    assert cuda_v.item() == pytest.approx(cpu_v.item(), rel=1e-5)
    torch.testing.assert_close(cuda_x.grad.cpu(), cpu_x.grad, rtol=1e-4, atol=1e-7)
