"""The function-fitting study: does convexification escape poor local minima? (``python -m anrat.recipes.function_fit``)

The small MLPs of :mod:`anrat.function_problems` (a student-teacher problem, a one-dimensional
wave, N-bit parity, Safran & Shamir's sum of ReLUs: each has a known global minimum of 0) are
trained from many initial seeds with several methods under the same optimizer and the same number
of full-batch gradient steps; per problem and method the study reports how often the final
training error falls below the problem's threshold, the median and worst final errors, and the
number of steps to the threshold. Every method starts each seed from the same initial weights, so
the comparison is paired.

Methods (settings fixed once, from the library's defaults and the reasoning in the docstring of
:class:`Settings`, never from the results):

- ``mse``: the plain mean squared error.
- ``nrae``: NRAE at a fixed lambda.
- ``anrat``: ANRAT, lambda learned with the weights (penalty ``a * lambda^(-q)``).
- ``deconvex``: convexification then deconvexification: NRAE with lambda annealed geometrically
  from ``lam`` down to ``anneal_end`` over the first ``anneal_fraction`` of the budget, then the
  plain MSE for the rest.
- ``excursions`` (not in the default set): Lo et al.'s NRAE-MSE method, NRAE at the fixed ``lam``
  with excursions of ``plain_steps`` steps of the plain MSE at the end of every ``period`` steps.

Engines: ``"batched"`` trains the runs of each problem as one vectorised model
(:mod:`anrat.batched`; the same runs up to float rounding, which long runs amplify: on the default
study every run succeeded or failed alike, and the final errors of a quarter of the runs differed
by more than 0.1%, docs/results/batched-trainer.md); ``"loop"`` is the reference, one training loop per run.

:func:`run` writes to its folder ``results.json`` (settings, problems, every run with its final
error and a subsampled training curve, and the summary), ``results.md`` (the table),
``errors.png`` (final errors per method, one panel per problem, log scale) and ``curves.png``
(training curves of the first seeds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import torch
from scipy.stats import binomtest
from tqdm.auto import tqdm

from anrat.atomic_files import write_text_atomic
from anrat.batched import BatchedTrainer, Member
from anrat.errors import InputError
from anrat.function_problems import FunctionProblem, make_problem
from anrat.machine import describe_machine
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer, TrainingDiverged

METHODS = ("mse", "nrae", "anrat", "deconvex", "excursions")
DEFAULT_METHODS = METHODS[:4]  # the study as first run and reported; excursions on request
METHOD_LABELS = {
    "mse": "MSE",
    "nrae": "NRAE (fixed lambda)",
    "anrat": "ANRAT",
    "deconvex": "convex -> deconvex",
    "excursions": "NRAE-MSE excursions",
}
SHORT_LABELS = {
    "mse": "MSE",
    "nrae": "NRAE\nfixed λ",
    "anrat": "ANRAT",
    "deconvex": "convex→\ndeconvex",
    "excursions": "NRAE-MSE\nexcursions",
}
DEFAULT_SEEDS, DEFAULT_STEPS = 20, 2000
FULL_SEEDS, FULL_STEPS = 50, 5000
PROBLEM_SEED = 0  # every initial seed fits the same problem instance
CURVE_POINTS = 80  # points kept per training curve (log-spaced steps)
ERROR_FLOOR = 1e-15  # smallest error drawn on the log-scale plot


@dataclass(frozen=True)
class Settings:
    """The settings of every method, chosen once before any NRAE/ANRAT run and never tuned.

    - Optimizer: Adam, learning rate 1e-2, full batch, for all methods (the same steps for all).
      Adam rather than the paper's plain SGD so that one learning rate suits problems whose
      gradients differ by orders of magnitude; it is the same for every method.
    - ``lam`` = 10, so t = lambda^p = 100 with p = 2 (the library's default lambda): targets have
      unit variance, so a sample whose squared error is a few per cent of the variance (the size
      of the errors left by a poor minimum) gets exp(100 * 0.05) ~ 150 times the weight of a
      fitted one, a strong convexification, while errors below 1/t = 0.01 are only mildly tilted.
    - ANRAT: initial lambda ``lam``, penalty ``a * lambda^(-q)`` with the library's defaults
      a = 0.01, q = 1, lambda's learning rate 1e-3 (the trainer's default, 0.1 times the weights'),
      lambda = exp(theta).
    - Deconvexification: lambda annealed geometrically from ``lam`` to ``anneal_end`` = 1 (t = 1,
      where NRAE is within a variance term of the MSE) over the first half of the budget
      (``anneal_fraction``), then the plain MSE: half the steps to convexify, half to fit.
    - Excursions (Lo et al.'s NRAE-MSE method): NRAE at ``lam`` with ``plain_steps`` = 20 steps of
      the plain MSE closing every ``period`` = 200 steps (the library's defaults,
      :class:`~anrat.schedules.ScheduleConfig`): a tenth of the budget on the plain MSE.
    """

    optimizer: str = "adam"
    lr: float = 1e-2
    p: float = 2.0
    lam: float = 10.0
    a: float = 0.01
    q: float = 1.0
    lambda_lr: float = 1e-3
    anneal_end: float = 1.0
    anneal_fraction: float = 0.5
    period: int = 200
    plain_steps: int = 20


SETTINGS = Settings()


def schedule_config(method: str, steps: int, settings: Settings = SETTINGS) -> ScheduleConfig:
    """The lambda schedule of ``method`` for a run of ``steps`` full-batch steps (one step per epoch)."""
    s = settings
    base = dict(kind="lp", p=s.p, lam0=s.lam)
    if method == "mse":
        return ScheduleConfig(name="plain", **base)
    if method == "nrae":
        return ScheduleConfig(name="fixed", **base)
    if method == "anrat":
        return ScheduleConfig(name="adaptive", a=s.a, q=s.q, parameterization="log", **base)
    if method == "deconvex":
        # Full batch: one epoch is one step. lam_e = lam * gamma^e reaches anneal_end after
        # anneal_fraction * steps steps; the schedule switches to the plain loss for good once
        # lambda is below anneal_end (lam_min only has to lie below it).
        anneal_steps = max(1.0, s.anneal_fraction * steps)
        gamma = (s.anneal_end / s.lam) ** (1.0 / anneal_steps)
        return ScheduleConfig(name="anneal", gamma=gamma, lam_min=s.anneal_end / 10, switch_below=s.anneal_end, **base)
    if method == "excursions":
        # Full batch: the schedule's step count is the number of gradient steps.
        return ScheduleConfig(name="excursions", period=s.period, plain_steps=s.plain_steps, **base)
    raise InputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _curve_steps(steps: int) -> list[int]:
    """Log-spaced step counts 0..steps at which a training curve is kept."""
    points = {0, steps}
    for i in range(CURVE_POINTS):
        points.add(int(round(steps ** (i / (CURVE_POINTS - 1)))))
    return sorted(p for p in points if 0 <= p <= steps)


def train_config(problem: FunctionProblem, seed: int, steps: int, settings: Settings = SETTINGS) -> TrainConfig:
    """The optimisation settings of one run: ``steps`` full-batch steps (one per epoch)."""
    return TrainConfig(
        epochs=steps,
        batch_size=len(problem.train),
        lr=settings.lr,
        lambda_lr=settings.lambda_lr,
        optimizer=settings.optimizer,
        seed=seed,
        lam_samples_per_epoch=1,
    )


def run_record(
    problem: FunctionProblem,
    method: str,
    seed: int,
    steps: int,
    errors: list[float],
    final: float | None,
    lam: float | None,
    switch_step: int | None,
    seconds: float,
) -> dict[str, Any]:
    """The record of one run from its training MSE before each step (``errors``) and its final
    MSE (None: it diverged): success, the first step count after which the MSE was below the
    threshold, and the MSE after the log-spaced step counts of :func:`_curve_steps`."""
    errors = errors + ([final] if final is not None else [])
    below = [k for k, e in enumerate(errors) if e is not None and math.isfinite(e) and e < problem.threshold]
    curve = [[k, errors[k]] for k in _curve_steps(steps) if k < len(errors)]
    return {
        "problem": problem.name,
        "method": method,
        "seed": seed,
        "steps": steps,
        "final_error": final,
        "diverged": final is None,
        "success": final is not None and final < problem.threshold,
        "steps_to_threshold": below[0] if below else None,
        "final_lambda": lam,
        "switch_step": switch_step,
        "seconds": seconds,
        "curve": curve,
    }


def train_one(
    problem: FunctionProblem, method: str, seed: int, steps: int, settings: Settings = SETTINGS
) -> dict[str, Any]:
    """Train one student from initial seed ``seed`` with ``method`` for ``steps`` full-batch steps.

    Returns the run record (:func:`run_record`; ``final_error`` None if training diverged).
    """
    torch.manual_seed(seed)  # same initial weights for every method
    model = problem.build_model()
    schedule = LambdaSchedule(schedule_config(method, steps, settings))
    trainer = Trainer(
        model,
        schedule,
        problem.train,
        None,
        train_config(problem, seed, steps, settings),
        out_dir=None,
        arch=problem.arch,
        progress=False,
    )
    start = time.perf_counter()
    try:
        trainer.fit()
        final = trainer.evaluate(problem.train)["loss"]
    except TrainingDiverged:
        final = None
    # Full batch: epoch k's train_loss is the MSE after k-1 steps (measured before its step).
    errors = [record["train_loss"] for record in trainer.history]
    return run_record(
        problem, method, seed, steps, errors, final, schedule.lam, schedule.switch_epoch, time.perf_counter() - start
    )


def train_batched(
    problem: FunctionProblem, runs: Sequence[tuple[str, int]], steps: int, settings: Settings = SETTINGS
) -> list[dict[str, Any]]:
    """The runs ``(method, seed)`` on ``problem`` trained as one :class:`~anrat.batched.BatchedTrainer`:
    the records of :func:`train_one` to float rounding (``seconds``: the run's time over its members).

    A member that diverges is frozen and the others go on; its record ends, as :func:`train_one`'s,
    before the step that diverged (its ``final_lambda`` is the last finite one).
    """
    members = [
        Member(train_config(problem, seed, steps, settings), schedule_config(method, steps, settings))
        for method, seed in runs
    ]
    batched = BatchedTrainer(problem.build_model, members, problem.train, None, arch=problem.arch)
    start = time.perf_counter()
    result = batched.fit()
    finals = batched.evaluate(problem.train)
    seconds = (time.perf_counter() - start) / len(runs)
    records = []
    for k, (method, seed) in enumerate(runs):
        stop = result.diverged_epoch.get(k)
        history = batched.history if stop is None else batched.history[: stop - 1]
        errors = [record["train_loss"][k] for record in history]
        schedule = batched.schedules[k]
        records.append(
            run_record(
                problem,
                method,
                seed,
                steps,
                errors,
                None if stop else finals[k]["loss"],
                schedule.lam,
                schedule.switch_epoch,
                seconds,
            )
        )
    return records


# --- running many: in this process or in worker processes ------------------------------------
_PROBLEM_CACHE: dict[str, FunctionProblem] = {}


def _problem(name: str) -> FunctionProblem:
    if name not in _PROBLEM_CACHE:
        _PROBLEM_CACHE[name] = make_problem(name, PROBLEM_SEED)
    return _PROBLEM_CACHE[name]


def _run_task(task: tuple[str, str, int, int]) -> dict[str, Any]:
    problem, method, seed, steps = task
    return train_one(_problem(problem), method, seed, steps)


def _pool_context() -> BaseContext:
    """Worker processes forked from this one where the platform allows it (Linux; CUDA not yet
    initialised here), else spawned. A forked worker starts at once with torch already imported;
    a spawned one spends seconds importing it again, which the batched engine's short run feels
    (measured: ~3 s of 32 s). The networks are CPU tensors and each worker uses one thread."""
    if sys.platform == "linux" and not torch.cuda.is_initialized():
        return get_context("fork")
    return get_context("spawn")


def _init_worker() -> None:
    torch.set_num_threads(1)  # the networks are tiny: one thread per process, one process per core


def _run_problem(job: tuple[str, list[tuple[str, int]], int]) -> list[dict[str, Any]]:
    name, runs, steps = job
    return train_batched(_problem(name), runs, steps)


def _run_problems(
    jobs: dict[str, tuple[str, list[tuple[str, int]], int]], workers: int
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(problem, records) of each batched job as it finishes: in this process, or spread over
    ``workers`` processes; one thread each way."""
    if workers == 1 or len(jobs) == 1:
        torch.set_num_threads(1)
        for name, job in jobs.items():
            yield name, _run_problem(job)
        return
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_pool_context(), initializer=_init_worker) as pool:
        futures = {pool.submit(_run_problem, job): name for name, job in jobs.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def run_all(
    tasks: list[tuple[str, str, int, int]], workers: int, progress: bool, engine: str = "loop"
) -> list[dict[str, Any]]:
    """Every task's run record, in the order of ``tasks`` (results do not depend on ``workers``).

    ``engine="loop"``: one training loop per task (the reference); ``"batched"``: the tasks of
    each problem as one vectorised run (:func:`train_batched`), the problems spread over the
    workers. Either way every process computes with one thread, so results do not depend on
    ``workers``: intra-op threads barely help these tiny networks, while two processes use both
    cores fully (docs/results/batched-trainer.md).
    """
    bar = tqdm(total=len(tasks), desc="runs", unit="run", disable=not progress)
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    threads = torch.get_num_threads()
    try:
        if engine == "batched":
            jobs: dict[str, tuple[str, list[tuple[str, int]], int]] = {}
            where: dict[str, list[int]] = {}
            for i, (name, method, seed, steps) in enumerate(tasks):
                where.setdefault(name, []).append(i)
                jobs.setdefault(name, (name, [], steps))[1].append((method, seed))
            for name, records in _run_problems(jobs, workers):
                for i, record in zip(where[name], records):
                    results[i] = record
                bar.update(len(records))
        elif workers == 1:
            # One thread, as in the workers: on a busy machine, intra-op threads make these tiny
            # steps many times slower (measured: 32 ms against 1.3 ms per step on 2 shared cores).
            torch.set_num_threads(1)
            for i, task in enumerate(tasks):
                results[i] = _run_task(task)
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker) as pool:
                futures = {pool.submit(_run_task, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return [r for r in results if r is not None]


# --- reporting ----------------------------------------------------------------------------
def summarise(
    runs: list[dict[str, Any]], problems: dict[str, FunctionProblem], methods: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per problem and method: success rate, median/worst/best final error, steps to threshold,
    and, against MSE on the same seeds, the seeds won and lost and the exact McNemar p-value
    (two-sided binomial test on the discordant seeds)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name, problem in problems.items():
        summary[name] = {}
        by_method = {m: {r["seed"]: r for r in runs if r["problem"] == name and r["method"] == m} for m in methods}
        for method in methods:
            rs = list(by_method[method].values())
            finals = [r["final_error"] for r in rs if r["final_error"] is not None]
            reached = [r["steps_to_threshold"] for r in rs if r["steps_to_threshold"] is not None]
            successes = sum(r["success"] for r in rs)
            entry: dict[str, Any] = {
                "runs": len(rs),
                "successes": successes,
                "success_rate": successes / len(rs) if rs else None,
                "diverged": sum(r["diverged"] for r in rs),
                "median_error": statistics.median(finals) if finals else None,
                "worst_error": (None if any(r["diverged"] for r in rs) or not finals else max(finals)),
                "best_error": min(finals) if finals else None,
                "reached_threshold": len(reached),
                "median_steps_to_threshold": statistics.median(reached) if reached else None,
                "threshold": problem.threshold,
            }
            if method != "mse" and "mse" in by_method:
                seeds = sorted(set(by_method[method]) & set(by_method["mse"]))
                wins = sum(by_method[method][s]["success"] and not by_method["mse"][s]["success"] for s in seeds)
                losses = sum(by_method["mse"][s]["success"] and not by_method[method][s]["success"] for s in seeds)
                entry["vs_mse"] = {
                    "seeds_won": wins,
                    "seeds_lost": losses,
                    "mcnemar_p": binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0,
                }
            summary[name][method] = entry
    return summary


def _fmt(value: float | None, diverged: int = 0) -> str:
    if diverged:
        return f"diverged ({diverged})"
    return "-" if value is None else f"{value:.2e}"


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]], problems: dict[str, FunctionProblem]) -> str:
    """The summary as a markdown table (one row per problem and method)."""
    lines = [
        "| Problem | Method | Success (final MSE < threshold) | Median final MSE | Worst final MSE "
        "| Reached threshold | Median steps to threshold | Seeds won / lost vs MSE (McNemar p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_method in summary.items():
        for method, e in by_method.items():
            vs = e.get("vs_mse")
            vs_text = "-" if vs is None else f"{vs['seeds_won']} / {vs['seeds_lost']} (p = {vs['mcnemar_p']:.2g})"
            steps = e["median_steps_to_threshold"]
            lines.append(
                f"| {name} (< {problems[name].threshold:g}) | {METHOD_LABELS[method]} "
                f"| {e['successes']}/{e['runs']} ({e['success_rate']:.0%}) | {_fmt(e['median_error'])} "
                f"| {_fmt(e['worst_error'], e['diverged'])} | {e['reached_threshold']}/{e['runs']} "
                f"| {'-' if steps is None else f'{steps:g}'} | {vs_text} |"
            )
    return "\n".join(lines) + "\n"


def plot_errors(
    runs: list[dict[str, Any]], problems: dict[str, FunctionProblem], methods: Sequence[str], path: Path
) -> None:
    """Final training MSE of every run, per method (jittered points, median bar), one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 4.2), squeeze=False)
    for ax, (name, problem) in zip(axes[0], problems.items()):
        top, bottom = ERROR_FLOOR, problem.threshold
        for i, method in enumerate(methods):
            rs = sorted((r for r in runs if r["problem"] == name and r["method"] == method), key=lambda r: r["seed"])
            finals = [max(r["final_error"], ERROR_FLOOR) for r in rs if r["final_error"] is not None]
            jitter = [i + 0.25 * (((r["seed"] * 0.618034) % 1.0) - 0.5) for r in rs if r["final_error"] is not None]
            ax.scatter(jitter, finals, s=14, alpha=0.7, color=f"C{i}")
            if finals:
                ax.hlines(statistics.median(finals), i - 0.3, i + 0.3, color="k", linewidth=1.5)
                top, bottom = max(top, max(finals)), min(bottom, min(finals))
            n_div = sum(r["diverged"] for r in rs)
            if n_div:
                ax.annotate(
                    f"{n_div} diverged",
                    (i, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="C3",
                )
        ax.axhline(
            problem.threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {problem.threshold:g}"
        )
        ax.set_yscale("log")
        ax.set_ylim(bottom / 10, max(10.0, top * 3))
        ax.set_xticks(range(len(methods)), [SHORT_LABELS[m] for m in methods], fontsize=8)
        ax.set_title(f"{name}\n" + textwrap.fill(problem.description, 64), fontsize=7)
        ax.set_ylabel("final training MSE (units of target variance)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Final training error per initial seed (bar: median); lower is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    runs: list[dict[str, Any]],
    problems: dict[str, FunctionProblem],
    methods: Sequence[str],
    seeds: Sequence[int],
    path: Path,
) -> None:
    """Training MSE against steps for the given seeds, one panel per problem, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 4.0), squeeze=False)
    for ax, (name, problem) in zip(axes[0], problems.items()):
        for i, method in enumerate(methods):
            for j, seed in enumerate(seeds):
                r = next(
                    (r for r in runs if r["problem"] == name and r["method"] == method and r["seed"] == seed), None
                )
                if r is None or not r["curve"]:
                    continue
                steps, errors = zip(*r["curve"])
                ax.plot(
                    [s + 1 for s in steps],
                    [max(e, ERROR_FLOOR) for e in errors],
                    color=f"C{i}",
                    linestyle=styles[j % len(styles)],
                    linewidth=1,
                    label=f"{METHOD_LABELS[method]}, seed {seed}",
                )
        ax.axhline(problem.threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient steps + 1")
        ax.set_ylabel("training MSE")
        ax.set_title(name, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=min(4, len(handles)))
        fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(handles) / 4), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    problems: Sequence[str],
    methods: Sequence[str],
    seeds: int,
    steps: int,
    out: str | os.PathLike[str],
    workers: int = 1,
    progress: bool = True,
    command: str | None = None,
    engine: str = "batched",
) -> dict[str, Any]:
    """Train every (problem, method, seed), then write results.json, results.md, errors.png, curves.png."""
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    built = {name: make_problem(name, PROBLEM_SEED) for name in problems}
    tasks = [(p, m, s, steps) for s in range(seeds) for p in problems for m in methods]
    start = time.perf_counter()
    runs = run_all(tasks, workers, progress, engine)
    elapsed = time.perf_counter() - start
    summary = summarise(runs, built, methods)
    result = {
        "command": command,
        "settings": asdict(SETTINGS),
        "seeds": seeds,
        "steps": steps,
        "methods": list(methods),
        "problem_seed": PROBLEM_SEED,
        "problems": {name: p.metadata() for name, p in built.items()},
        "schedules": {m: asdict(schedule_config(m, steps)) for m in methods},
        "engine": engine,
        "machine": {**describe_machine(), "workers": workers},
        "wall_seconds": elapsed,
        "summary": summary,
        "runs": runs,
    }
    write_text_atomic(out_dir / "results.json", json.dumps(result, indent=1))
    table = markdown_table(summary, built)
    write_text_atomic(
        out_dir / "results.md",
        f"# Function fitting from {seeds} seeds, {steps} full-batch steps\n\nCommand: `{command}`\n\n{table}",
    )
    plot_errors(runs, built, methods, out_dir / "errors.png")
    plot_curves(runs, built, methods, list(range(min(seeds, 2))), out_dir / "curves.png")
    return result
