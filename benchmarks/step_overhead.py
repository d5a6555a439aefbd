"""Cost of ANRAT over cross-entropy: seconds per training step, and one epoch through the trainer.

Baselines, measured side by side in the same process:
1. Step: forward + loss + backward + SGD step on the same batch, with ``nn.CrossEntropyLoss``
   (baseline) and with :class:`anrat.ANRATLoss` (per-sample losses, NRAE, lambda's gradient and
   update). Reported for lenet5 and an MLP. Target: ratio <= 1.05.
2. Epoch: one epoch of MNIST-sized data through :class:`anrat.trainer.Trainer` (ANRAT schedule)
   against a bare PyTorch loop over the same on-device tensors (same batches, ANRAT loss, no
   metrics/checkpoints/progress). Target: ratio <= 1.10.

Timings alternate between the two sides in rounds and report medians, so drift of the machine
affects both sides alike.

    python benchmarks/step_overhead.py [--batch-size 64] [--rounds 7] [--device auto] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import anrat.functional
from anrat import ANRATLoss
from anrat.data import Split, load_dataset, resolve_device
from anrat.functional import per_sample_loss
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer


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


def step_benchmark(name: str, model_kwargs: dict, x: torch.Tensor, y: torch.Tensor, rounds: int, steps: int) -> dict:
    device = x.device
    torch.manual_seed(0)
    model_ce = build_model(name, **model_kwargs).to(device)
    model_an = build_model(name, **model_kwargs).to(device)
    model_an.load_state_dict(model_ce.state_dict())
    opt_ce = torch.optim.SGD(model_ce.parameters(), lr=0.01)
    anrat = ANRATLoss(init_lambda=10.0).to(device)
    opt_an = torch.optim.SGD([{"params": model_an.parameters()}, {"params": anrat.parameters(), "lr": 0.001}], lr=0.01)
    ce = torch.nn.CrossEntropyLoss()

    def step_ce():
        opt_ce.zero_grad(set_to_none=True)
        ce(model_ce(x), y).backward()
        opt_ce.step()

    def step_anrat():
        opt_an.zero_grad(set_to_none=True)
        anrat.aggregate(per_sample_loss(model_an(x), y)).backward()
        opt_an.step()

    for _ in range(steps):  # warm-up
        step_ce()
        step_anrat()
    t_ce, t_an = [], []
    for _ in range(rounds):
        t_ce.append(time_steps(step_ce, steps, device))
        t_an.append(time_steps(step_anrat, steps, device))
    ce_s, an_s = statistics.median(t_ce), statistics.median(t_an)
    return {"model": name, "ce_s": ce_s, "anrat_s": an_s, "ratio": an_s / ce_s}


def bare_epoch(model, anrat, optimizer, split: Split, batch_size: int, generator) -> None:
    model.train()
    for x, y in split.batches(batch_size, shuffle=True, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        anrat.aggregate(per_sample_loss(model(x), y)).backward()
        optimizer.step()


def epoch_benchmark(train: Split, batch_size: int, rounds: int) -> dict:
    device = train.x.device
    torch.manual_seed(0)
    model_bare = build_model("lenet5").to(device)
    anrat = ANRATLoss(init_lambda=10.0).to(device)
    opt = torch.optim.SGD([{"params": model_bare.parameters()}, {"params": anrat.parameters(), "lr": 0.01}], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    model_tr = build_model("lenet5").to(device)
    trainer = Trainer(model_tr, LambdaSchedule(ScheduleConfig(name="adaptive")), train, None,
                      TrainConfig(batch_size=batch_size, lr=0.1, lambda_lr=0.01), progress=False)
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
    ap.add_argument("--mlp-hidden", default="500,300", help="hidden widths of the MLP")
    ap.add_argument("--accelerator-path", choices=["host", "device"], default="host",
                    help="on a GPU, where the tilted mean is computed: NumPy on the host after one copy "
                         "(default), or torch ops on the device (anrat.functional.NUMPY_ON_ACCELERATORS)")
    args = ap.parse_args()
    anrat.functional.NUMPY_ON_ACCELERATORS = args.accelerator_path == "host"
    device = resolve_device(args.device)
    print(f"device {device}; torch {torch.__version__}; {platform.processor() or platform.machine()}; "
          f"threads {torch.get_num_threads()}; batch {args.batch_size}"
          + (f"; tilted mean on the {args.accelerator_path}" if device.type != "cpu" else ""))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    hidden = [int(v) for v in args.mlp_hidden.split(",")]
    print("\nseconds per training step (median of rounds), ANRAT vs cross-entropy:")
    print(f"{'model':<22}{'CE':>12}{'ANRAT':>12}{'ratio':>8}")
    for name, kwargs in (("lenet5", {}), ("mlp", {"hidden": hidden})):
        r = step_benchmark(name, kwargs, x, y, args.rounds, args.steps)
        label = name if name == "lenet5" else f"mlp 784-{'-'.join(map(str, hidden))}-10"
        print(f"{label:<22}{r['ce_s']:>12.6f}{r['anrat_s']:>12.6f}{r['ratio']:>8.3f}")
    if args.epoch_rounds < 1:
        return
    data = load_dataset("mnist", args.data_dir, device=device)
    r = epoch_benchmark(data.train, args.batch_size, args.epoch_rounds)
    print(f"\none epoch of MNIST ({r['samples']} images), lenet5 + ANRAT, seconds (median):")
    print(f"{'bare loop':<22}{r['bare_s']:>12.3f}\n{'Trainer':<22}{r['trainer_s']:>12.3f}\n{'ratio':<22}{r['ratio']:>12.3f}")


if __name__ == "__main__":
    main()
