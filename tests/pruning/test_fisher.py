"""pruning.fisher against its definitions, computed independently with plain autograd loops."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anrat.errors import InputError
from pruning.fisher import (
    KroneckerFactors,
    dense_fisher,
    diagonal_fisher,
    kfac_factors,
    layer_input_patches,
    per_sample_grads,
    prepare,
)
from pruning.layers import select_layers


def tiny_convnet(num_classes: int = 3) -> nn.Sequential:
    """Conv (stride 2, padding 1) -> pool -> ReLU -> conv (dilation 2) -> flatten -> Linear, float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(2, 3, 3, stride=2, padding=1),
            pool=nn.MaxPool2d(2),
            relu=nn.ReLU(),
            conv2=nn.Conv2d(3, 4, 2, dilation=2, bias=False),
            flatten=nn.Flatten(),
            fc=nn.Linear(4 * 2 * 2, num_classes),
        )
    ).double()


def tiny_data(n: int = 7, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, num_classes, (n,), generator=g)


def loop_grads(model: nn.Module, x_i: torch.Tensor, scalar_of_output, names: list[str]) -> dict[str, torch.Tensor]:
    """Gradient of scalar_of_output(model(x_i[None])[0]) w.r.t. the named parameters, by autograd."""
    params = dict(model.named_parameters())
    value = scalar_of_output(model(x_i.unsqueeze(0))[0])
    grads = torch.autograd.grad(value, [params[name] for name in names])
    return dict(zip(names, grads))


# ---- per-sample gradients ----------------------------------------------------------------------------


def test_per_sample_grads_equal_a_loop_of_autograd_gradients():
    model = tiny_convnet().eval()
    x, _ = tiny_data(5)
    v = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = [name for name, _ in model.named_parameters()]
    batched = per_sample_grads(model, x, v, names)
    for i in range(5):
        for m in range(4):
            expected = loop_grads(model, x[i], lambda z, i=i, m=m: (z * v[i, m]).sum(), names)
            for name in names:
                assert batched[name].shape == (5, 4) + expected[name].shape
                torch.testing.assert_close(batched[name][i, m], expected[name], rtol=1e-10, atol=1e-12)


# ---- the Fisher of each likelihood -------------------------------------------------------------------


def reference_diagonal(model, x, y, kind: str, fisher: str, names, sigma2: float | None = None):
    """mean_i of the squared loss gradients: observed y (empirical), or E_{y ~ model} (model)."""
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters() if name in names}
    for i in range(x.shape[0]):
        with torch.no_grad():
            z = model(x[i : i + 1])[0]
        if kind == "softmax":
            pi = torch.softmax(z, 0)
            if fisher == "empirical":
                outcomes = [(1.0, lambda out, i=i: F.cross_entropy(out[None], y[i : i + 1]))]
            else:
                outcomes = [
                    (float(pi[k]), lambda out, k=k: F.cross_entropy(out[None], torch.tensor([k])))
                    for k in range(z.numel())
                ]
        elif kind == "sigmoid":
            p = float(torch.sigmoid(z[0]))
            bce = lambda out, t: F.binary_cross_entropy_with_logits(out, torch.tensor([t], dtype=out.dtype))
            if fisher == "empirical":
                outcomes = [(1.0, lambda out, i=i, bce=bce: bce(out, float(y[i])))]
            else:
                outcomes = [(p, lambda out, bce=bce: bce(out, 1.0)), (1 - p, lambda out, bce=bce: bce(out, 0.0))]
        else:
            assert fisher == "empirical"
            outcomes = [(1.0, lambda out, i=i: ((out - y[i]) ** 2).sum() / (2 * sigma2))]
        for weight, nll in outcomes:
            for name, g in loop_grads(model, x[i], nll, list(totals)).items():
                totals[name] += weight * g**2
    return {name: t / x.shape[0] for name, t in totals.items()}


@pytest.mark.parametrize("fisher", ["model", "empirical"])
def test_diagonal_fisher_of_softmax_matches_expected_and_observed_loss_gradients(fisher):
    model = tiny_convnet()
    x, y = tiny_data(6)
    layers = select_layers(model)
    fd = prepare(model, (x, y), layers=layers, max_samples=None)
    names = ["conv1.weight", "conv2.weight", "fc.weight", "fc.bias"]
    got = diagonal_fisher(model, fd, names, fisher=fisher, batch_size=4)
    expected = reference_diagonal(model, x, y, "softmax", fisher, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("fisher", ["model", "empirical"])
def test_diagonal_fisher_of_binary_logistic(fisher):
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 3), act=nn.Tanh(), fc2=nn.Linear(3, 1))).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = (torch.rand(9) < 0.5).double()
    fd = prepare(model, (x, y), layers=select_layers(model), max_samples=None)
    assert fd.likelihood.kind == "sigmoid"
    names = ["fc1.weight", "fc2.weight"]
    got = diagonal_fisher(model, fd, names, fisher=fisher)
    expected = reference_diagonal(model, x, y, "sigmoid", fisher, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-14)


def test_gaussian_likelihood_uses_the_ml_residual_variance():
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(3, 4), act=nn.Tanh(), fc2=nn.Linear(4, 2))).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    fd = prepare(model, (x, y), loss="lp", layers=select_layers(model), max_samples=None)
    with torch.no_grad():
        sigma2 = float(((model(x) - y) ** 2).mean())
    assert fd.likelihood.sigma2 == pytest.approx(sigma2, rel=1e-12)
    names = ["fc1.weight", "fc2.weight"]
    got = diagonal_fisher(model, fd, names, fisher="empirical")
    expected = reference_diagonal(model, x, y, "gaussian", "empirical", names, sigma2)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-14)
    # Model Fisher of a Gaussian: E[J^T J] / sigma^2, here checked on the output layer where
    # J = [h 0; 0 h] (h = hidden activations): F_jj = mean(h_j^2) / sigma^2 for both outputs.
    diag = diagonal_fisher(model, fd, ["fc2.weight"], fisher="model")["fc2.weight"]
    with torch.no_grad():
        h = torch.tanh(model.fc1(x))
    torch.testing.assert_close(diag, (h**2).mean(0).expand(2, -1) / sigma2, rtol=1e-10, atol=0)


def test_dense_fisher_is_the_mean_outer_product_of_expected_loss_gradients():
    model = tiny_convnet()
    x, y = tiny_data(5)
    layers = select_layers(model, ["conv2", "fc"])
    fd = prepare(model, (x, y), layers=layers, max_samples=None)
    blocks = dense_fisher(model, fd, layers, batch_size=2)
    for layer, names in {"conv2": ["conv2.weight"], "fc": ["fc.weight", "fc.bias"]}.items():
        expected = 0
        for i in range(5):
            with torch.no_grad():
                pi = torch.softmax(model(x[i : i + 1])[0], 0)
            for k in range(3):
                g = loop_grads(model, x[i], lambda out, k=k: F.cross_entropy(out[None], torch.tensor([k])), names)
                flat = torch.cat([g[name].flatten() for name in names])
                expected = expected + pi[k] * torch.outer(flat, flat)
        torch.testing.assert_close(blocks[layer], expected / 5, rtol=1e-9, atol=1e-14)


# ---- Kronecker factors ------------------------------------------------------------------------------


def test_input_patches_equal_torch_unfold():
    for conv in (
        nn.Conv2d(3, 2, 3, stride=2, padding=1),
        nn.Conv2d(3, 2, (2, 3), dilation=(2, 1), padding=(1, 0), bias=False),
    ):
        x = torch.randn(4, 3, 9, 8)
        unfolded = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        patches = layer_input_patches(conv, x)
        features = unfolded.shape[1]
        torch.testing.assert_close(patches[..., :features], unfolded.transpose(1, 2))
        if conv.bias is not None:
            assert torch.equal(patches[..., features], torch.ones(4, unfolded.shape[2]))
        else:
            assert patches.shape[2] == features


def test_kfac_factors_equal_their_definitions_for_conv_and_linear():
    """A = E[(1/T) sum_t a_t a_t^T] with a_t the receptive field at output location t (cut out by
    slicing here) plus a 1; G = E[sum_k pi_k sum_t g_kt g_kt^T], g_kt = d(-log pi_k)/d(output at t)."""
    model = tiny_convnet()
    x, y = tiny_data(4)
    layers = select_layers(model)
    fd = prepare(model, (x, y), layers=layers, max_samples=None)
    factors = kfac_factors(model, fd, layers, batch_size=3)
    assert set(factors) == {"conv1", "conv2", "fc"}

    inputs, outputs = {}, {}

    def keep(module, args, output, name):
        inputs[name], outputs[name] = args[0], output

    for name, module in layers.items():
        module.register_forward_hook(lambda module, args, output, name=name: keep(module, args, output, name))
    A = {name: 0 for name in layers}
    G = {name: 0 for name in layers}
    for i in range(4):
        z = model(x[i : i + 1])[0]
        pi = torch.softmax(z.detach(), 0)
        for name, module in layers.items():
            inp = inputs[name][0].detach()
            if isinstance(module, nn.Conv2d):
                (kh, kw), (s, _), (d, _), (p, _) = module.kernel_size, module.stride, module.dilation, module.padding
                padded = F.pad(inp, (p, p, p, p))
                H, W = outputs[name].shape[2:]
                a = torch.stack(
                    [
                        padded[:, r * s : r * s + d * (kh - 1) + 1 : d, c * s : c * s + d * (kw - 1) + 1 : d].flatten()
                        for r in range(H)
                        for c in range(W)
                    ]
                )
            else:
                a = inp.reshape(1, -1)
            if module.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            A[name] = A[name] + a.T @ a / a.shape[0]
        for k in range(3):
            grads = torch.autograd.grad(
                F.cross_entropy(z[None], torch.tensor([k])), [outputs[n] for n in layers], retain_graph=True
            )
            for name, g in zip(layers, grads):
                g = g[0].reshape(g.shape[1], -1).T if g.ndim == 4 else g.reshape(1, -1)  # (T, d_out)
                G[name] = G[name] + pi[k] * g.T @ g
    for name in layers:
        assert isinstance(factors[name], KroneckerFactors)
        torch.testing.assert_close(factors[name].A, A[name] / 4, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(factors[name].G, G[name] / 4, rtol=1e-10, atol=1e-13)


def test_kfac_is_the_dense_fisher_of_a_linear_gaussian_layer():
    """For z = W x + b with Gaussian noise G = I / sigma^2 does not depend on x, so G (x) A is exact."""
    torch.manual_seed(5)
    layer = nn.Linear(3, 2).double()
    model = nn.Sequential(OrderedDict(out=layer))
    x = torch.randn(50, 3, dtype=torch.float64)
    y = x @ torch.randn(3, 2, dtype=torch.float64) + 0.1 * torch.randn(50, 2, dtype=torch.float64)
    layers = select_layers(model)
    fd = prepare(model, (x, y), loss="lp", layers=layers, max_samples=None)
    factors = kfac_factors(model, fd, layers)["out"]
    dense = dense_fisher(model, fd, layers)["out"]  # order [W.flatten(), b]
    # G (x) A is in the row-major order of [W | b]; permute the dense block to that order.
    order = torch.tensor([0, 1, 2, 6, 3, 4, 5, 7])
    torch.testing.assert_close(torch.kron(factors.G, factors.A), dense[order][:, order], rtol=1e-10, atol=1e-14)


# ---- data handling ------------------------------------------------------------------------------


def test_prepare_subsamples_reproducibly_and_finds_the_output_layer():
    model = tiny_convnet()
    x, y = tiny_data(20)
    layers = select_layers(model)
    first = prepare(model, (x, y), layers=layers, max_samples=8, seed=3)
    again = prepare(model, (x, y), layers=layers, max_samples=8, seed=3)
    assert first.n_data == 20 and first.n_used == 8
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    rows = [int((x == row).all(dim=(1, 2, 3)).nonzero()) for row in first.x]
    assert len(set(rows)) == 8 and torch.equal(first.y, y[rows])
    assert first.output_layer == "fc"
    assert prepare(model, (x, y), layers=select_layers(model, ["conv1"])).output_layer is None


def test_prepare_rejects_bad_targets():
    model = tiny_convnet()
    x, y = tiny_data(6)
    with pytest.raises(InputError, match=r"class indices in y must lie in 0\.\.2"):
        prepare(model, (x, y + 1), layers=select_layers(model))
    with pytest.raises(InputError, match="integer class indices"):
        prepare(model, (x, y.double()), layers=select_layers(model))
    with pytest.raises(InputError, match="one target per input"):
        prepare(model, (x, y[:5]), layers=select_layers(model))
    with pytest.raises(InputError, match=r"y of shape \(6, 3\)"):
        prepare(model, (x, torch.randn(6)), loss="lp", layers=select_layers(model))
