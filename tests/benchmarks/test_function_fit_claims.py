"""``benchmarks/function_fit_claims.py``: its diagnostics certify a minimum where there is one, and
a stack's records are the runs asked for."""

from __future__ import annotations

import pytest
import torch

from anrat.function_problems import make_problem


@pytest.fixture(scope="module")
def claims(load_benchmark):
    return load_benchmark("function_fit_claims")


def test_diagnostics_find_the_global_minimum_stationary_and_a_random_point_not(claims):
    problem = make_problem("relu_sum", 0, k=4, num_samples=300)
    at_minimum = claims.mse_diagnostics(problem, problem.reference_state)
    assert at_minimum["grad_norm"] < 1e-6
    assert at_minimum["min_hessian_eigenvalue"] > -1e-8  # positive semi-definite
    torch.manual_seed(0)
    elsewhere = claims.mse_diagnostics(problem, problem.build_model().state_dict())
    assert elsewhere["grad_norm"] > 1e-2


def test_a_stack_returns_one_record_per_run_with_each_methods_schedule(claims):
    runs = [("mse", 1e-2, 0), ("nrae_t1", 1e-2, 0), ("deconvex_lambda", 1e-2, 1)]
    records = claims.train_stack(("parity", "adam", runs, 20, True))
    assert [(r["method"], r["seed"]) for r in records] == [("mse", 0), ("nrae_t1", 0), ("deconvex_lambda", 1)]
    assert all(r["final_error"] is not None and r["final_error"] > 0 for r in records)
    assert records[1]["final_lambda"] == pytest.approx(1.0)  # t = 1 fixed
    failed_mse = [r for r in records if r["method"] == "mse" and not r["success"]]
    assert all("grad_norm" in r and "min_hessian_eigenvalue" in r for r in failed_mse)
    jobs = claims.stacks({("parity", "gd"): [("mse", 0.1, 0), ("deconvex_ess", 0.1, 0)]}, 20, False)
    assert [[run[0] for run in job[2]] for job in jobs] == [["mse"], ["deconvex_ess"]]  # ess in its own stack
