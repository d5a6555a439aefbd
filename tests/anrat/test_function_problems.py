"""The function-fitting problems: deterministic from a seed, and their known global minimum is real."""

import pytest
import torch

from anrat.errors import InputError
from anrat.function_problems import PROBLEMS, make_problem
from anrat.models import build_model
from anrat.trainer import evaluate


def training_mse(model: torch.nn.Module, problem) -> float:
    return evaluate(model, problem.train, kind="lp", p=2.0)["loss"]


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_same_seed_gives_the_same_tensors(name):
    a, b = make_problem(name, seed=3), make_problem(name, seed=3)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.reference_state.keys() == b.reference_state.keys()
    for key in a.reference_state:
        assert torch.equal(a.reference_state[key], b.reference_state[key])
    assert a.metadata() == b.metadata()


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_different_seeds_give_different_tensors(name):
    a, b = make_problem(name, seed=0), make_problem(name, seed=1)
    assert a.train.x.shape == b.train.x.shape
    assert not torch.equal(a.train.x, b.train.x)
    if name != "parity":  # parity's data set is fixed; its seed only orders the patterns
        assert not torch.equal(a.train.y, b.train.y)


def test_parity_seed_only_reorders_the_patterns():
    a, b = make_problem("parity", seed=0, bits=5), make_problem("parity", seed=1, bits=5)
    key = lambda p: sorted(map(tuple, torch.cat([p.train.x, p.train.y], dim=1).tolist()))
    assert key(a) == key(b)
    assert len(set(map(tuple, a.train.x.tolist()))) == 32  # all patterns, each once


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_targets_are_standardised(name):
    y = make_problem(name, seed=2).train.y.double()
    assert y.shape[1] == 1
    assert abs(float(y.mean())) < 1e-6
    assert float(y.var(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_teacher_weights_loaded_into_the_student_attain_the_global_minimum():
    problem = make_problem("teacher", seed=5)
    assert problem.global_minimum == 0.0
    student = build_model(problem.arch["name"], **problem.arch["kwargs"])  # the student architecture
    assert training_mse(student, problem) > 0.1  # a random student is far from the minimum
    student.load_state_dict(problem.reference_state)  # the teacher's weights: same shapes, strict
    assert training_mse(student, problem) < 1e-10
    # The teacher is a ReLU network of orthonormal rows, as documented.
    w1 = problem.reference_state["fc1.weight"].double()
    assert torch.allclose(w1 @ w1.T, torch.eye(w1.shape[0], dtype=torch.float64), atol=1e-6)
    assert problem.arch["kwargs"]["activation"] == "relu"


@pytest.mark.parametrize("name", ["wave", "parity"])
def test_reference_weights_attain_the_global_minimum(name):
    problem = make_problem(name, seed=4)
    model = problem.reference_model()
    assert training_mse(model, problem) < 1e-10
    # ... and it is a sharp minimum of the data, not a flat function that fits anything.
    with torch.no_grad():
        model.fc2.weight.mul_(0.9)
    assert training_mse(model, problem) > 1e-3


def test_targets_follow_their_definitions():
    parity = make_problem("parity", seed=0, bits=6)
    odd = parity.train.x.sum(dim=1) % 2 == 1
    assert torch.equal(parity.train.y.reshape(-1), torch.where(odd, 1.0, -1.0))

    wave = make_problem("wave", seed=0, hidden=8)
    order = wave.train.x.reshape(-1).argsort()
    y = wave.train.y.reshape(-1)[order]
    crossings = int((torch.sign(y[1:]) != torch.sign(y[:-1])).sum())
    assert crossings == 8  # 8 transitions: 4 periods on [-1, 1]


def test_problems_record_their_metadata():
    problem = make_problem("wave", seed=0)
    meta = problem.metadata()
    assert meta["threshold"] == problem.threshold > 0
    assert meta["global_minimum"] == 0.0
    assert meta["num_samples"] == len(problem.train) == 256
    assert meta["arch"]["kwargs"]["hidden"] == [8]


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="unknown problem"):
        make_problem("spirals")
    with pytest.raises(InputError, match="bits"):
        make_problem("parity", bits=0)
    with pytest.raises(InputError, match="bad arguments"):
        make_problem("teacher", width=3)


def test_relu_sum_is_safran_and_shamirs_network_and_its_teacher_fits_exactly():
    problem = make_problem("relu_sum", seed=4, k=6, num_samples=500)
    student = problem.build_model()
    assert [name for name, _ in student.named_parameters()] == ["fc1.weight"]  # rows only: no biases
    assert student.fc1.weight.shape == (6, 6)
    assert training_mse(student, problem) > 0.1
    student.load_state_dict(problem.reference_state)
    assert training_mse(student, problem) < 1e-10
    w = problem.reference_state["fc1.weight"].double()
    assert torch.allclose(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-6)
    # the output is the sum of the units, standardised by constants of the architecture
    x = problem.train.x[:5]
    raw = torch.relu(x.double() @ w.T).sum(dim=1, keepdim=True)
    kwargs = problem.arch["kwargs"]
    expected = raw * kwargs["scale"] + kwargs["shift"]
    assert torch.allclose(student(x).double(), expected, atol=1e-5)
    assert torch.allclose(expected.float(), problem.train.y[:5], atol=1e-5)
