"""Cost of ANRAT over cross-entropy: seconds per training step, and one epoch through the trainer.

Baselines, measured side by side in the same process:
1. Step: forward + loss + backward + SGD step on the same batch, with ``nn.CrossEntropyLoss``
   (baseline), with :class:`anrat.ANRATLoss` (per-sample losses, NRAE, lambda's gradient and
   update) and with :class:`anrat.ESSLoss` (the tilt solved from each batch, rho 0.5). Reported
   for lenet5 and an MLP. Targets: ANRAT's ratio <= 1.05; ess's eager ratio on lenet5 <= 1.10.
   With ``--compile`` every side is also timed with the forward pass and loss under
   ``torch.compile`` (as ``--compile`` of ``anrat.train`` does), and each compiled criterion is
   also set against eager cross-entropy.
2. Epoch: one epoch of MNIST-sized data through :class:`anrat.trainer.Trainer` (ANRAT schedule)
   against a bare PyTorch loop over the same on-device tensors (same batches, ANRAT loss, no
   metrics/checkpoints/progress). Target: ratio <= 1.10.

Timings alternate between the sides in rounds; a step ratio is the median of the per-round
ratios, so drift of the machine affects both sides alike, and its quartiles show the spread.

    python benchmarks/step_overhead.py [--batch-size 64] [--rounds 40] [--compile [MODE]] \
        [--device auto] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anrat import ANRATLoss, ESSLoss
from anrat.data import Split, load_dataset
from anrat.devices import resolve_device
from anrat.functional import TiltedBackend, per_sample_loss
from anrat.machine import machine_line
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import COMPILE_MODES, TrainConfig, Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def make_side(
    loss: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    compile_mode: str | None,
    backend: TiltedBackend,
):
    """``(objective, optimizer)`` of one side: cross-entropy ("ce"), ANRAT ("anrat", its tilted mean
    on ``backend``) or the scale-free tilt ("ess", :class:`anrat.ESSLoss` at rho 0.5, as a user
    drops it in for ``nn.CrossEntropyLoss``) on ``model``, the forward pass and loss compiled in
    ``compile_mode`` unless it is None."""
    if loss == "ce":
        ce = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        objective = lambda: ce(model(x), y)  # noqa: E731
    elif loss == "ess":
        ess = ESSLoss(rho=0.5, backend=backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        objective = lambda: ess(model(x), y)  # noqa: E731
    else:
        anrat = ANRATLoss(init_lambda=10.0, backend=backend).to(x.device)
        optimizer = torch.optim.SGD(
            [{"params": model.parameters()}, {"params": anrat.parameters(), "lr": 0.001}], lr=0.01
        )
        objective = lambda: anrat.aggregate(per_sample_loss(model(x), y))  # noqa: E731
    if compile_mode is not None:
        objective = torch.compile(objective, mode=compile_mode)
    return objective, optimizer


def twin_models(name: str, model_kwargs: dict, n: int, device: torch.device) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    reference = build_model(name, **model_kwargs).to(device)
    models = [build_model(name, **model_kwargs).to(device) for _ in range(n)]
    for model in models:
        model.load_state_dict(reference.state_dict())
    return models


def step_benchmark(
    name: str,
    model_kwargs: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    rounds: int,
    steps: int,
    compile_mode: str | None,
    backend: TiltedBackend,
    criteria: tuple[str, ...] = ("anrat", "ess"),
) -> dict:
    """Seconds per step of each side (median of rounds) and each criterion's ratio to
    cross-entropy: the median of the per-round ratios (each round times every side back to back, so
    a slow spell of the machine enters both terms of a ratio), with its quartiles."""
    device = x.device
    plan = [("ce", "ce", None)] + [(c, c, None) for c in criteria]
    if compile_mode is not None:
        plan += [("ce compiled", "ce", compile_mode)] + [(f"{c} compiled", c, compile_mode) for c in criteria]
    sides = {}
    for (side, loss, mode), model in zip(plan, twin_models(name, model_kwargs, len(plan), device)):
        objective, optimizer = make_side(loss, model, x, y, mode, backend)

        def step(objective=objective, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            objective().backward()
            optimizer.step()

        sides[side] = step
    for step in sides.values():  # warm-up (and compilation)
        for _ in range(steps):
            step()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            times[side].append(time_steps(step, steps, device))

    def ratio(num: str, den: str) -> dict:
        q1, median, q3 = statistics.quantiles([a / b for a, b in zip(times[num], times[den])], n=4)
        return {
            "num_s": statistics.median(times[num]),
            "den_s": statistics.median(times[den]),
            "ratio": median,
            "q1": q1,
            "q3": q3,
        }

    rows = {f"{c} eager": ratio(c, "ce") for c in criteria}
    if compile_mode is not None:
        for c in criteria:
            rows[f"{c} compiled"] = ratio(f"{c} compiled", "ce compiled")
            rows[f"{c} compiled / eager CE"] = ratio(f"{c} compiled", "ce")
    return rows


PHASES = ("zero_grad", "forward + loss", "backward", "optimizer step")


def phase_benchmark(
    name: str, model_kwargs: dict, x: torch.Tensor, y: torch.Tensor, steps: int, backend: TiltedBackend
) -> dict:
    """Eager seconds of each phase of a step (median over ``steps`` steps, the two sides alternating
    step by step): where ANRAT's extra time goes."""
    device = x.device
    models = twin_models(name, model_kwargs, 2, device)
    sides = {loss: make_side(loss, model, x, y, None, backend) for loss, model in zip(("ce", "anrat"), models)}
    times = {loss: {phase: [] for phase in PHASES} for loss in sides}
    for i in range(steps + 20):  # the first 20 steps warm up
        for loss, (objective, optimizer) in sides.items():
            sync(device)
            marks = [time.perf_counter()]
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            marks.append(time.perf_counter())
            value = objective()
            sync(device)
            marks.append(time.perf_counter())
            value.backward()
            sync(device)
            marks.append(time.perf_counter())
            optimizer.step()
            sync(device)
            marks.append(time.perf_counter())
            if i >= 20:
                for phase, start, end in zip(PHASES, marks, marks[1:]):
                    times[loss][phase].append(end - start)
    return {loss: {phase: statistics.median(v) for phase, v in by_phase.items()} for loss, by_phase in times.items()}


def bare_epoch(model, anrat, optimizer, split: Split, batch_size: int, generator) -> None:
    model.train()
    for x, y in split.batches(batch_size, shuffle=True, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        anrat.aggregate(per_sample_loss(model(x), y)).backward()
        optimizer.step()


def epoch_benchmark(train: Split, batch_size: int, rounds: int, backend: TiltedBackend) -> dict:
    device = train.x.device
    torch.manual_seed(0)
    model_bare = build_model("lenet5").to(device)
    anrat = ANRATLoss(init_lambda=10.0, backend=backend).to(device)
    opt = torch.optim.SGD([{"params": model_bare.parameters()}, {"params": anrat.parameters(), "lr": 0.01}], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    model_tr = build_model("lenet5").to(device)
    trainer = Trainer(
        model_tr,
        LambdaSchedule(ScheduleConfig(name="adaptive"), backend=backend),
        train,
        None,
        TrainConfig(batch_size=batch_size, lr=0.1, lambda_lr=0.01),
        progress=False,
    )
    t_bare, t_tr = [], []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        bare_epoch(model_bare, anrat, opt, train, batch_size, gen)
        sync(device)
        t_bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.train_epoch()
        sync(device)
        t_tr.append(time.perf_counter() - start)
    bare_s, tr_s = statistics.median(t_bare), statistics.median(t_tr)
    return {"bare_s": bare_s, "trainer_s": tr_s, "ratio": tr_s / bare_s, "samples": len(train)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=64, help="minibatch size for both sides")
    ap.add_argument("--rounds", type=int, default=40, help="alternating timing rounds (median reported)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing round")
    ap.add_argument("--epoch-rounds", type=int, default=3, help="epochs per side in the epoch benchmark (0: skip it)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--data-dir", default=None, help="MNIST folder for the epoch benchmark ($ANRAT_DATA_DIR)")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="also time both sides with the forward pass and loss under torch.compile in MODE "
        "(default: 'default'; 'reduce-overhead' adds CUDA graphs)",
    )
    ap.add_argument(
        "--phases",
        type=int,
        default=0,
        metavar="STEPS",
        help="also time each phase of an eager step over STEPS steps (0: skip)",
    )
    ap.add_argument("--mlp-hidden", default="500,300", help="hidden widths of the MLP")
    ap.add_argument(
        "--accelerator-path",
        choices=["host", "device"],
        default="host",
        help="on a GPU, where the tilted mean is computed: NumPy on the host after one copy "
        "(default), or torch ops on the device (the losses' backend='torch')",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    # On the CPU the tilted mean is NumPy's either way: it is on the host already.
    backend: TiltedBackend = "torch" if args.accelerator_path == "device" and device.type != "cpu" else "auto"
    print(
        f"device {device}; {machine_line(device)}; batch {args.batch_size}"
        + (f"; tilted mean on the {args.accelerator_path}" if device.type != "cpu" else "")
        + (f"; compile mode {args.compile}" if args.compile else "")
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    hidden = [int(v) for v in args.mlp_hidden.split(",")]
    print(
        "\nseconds per training step (median of rounds), ANRAT and ess (anrat.ESSLoss, rho 0.5) vs "
        "cross-entropy; ratio: median of the per-round ratios [quartiles]:"
    )
    print(f"{'model':<22}{'criterion, mode':<28}{'CE':>11}{'ours':>11}{'ratio':>8}  quartiles")
    for name, kwargs in (("lenet5", {}), ("mlp", {"hidden": hidden})):
        label = name if name == "lenet5" else f"mlp 784-{'-'.join(map(str, hidden))}-10"
        for mode, r in step_benchmark(name, kwargs, x, y, args.rounds, args.steps, args.compile, backend).items():
            print(
                f"{label:<22}{mode:<28}{r['den_s']:>11.6f}{r['num_s']:>11.6f}{r['ratio']:>8.3f}"
                f"  [{r['q1']:.3f}, {r['q3']:.3f}]"
            )
    if args.phases:
        print(f"\nmicroseconds per phase of an eager step (median of {args.phases} steps):")
        print(f"{'model':<22}{'phase':<18}{'CE':>10}{'ANRAT':>10}{'extra':>10}")
        for name, kwargs in (("lenet5", {}), ("mlp", {"hidden": hidden})):
            label = name if name == "lenet5" else f"mlp 784-{'-'.join(map(str, hidden))}-10"
            r = phase_benchmark(name, kwargs, x, y, args.phases, backend)
            for phase in PHASES:
                ce_us, an_us = r["ce"][phase] * 1e6, r["anrat"][phase] * 1e6
                print(f"{label:<22}{phase:<18}{ce_us:>10.1f}{an_us:>10.1f}{an_us - ce_us:>10.1f}")
    if args.epoch_rounds < 1:
        return
    data = load_dataset("mnist", args.data_dir, device=device)
    r = epoch_benchmark(data.train, args.batch_size, args.epoch_rounds, backend)
    print(f"\none epoch of MNIST ({r['samples']} images), lenet5 + ANRAT, seconds (median):")
    print(
        f"{'bare loop':<22}{r['bare_s']:>12.3f}\n"
        f"{'Trainer':<22}{r['trainer_s']:>12.3f}\n"
        f"{'ratio':<22}{r['ratio']:>12.3f}"
    )


if __name__ == "__main__":
    main()
