"""Data-parallel training: 2 gloo processes on the CPU reproduce a single process on the whole batch.

Starting a process costs seconds (importing torch), so one spawn of two workers runs every job in
turn (explicit loss steps, the Trainer, the command line) and saves what each rank saw; the tests
compare it with single-process runs. The workers rendezvous through a file store (no listening
socket), except the command line, which uses torchrun's env:// variables with
MASTER_ADDR=127.0.0.1 and a free port; gloo is pinned to the loopback interface. The spawn has a
deadline and the process groups a timeout: a hang fails the tests instead of blocking them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anrat import ANRATLoss, NRAELoss, PlainLoss
from anrat.checkpoint import load_checkpoint
from anrat.data import Split
from anrat.distributed import GlobalBatchLoss, World, average_gradients, current_world, shard_batches, shard_bounds
from anrat.functional import per_sample_loss, tilted_mean
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.slow  # spawns two processes (seconds each to import torch)

WORLD_SIZE = 2
DEADLINE_S = 180
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- launching -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_gloo(rank: int, store: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on the loopback interface
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )


def _spawn(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, *args)`` in WORLD_SIZE spawned processes; fail on error or after DEADLINE_S."""
    with pytest.MonkeyPatch.context() as patch:
        # The children import this module by its pytest name (tests.anrat.test_distributed) and
        # inherit sys.path: the repository root must be on it.
        patch.syspath_prepend(str(REPO_ROOT))
        context = mp.start_processes(fn, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


# --- optimisation steps on explicit batches, in one process or data-parallel -------------------
BATCH_SIZES = (16, 13, 16, 1)  # 13: unequal shards (7 + 6); 1: rank 1's shard is empty
LOSS_CASES: dict[str, dict[str, Any]] = {
    "anrat lam=0.5": {"loss": "anrat", "lam": 0.5},
    "anrat lam=3": {"loss": "anrat", "lam": 3.0},
    "anrat lam=30": {"loss": "anrat", "lam": 30.0},
    "nrae lam=4": {"loss": "nrae", "lam": 4.0},
    "nrae lam=2 running": {"loss": "nrae", "lam": 2.0, "normalizer": "running"},
    "plain": {"loss": "plain"},
    # the exact loss in float32 at t = 1e-6, compared with the float64 single process
    "anrat lam=1e-3 float32": {"loss": "anrat", "lam": 1e-3, "a": 0.0, "dtype": torch.float32},
    # what the exact loss replaces: each rank's own NRAE, averaged by DDP (no empty shard allowed)
    "naive anrat lam=30": {"loss": "anrat", "lam": 30.0, "naive": True, "steps": 3},
}


def _global_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for m in BATCH_SIZES:
        x = torch.randn(m, 5, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), torch.randint(0, 3, (m,), generator=g)))
    return out


def _tiny_mlp(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _make_loss(case: dict[str, Any]) -> torch.nn.Module:
    if case["loss"] == "anrat":
        return ANRATLoss(init_lambda=case["lam"], p=2.0, a=case.get("a", 0.01))
    if case["loss"] == "nrae":
        return NRAELoss(case["lam"], p=2.0, normalizer=case.get("normalizer", "batch"))
    return PlainLoss()


def run_steps(case: dict[str, Any], world: World | None) -> dict[str, Any]:
    """SGD on BATCH_SIZES global batches: objective, lambda and gradients per step, final weights.

    With ``world`` the model is DDP-wrapped, each rank takes its shard of every batch and the
    loss is wrapped in GlobalBatchLoss (unless the case is naive); without it, the whole batch."""
    dtype = case.get("dtype", torch.float64)
    model = _tiny_mlp(dtype)
    loss = _make_loss(case).to(dtype)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.5)
    batches = _global_batches(dtype)[: case.get("steps")]
    step_model: torch.nn.Module = model
    criterion: torch.nn.Module = loss
    if world is not None:
        step_model = torch.nn.parallel.DistributedDataParallel(model)
        if not case.get("naive", False):
            criterion = GlobalBatchLoss(loss)
        batches = list(shard_batches(batches, world))
    record: dict[str, Any] = {"objective": [], "lam": [], "grads": [], "own_theta_grads": []}
    for x, y in batches:
        objective = criterion(step_model(x), y)
        optimizer.zero_grad()
        objective.backward()
        if isinstance(loss, ANRATLoss):  # this rank's theta gradient, before averaging
            record["own_theta_grads"].append(loss.theta.grad.item())
        if world is not None:
            average_gradients(loss.parameters())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads.update({f"loss.{n}": p.grad.clone() for n, p in loss.named_parameters()})
        record["grads"].append(grads)
        optimizer.step()
        record["objective"].append(objective.item())
        record["lam"].append(getattr(loss, "lam", None))
    record["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return record


def _assert_records_match(got: dict[str, Any], want: dict[str, Any], rel: float = 1e-5) -> None:
    assert got["objective"] == pytest.approx(want["objective"], rel=rel, abs=rel)
    if want["lam"][0] is not None:
        assert got["lam"] == pytest.approx(want["lam"], rel=rel)
    for step, grads in enumerate(want["grads"]):
        for name, value in grads.items():
            torch.testing.assert_close(
                got["grads"][step][name], value, rtol=rel, atol=rel, msg=f"step {step} grad {name}"
            )
    for name, value in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=rel, atol=rel, msg=name)


@pytest.mark.parametrize("name", [n for n, c in LOSS_CASES.items() if not c.get("naive") and "dtype" not in c])
def test_two_ranks_match_one_process_on_the_concatenated_batches(ddp_runs, name):
    single = run_steps(LOSS_CASES[name], None)
    for rank in range(WORLD_SIZE):
        got = ddp_runs[rank][name]
        _assert_records_match(got, single)
        gap = max(
            [abs(a - b) for a, b in zip(got["objective"], single["objective"])]
            + [(got["weights"][n] - w).abs().max().item() for n, w in single["weights"].items()]
            + [
                (got["grads"][i][n] - g).abs().max().item()
                for i, gs in enumerate(single["grads"])
                for n, g in gs.items()
            ]
        )
        print(f"{name}, rank {rank}: largest difference from one process {gap:.2g}")


def test_lambdas_gradient_needs_the_average_over_ranks(ddp_runs):
    """theta is not a DDP parameter, and its gradient is not the same on every rank: each rank
    holds W times the part through its own shard. Their mean is the single-process gradient."""
    single = run_steps(LOSS_CASES["anrat lam=3"], None)
    own = [ddp_runs[r]["anrat lam=3"]["own_theta_grads"] for r in range(WORLD_SIZE)]
    for step, want in enumerate(single["own_theta_grads"]):
        mean = sum(own[r][step] for r in range(WORLD_SIZE)) / WORLD_SIZE
        assert mean == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert max(abs(own[0][s] - own[1][s]) for s in range(len(own[0]))) > 1e-3 * max(map(abs, single["own_theta_grads"]))


def test_the_naive_per_rank_average_is_a_different_objective(ddp_runs):
    """The exact runs above do not match by accident: averaging each rank's own NRAE, which is
    what DDP does without the global reduction, differs by more than 1% and trains elsewhere."""
    name, t, penalty = "naive anrat lam=30", 30.0**2, 0.01 / 30.0
    exact = run_steps(LOSS_CASES[name], None)  # the same steps with the exact loss
    # First step: each rank's objective on its own shard, averaged over ranks as DDP averages ...
    naive_first = sum(ddp_runs[r][name]["objective"][0] for r in range(WORLD_SIZE)) / WORLD_SIZE
    # ... is the mean of the shards' NRAEs, while the exact loss is the NRAE of the whole batch.
    x, y = _global_batches(torch.float64)[0]
    losses = per_sample_loss(_tiny_mlp(torch.float64)(x), y).detach()
    shards = [losses[slice(*shard_bounds(len(losses), World(r, WORLD_SIZE)))] for r in range(WORLD_SIZE)]
    assert naive_first == pytest.approx(sum(tilted_mean(s, t).item() for s in shards) / WORLD_SIZE + penalty, rel=1e-9)
    assert exact["objective"][0] == pytest.approx(tilted_mean(losses, t).item() + penalty, rel=1e-9)
    relative_gap = abs(naive_first - exact["objective"][0]) / exact["objective"][0]
    print(f"naive per-rank average vs exact global NRAE at lambda=30: {relative_gap:.2%}")
    assert relative_gap > 0.01
    weight_gap = max((ddp_runs[0][name]["weights"][n] - w).abs().max().item() for n, w in exact["weights"].items())
    print(f"largest weight difference after 3 naive steps: {weight_gap:.3g}")
    assert weight_gap > 1e-3  # > 100x the tolerance the exact runs meet


def test_float32_at_tiny_t_keeps_the_stable_formulation(ddp_runs):
    """t = 1e-6 in float32: the cross-rank NRAE and the steps it drives match the float64 single
    process, where the textbook ``(logsumexp(t*l) - log m) / t`` is off by more than 1%."""
    name, t = "anrat lam=1e-3 float32", 1e-3**2
    reference = run_steps({**LOSS_CASES[name], "dtype": torch.float64}, None)
    for rank in range(WORLD_SIZE):
        got = ddp_runs[rank][name]
        assert got["objective"] == pytest.approx(reference["objective"], rel=1e-6)
        assert got["lam"] == pytest.approx(reference["lam"], rel=1e-6)
        for n, value in reference["weights"].items():
            torch.testing.assert_close(got["weights"][n].double(), value, rtol=1e-5, atol=1e-5, msg=n)
    x, y = _global_batches(torch.float32)[0]
    losses = per_sample_loss(_tiny_mlp(torch.float32)(x), y).detach()
    textbook = ((torch.logsumexp(t * losses, 0) - math.log(len(losses))) / t).item()
    textbook_error = abs(textbook - reference["objective"][0]) / reference["objective"][0]
    print(f"textbook float32 NRAE at t=1e-6 is off by {textbook_error:.1%}")
    assert textbook_error > 0.01


@pytest.mark.parametrize("name", ["anrat lam=3", "nrae lam=4", "nrae lam=2 running", "plain"])
def test_global_batch_loss_without_a_process_group_is_the_loss(name):
    """In one process the global batch is the local one: the wrapper's value and gradients (ANRAT's
    composed from the reduction's tilted mean, not its fused node) are the loss's own."""
    x, y = _global_batches(torch.float64)[0]
    records = []
    for wrap in (False, True):
        model, loss = _tiny_mlp(torch.float64), _make_loss(LOSS_CASES[name]).double()
        criterion = GlobalBatchLoss(loss) if wrap else loss
        for _ in range(2):  # the running normaliser's second step starts from its buffer
            value = criterion(model(x), y)
            grads = torch.autograd.grad(value, [*model.parameters(), *loss.parameters()])
        records.append((value, grads, dict(loss.named_buffers())))
    (value, grads, buffers), (wrapped_value, wrapped_grads, wrapped_buffers) = records
    torch.testing.assert_close(wrapped_value, value, rtol=1e-12, atol=0)
    for got, want in zip(wrapped_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    for buffer, want in buffers.items():
        torch.testing.assert_close(wrapped_buffers[buffer], want, rtol=1e-12, atol=0, equal_nan=True)


def test_shards_concatenate_to_the_global_batches():
    split = Split(torch.arange(23.0)[:, None], torch.arange(23))
    g = [torch.Generator().manual_seed(3) for _ in range(WORLD_SIZE + 1)]
    whole = list(split.batches(6, shuffle=True, generator=g[0]))
    parts = [
        list(shard_batches(split.batches(6, shuffle=True, generator=g[r + 1]), World(r, WORLD_SIZE)))
        for r in range(WORLD_SIZE)
    ]
    for i, (_, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
        assert [len(p[i][1]) for p in parts] == [len(y) - len(y) // 2, len(y) // 2]
    assert [shard_bounds(5, World(r, 3)) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [shard_bounds(1, World(r, 3)) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun",
        ),
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE must be an integer, got 'two'"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda or auto, not 'cuda:1'",
        ),
    ],
)
def test_bad_launch_environment_exits_2_with_one_line(env, message, monkeypatch, capsys, tmp_path):
    from anrat.train import main

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--device", "cuda:1", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not dist.is_initialized()


# --- the Trainer under two processes ---------------------------------------------------------
def _synthetic(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + x[:, 2] > 0.5).long()
    return Split(x, y)


def _make_trainer(out_dir: Path, seed_init: int, epochs: int) -> Trainer:
    torch.manual_seed(seed_init)
    model = build_model("mlp", in_features=6, hidden=[16], out_features=3)
    schedule = LambdaSchedule(ScheduleConfig(name="adaptive", lam0=3.0, a=0.01))
    config = TrainConfig(epochs=epochs, batch_size=32, lr=0.1, lambda_lr=0.1, momentum=0.9, seed=7)
    # 129 samples: 4 batches of 32 and one of 1 (rank 1's shard of it is empty)
    return Trainer(
        model,
        schedule,
        _synthetic(129, 0),
        _synthetic(50, 1),
        config,
        out_dir=out_dir,
        arch={"name": "mlp", "kwargs": {"in_features": 6, "hidden": [16], "out_features": 3}},
        progress=False,
    )


def _trainer_job(rank: int, out: Path) -> None:
    # Different initial weights on each rank: DDP starts every rank from rank 0's.
    first = _make_trainer(out, seed_init=rank, epochs=1)
    first.fit()
    # A restart: fresh trainers (other weights again) resume from last.pt on every rank.
    resumed = _make_trainer(out, seed_init=100 + rank, epochs=2)
    resumed.fit()
    torch.save({k: v.clone() for k, v in resumed.model.state_dict().items()}, out / f"selected{rank}.pt")


def test_trainer_on_two_ranks_matches_one_process_and_resumes(ddp_runs, tmp_path):
    out = ddp_runs["folder"] / "trainer"
    single = _make_trainer(tmp_path / "single", seed_init=0, epochs=2)
    single.fit()

    ddp_last, single_last = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    for name, value in single_last["state_dict"].items():
        torch.testing.assert_close(ddp_last["state_dict"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert ddp_last["lam"] == pytest.approx(single_last["lam"], rel=1e-5)
    assert ddp_last["epoch"] == 2 and ddp_last["step"] == single_last["step"] == 10
    assert len(ddp_last["rng"]["per_rank"]) == WORLD_SIZE
    selected = [torch.load(out / f"selected{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for name, value in single.model.state_dict().items():
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(selected[rank][name], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone wrote, and the resume kept epoch 1
    for got, want in zip(records, single.history):
        for key in ("train_objective", "train_loss", "train_max_loss", "lam", "val_loss", "val_error"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert (out / "best.pt").is_file()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []


# --- the command line under torchrun's environment ---------------------------------------------
def _cli_args(mnist_dir: str) -> list[str]:
    return [
        "--data-dir",
        mnist_dir,
        "--model",
        "mlp",
        "--hidden",
        "16",
        "--train-subset",
        "301",
        "--val-size",
        "200",
        "--test-subset",
        "200",
        "--schedule",
        "adaptive",
        "--lambda0",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--lr",
        "0.3",
        "--device",
        "cpu",
        "--no-progress",
    ]


def _cli_job(rank: int, port: int, mnist_dir: str, out: Path) -> None:
    """``python -m anrat.train`` as torchrun starts it: the env:// variables and nothing else."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
        }
    )
    from anrat.train import main

    assert main(_cli_args(mnist_dir) + ["--out", str(out)]) == 0
    assert not dist.is_initialized()  # run() left the group it joined


def test_cli_under_torchrun_environment_matches_one_process(ddp_runs, mnist_dir, tmp_path):
    from anrat.train import main

    assert main(_cli_args(str(mnist_dir)) + ["--out", str(tmp_path / "single")]) == 0
    ddp_out = ddp_runs["folder"] / "cli"
    for file in ("last.pt", "model.pt"):  # the last and the selected weights
        ddp, single = load_checkpoint(ddp_out / file), load_checkpoint(tmp_path / "single" / file)
        for name, value in single["state_dict"].items():
            torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-5, atol=1e-5, msg=f"{file} {name}")
    ddp_result = json.loads((ddp_out / "result.json").read_text())
    single_result = json.loads((tmp_path / "single" / "result.json").read_text())
    assert ddp_result["selected"]["best_epoch"] == single_result["selected"]["best_epoch"] >= 1
    assert ddp_result["test"]["loss"] == pytest.approx(single_result["test"]["loss"], rel=1e-5)
    assert ddp_result["test"]["error"] == pytest.approx(single_result["test"]["error"], abs=1e-9)
    assert len((ddp_out / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote


# --- the one spawn ---------------------------------------------------------------------------
def _worker(rank: int, folder: str, mnist_dir: str | None, port: int) -> None:
    out = Path(folder)
    _join_gloo(rank, str(out / "store"))
    try:
        world = current_world()
        assert world == World(rank, WORLD_SIZE)
        torch.save({name: run_steps(case, world) for name, case in LOSS_CASES.items()}, out / f"losses{rank}.pt")
        _trainer_job(rank, out / "trainer")
    finally:
        dist.destroy_process_group()
    if mnist_dir is not None:
        _cli_job(rank, port, mnist_dir, out / "cli")


@pytest.fixture(scope="module")
def ddp_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every job on two ranks; ``{"folder": where they wrote, rank: {loss case: run_steps record}}``."""
    try:
        mnist_dir: str | None = str(request.getfixturevalue("mnist_dir"))
    except pytest.skip.Exception:
        mnist_dir = None  # the command-line test skips; the others run
    folder = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    _spawn(_worker, str(folder), mnist_dir, _free_port())
    print(f"two-rank jobs took {time.monotonic() - start:.1f} s")
    runs: dict[Any, Any] = {"folder": folder}
    runs.update({rank: torch.load(folder / f"losses{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)})
    return runs
