"""Minibatch training with a lambda schedule, validation-based model selection, and resume.

The loop is the plain PyTorch one — forward, per-sample losses, the schedule's criterion,
backward, optimizer step — over tensors already on the device (:class:`anrat.data.Split`). The
trainer adds what a run needs around it:

- one optimizer for the weights and lambda (ANRAT's theta gets its own learning rate,
  ``lambda_lr``), with an L2 prior (weight decay) on named layers only;
- per-epoch metrics (training objective, training mean loss, lambda, validation error, seconds)
  appended to ``metrics.jsonl``, with lambda also sampled within the epoch (``lam_trace``), and
  the effective sample size of each step's tilted weights (:func:`step_ess`) averaged over the
  epoch (``train_ess``, and ``train_ess_fraction`` = mean of ESS / batch size);
- the best epoch on validation kept in memory and in ``best.pt``;
- ``last.pt`` after every epoch, written atomically, holding everything needed to resume
  bit-for-bit on the CPU: weights, optimizer, schedule (lambda), epoch, shuffling generator and the
  global RNG (dropout);
- on request (``compile``), the forward pass and the loss under ``torch.compile``.

Nothing in the step waits on the device: the metrics are accumulated as tensors and read once per
epoch.

Under ``torch.distributed`` (a process group of W > 1 ranks, e.g. from torchrun) the same loop
runs data-parallel: the model is wrapped in DistributedDataParallel, every rank draws the same
global minibatches of ``batch_size`` samples and trains on its shard of each, the losses (wrapped
in :class:`~anrat.distributed.GlobalBatchLoss`) aggregate the global batch exactly, lambda's
gradient is averaged over the ranks, validation sums are reduced over the ranks, and rank 0 alone
writes files (see :mod:`anrat.distributed`). The logged ESS is then that of each rank's shard,
averaged over the ranks and steps (the ``ess`` schedule, which needs the global batch's, is refused).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from anrat import distributed
from anrat.atomic_files import remove_stale_temporaries, write_text_atomic
from anrat.checkpoint import FORMAT, global_rng_state, load_checkpoint, save_atomic, set_global_rng_state
from anrat.data import Split, as_split
from anrat.epoch_lines import epoch_line
from anrat.errors import InputError
from anrat.ess import ESSLoss
from anrat.functional import LossKind, distillation_loss, effective_sample_size, per_sample_loss, working_dtype
from anrat.input_norm import InputNorm
from anrat.interrupts import Interrupted, clear_position, report_position, signals_deferred
from anrat.losses import ANRATLoss, BatchLoss, NRAELoss, RAELoss
from anrat.schedules import LambdaSchedule, ScheduleConfig

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Optimisation settings of one run (the schedule has its own :class:`ScheduleConfig`)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    # Learning rate of lambda's parameter theta (ANRAT). None: lr * 0.1; see docs/method.md.
    lambda_lr: float | None = None
    optimizer: str = "sgd"  # any class name in torch.optim; the paper uses plain SGD
    momentum: float = 0.0  # SGD only
    # The weights' learning rate over the run: "none" (constant), "cosine" (annealed to 0 over the
    # epochs, stepped per epoch) or "cosine_step" (the same curve stepped per optimizer step; for a
    # run of one or two epochs such as a pruning round's recovery). lambda's learning rate stays
    # constant, its schedule has its own dynamics (lr_factor)
    lr_decay: str = "none"
    l2: dict[str, float] = field(default_factory=dict)  # layer name -> weight decay on its weight
    seed: int = 0
    amp: bool = False  # bfloat16 autocast for the forward pass; losses stay float32
    # torch.compile mode for the forward pass and the loss (None: eager); see docs/usage.md
    compile: str | None = None
    lam_samples_per_epoch: int = 20
    eval_batch_size: int = 1000
    # Which epoch the run keeps: "best" on validation, or "last" (validation is still recorded but
    # selects nothing, so it stays unbiased for later decisions such as the pruning's acceptance test)
    select: str = "best"

    def validate(self) -> None:
        if self.epochs < 0:
            raise InputError(f"epochs must be >= 0, got {self.epochs}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr",) + (("lambda_lr",) if self.lambda_lr is not None else ()):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise InputError(f"momentum must be a finite number >= 0, got {self.momentum!r}")
        if self.select not in SELECTIONS:
            raise InputError(f"unknown select {self.select!r}; expected one of {SELECTIONS}")
        if self.lr_decay not in LR_DECAYS:
            raise InputError(f"unknown lr_decay {self.lr_decay!r}; expected one of {LR_DECAYS}")
        if self.optimizer.lower() not in _OPTIMIZER_NAMES:
            raise InputError(
                f"unknown optimizer {self.optimizer!r}; expected a torch.optim class such as 'sgd', 'adam', 'adamw'"
            )
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(f"unknown compile mode {self.compile!r}; expected one of {COMPILE_MODES}")
        for layer, coeff in self.l2.items():
            if not (math.isfinite(coeff) and coeff >= 0):
                raise InputError(f"L2 coefficient for layer {layer!r} must be >= 0, got {coeff!r}")

    @property
    def effective_lambda_lr(self) -> float:
        return self.lambda_lr if self.lambda_lr is not None else self.lr * 0.1


LR_DECAYS = ("none", "cosine", "cosine_step")
SELECTIONS = ("best", "last")


def lr_factor(config: TrainConfig, epoch: int, steps_per_epoch: int = 1) -> float:
    """The multiple of ``config.lr`` the weights train with in epoch ``epoch`` (0-based), or, for
    ``"cosine_step"``, at optimizer step ``epoch`` (0-based) of ``steps_per_epoch`` per epoch.

    ``"none"``: 1. ``"cosine"``: ``(1 + cos(pi * e / E)) / 2`` with ``E = config.epochs`` (SGDR's
    cosine annealing to 0, stepped once per epoch, as ``torch.optim.lr_scheduler.CosineAnnealingLR``
    with ``T_max = E`` and ``eta_min = 0``); epochs past ``E`` (a resumed, longer run) train at 0.
    ``"cosine_step"``: the same curve over ``E * steps_per_epoch`` steps, so that the last step
    trains near 0 even in a one-epoch run.
    """
    if config.lr_decay == "none":
        return 1.0
    horizon = max(1, config.epochs * (steps_per_epoch if config.lr_decay == "cosine_step" else 1))
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))


@dataclass
class Distillation:
    """Knowledge distillation from ``teacher`` (a model in eval mode on the data's device): each
    sample's loss becomes ``(1 - weight) * l_i + weight * distillation_loss_i`` at
    ``temperature`` (:func:`anrat.functional.distillation_loss`), so the schedule's criterion
    (mean or tilted) aggregates the mixed losses. Classification (``kind="ce"``) only."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0

    def validate(self) -> None:
        if not (isinstance(self.weight, int | float) and 0 <= self.weight <= 1):
            raise InputError(f"the distillation weight must be in [0, 1], got {self.weight!r}")
        if not (isinstance(self.temperature, int | float) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise InputError(f"the distillation temperature must be a finite number > 0, got {self.temperature!r}")


def lambda_learning_rate(config: TrainConfig, schedule: ScheduleConfig) -> float:
    """The learning rate of lambda's parameter theta: ``lambda_lr`` when set; else the weights'
    ``lr`` for ``parameterization="direct"`` (the paper's plain-SGD update moves lambda with the
    weights' learning rate) and ``lr * 0.1`` for the others (:attr:`TrainConfig.effective_lambda_lr`)."""
    if config.lambda_lr is None and schedule.parameterization == "direct":
        return config.lr
    return config.effective_lambda_lr


# The files a trainer writes into its out_dir (atomically, so a killed run may leave temporaries).
WRITTEN_FILES = ("last.pt", "best.pt", "metrics.jsonl")

_OPTIMIZER_NAMES = {
    name.lower(): name
    for name in dir(torch.optim)
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer
}  # the base class optimises nothing


def param_groups(model: nn.Module, schedule: LambdaSchedule, config: TrainConfig) -> list[dict[str, Any]]:
    """Weights with an L2 prior, the other weights, and lambda's parameter (own learning rate)."""
    modules = dict(model.named_modules())
    unknown = sorted(set(config.l2) - set(modules))
    if unknown:
        raise InputError(f"L2 prior names unknown layers {unknown}; layers are {sorted(n for n in modules if n)}")
    decayed = {id(modules[name].weight): coeff for name, coeff in config.l2.items()}
    groups: list[dict[str, Any]] = []
    for coeff in sorted(set(decayed.values())):
        groups.append(
            {
                "params": [p for p in model.parameters() if decayed.get(id(p)) == coeff],
                "weight_decay": coeff,
                "name": f"l2={coeff:g}",
            }
        )
    groups.append(
        {"params": [p for p in model.parameters() if id(p) not in decayed], "weight_decay": 0.0, "name": "weights"}
    )
    if schedule.parameters():
        groups.append(
            {
                "params": schedule.parameters(),
                "lr": lambda_learning_rate(config, schedule.config),
                "weight_decay": 0.0,
                "name": "lambda",
            }
        )
    return groups


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    name = _OPTIMIZER_NAMES.get(config.optimizer.lower(), config.optimizer)
    cls = getattr(torch.optim, name)
    kwargs: dict[str, Any] = {"lr": config.lr}
    if cls is torch.optim.SGD:
        kwargs["momentum"] = config.momentum
    return cls(groups, **kwargs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split | Any,
    kind: LossKind = "ce",
    p: float = 2.0,
    batch_size: int = 1000,
    r: float | None = None,
) -> dict[str, float]:
    """Mean per-sample loss and, for classification, the error rate (fraction misclassified).

    ``split`` is a :class:`Split` or any data :func:`anrat.data.as_split` takes (an ``(x, y)``
    pair, a ``Dataset``, a ``DataLoader``), moved to the model's device; inputs are used as given.
    ``r``: the error's exponent (:func:`anrat.functional.per_sample_loss`).
    """
    if not isinstance(split, Split):
        params = next(model.parameters(), None)
        split = as_split(split, "data", params.device if params is not None else None)
    return _evaluation_result(_evaluation_sums(model, split, kind, p, batch_size, r), _classifies(kind, split))


def _classifies(kind: LossKind, split: Split) -> bool:
    return kind == "ce" or not split.y.is_floating_point()


@torch.no_grad()
def _evaluation_sums(
    model: nn.Module, split: Split, kind: LossKind, p: float, batch_size: int, r: float | None = None
) -> Tensor:
    """float64 ``[sum of per-sample losses, number misclassified, number of samples]``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.x.device)
    wrong = torch.zeros((), dtype=torch.int64, device=split.x.device)
    classify = _classifies(kind, split)
    for x, y in split.batches(batch_size):
        out = model(x)
        loss_sum += per_sample_loss(out, y, kind, p, r=r).sum().double()
        if classify:
            pred = (out.reshape(-1) > 0).long() if out.dim() == 1 or out.shape[1] == 1 else out.argmax(dim=1)
            wrong += (pred != y.reshape(pred.shape).long()).sum()
    model.train(was_training)
    return torch.stack(
        [loss_sum, wrong.double(), torch.tensor(float(len(split)), dtype=torch.float64, device=loss_sum.device)]
    )


def _evaluation_result(sums: Tensor, classify: bool) -> dict[str, float]:
    loss_sum, wrong, n = sums.tolist()
    result = {"loss": loss_sum / n}
    if classify:
        result["error"] = wrong / n
    return result


def improves(val: dict[str, float] | None, best: dict[str, float] | None, select: str = "best") -> bool:
    """Whether an epoch with validation figures ``val`` replaces the selected one (``best``): its
    error (or loss, for regression) is strictly lower, or there is nothing to compare (no validation
    split, nothing selected yet), or the run keeps its last epoch (``select="last"``)."""
    if val is None or best is None or select == "last":
        return True
    key = "error" if "error" in val else "loss"
    return val[key] < best[key]


class TrainingDiverged(RuntimeError):
    """The objective became non-finite: the weights diverged (usually: learning rate too high)."""


@dataclass
class TrainResult:
    best_epoch: int  # 1-based epoch whose weights were selected (0: the initial model)
    best_val: dict[str, float] | None
    history: list[dict[str, Any]]
    switch_epoch: int | None


def step_ess(losses: Tensor, criterion: BatchLoss) -> Tensor:
    """``[ESS, ESS / m, 1]`` of one step, in :func:`~anrat.functional.working_dtype` on the
    losses' device (no sync): the effective sample size ``1 / sum_i w_i^2`` of the weights that
    ``criterion`` gives the per-sample losses ``losses`` (m,) in its gradient.

    NRAE (fixed, anneal, excursions, either normaliser) and ANRAT: ``w = softmax(t * l)`` at the
    step's tilt t = lambda^p (the running normaliser's weights exp(t (l - r)) / m are proportional
    to it, and ESS does not depend on the scale of the weights), RAE after a switch to it (weights
    exp(t l), likewise); ``ess``: the tilt solved for the
    batch (ESS = rho m to rounding); the plain loss: ``w = 1/m``, so ESS = m by definition, and
    nothing is computed.
    """
    m = losses.shape[0]
    t: float | Tensor | None = None
    if isinstance(criterion, ESSLoss):
        t = criterion.last_t
    elif isinstance(criterion, ANRATLoss):
        t = criterion.lambda_tensor().detach().pow(criterion.p)
    elif isinstance(criterion, (NRAELoss, RAELoss)):  # RAE's weights exp(t l) are proportional to softmax(t l)
        t = criterion.t()
    if t is None:
        ess = torch.tensor(float(m), dtype=working_dtype(losses), device=losses.device)
    else:
        ess = effective_sample_size(losses.detach(), t)
    return torch.stack([ess, ess / m, torch.ones_like(ess)])


class Trainer:
    """Trains ``model`` on ``train`` with the losses of ``schedule``; selects on ``val``.

    Args:
        model: the network, already on the device of the data.
        schedule: which loss each step minimises (see :mod:`anrat.schedules`).
        train, val: on-device data; ``val`` may be None (then the last epoch is selected).
        config: optimisation settings.
        out_dir: where ``metrics.jsonl``, ``last.pt`` and ``best.pt`` go (None: keep nothing);
            under torch.distributed rank 0 writes them and every rank resumes from ``last.pt``, so
            with several nodes it must be a folder they share.
        arch: ``{"name": ..., "kwargs": ...}`` to store in checkpoints so the model can be rebuilt.
        optimizer_factory: builds the optimizer from parameter groups (default: ``config.optimizer``).
        progress: report progress on stderr: one plain line per epoch (with the time left), and
            on a terminal also a progress bar within each epoch.
        input_norm: the normalisation the training inputs received, recorded in checkpoints so
            that later stages feed the model the same way.
        distill: distil from a teacher model (:class:`Distillation`; classification only).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: LambdaSchedule,
        train: Split,
        val: Split | None,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        arch: dict[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        progress: bool = True,
        run_config: dict[str, Any] | None = None,
        input_norm: InputNorm | None = None,
        distill: Distillation | None = None,
    ) -> None:
        config.validate()
        if distill is not None:
            distill.validate()
            if schedule.config.kind != "ce":
                raise InputError(
                    f"distillation needs a classifier trained with kind='ce', got {schedule.config.kind!r}"
                )
            distill.teacher.eval()
        self.distill = distill
        self.model, self.schedule, self.train_split, self.val_split = model, schedule, train, val
        self.config, self.arch, self.run_config, self.input_norm = config, arch, run_config or {}, input_norm
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.world = distributed.current_world()  # None: a single process
        self.writes_files = self.world is None or self.world.is_main
        self.progress = progress and self.writes_files
        self.progress_bar = self.progress and sys.stderr.isatty()
        device = train.x.device
        if schedule.nrae is not None:
            schedule.nrae.to(device)
        # The modules the training step calls: under torch.distributed DDP(model) and each loss
        # wrapped to aggregate the global batch, else the model and the schedule's losses.
        self.step_model = model
        self.global_losses: dict[BatchLoss, distributed.GlobalBatchLoss] = {}
        if self.world is not None:
            self.step_model = distributed.data_parallel(model)
            self.global_losses = {
                loss: distributed.GlobalBatchLoss(loss) for loss in (schedule.plain, schedule.nrae) if loss is not None
            }
            distributed.seed_rank(config.seed, self.world)  # dropout masks differ between ranks
        # Forward pass and loss: what each step calls, compiled with torch.compile when asked.
        self.objective = self._objective
        if config.compile is not None:
            if self.world is not None:
                raise InputError("compile is not supported under torch.distributed yet; train without it")
            self.objective = torch.compile(self._objective, mode=config.compile)
        self.class_weight = None  # per class, on the device (ScheduleConfig.class_weight)
        if schedule.config.class_weight is not None:
            self.class_weight = torch.tensor(schedule.config.class_weight, dtype=torch.float32, device=device)
            classes = int(train.y.max()) + 1
            if len(schedule.config.class_weight) < classes:
                raise InputError(
                    f"class_weight has {len(schedule.config.class_weight)} weights, but the training labels "
                    f"go up to {classes - 1}: expected one weight per class"
                )
        groups = param_groups(model, schedule, config)
        self.optimizer = optimizer_factory(groups) if optimizer_factory else make_optimizer(groups, config)
        # The weights' learning-rate decay, stepped after each epoch; lambda's group keeps its rate.
        # "cosine_step" is stepped after every optimizer step instead.
        self.lr_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if config.lr_decay != "none":
            steps = train.num_batches(config.batch_size)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer,
                [
                    (lambda epoch: 1.0)
                    if group.get("name") == "lambda"
                    else (lambda epoch: lr_factor(config, epoch, steps))
                    for group in self.optimizer.param_groups
                ],
            )
        self.lr_per_step = config.lr_decay == "cosine_step"
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0  # epochs completed
        self.saved_epoch = 0  # the epoch out_dir/last.pt holds (0: none written)
        self.saved_steps = 0  # and the steps of the next epoch it holds (an interrupted epoch)
        self._closing = False  # between an epoch's last step and its checkpoint
        self._in_epoch: dict[str, Any] | None = None  # that epoch's position and sums, to go on from
        self.step = 0  # optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_val: dict[str, float] | None = None
        self.best_state: dict[str, Tensor] | None = None

    # --- one epoch ---------------------------------------------------------------------------
    def criterion(self) -> BatchLoss | distributed.GlobalBatchLoss:
        """The loss this step minimises: the schedule's, over the global batch under torch.distributed."""
        loss = self.schedule.criterion(self.step)
        if self.world is None:
            return loss
        if loss not in self.global_losses:  # RAE, made at the switch
            self.global_losses[loss] = distributed.GlobalBatchLoss(loss)
        return self.global_losses[loss]

    def _objective(
        self, x: Tensor, y: Tensor, criterion: BatchLoss | distributed.GlobalBatchLoss
    ) -> tuple[Tensor, Tensor]:
        """The criterion's objective on a batch, and the per-sample losses it aggregates."""
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            out = self.step_model(x)
        c = self.schedule.config
        losses = per_sample_loss(out, y, c.kind, c.p, r=c.r)
        if self.class_weight is not None:
            losses = losses * self.class_weight[y]
        if self.distill is not None:
            d = self.distill
            with torch.no_grad():
                teacher_out = d.teacher(x)
            losses = (1 - d.weight) * losses + d.weight * distillation_loss(out, teacher_out, d.temperature)
        return criterion.aggregate(losses), losses

    def train_epoch(self) -> dict[str, Any]:
        model, schedule, c = self.model, self.schedule, self.config
        model.train()
        start = time.perf_counter()
        device = self.train_split.x.device
        objective_sum = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        max_loss = torch.full((), -math.inf, device=device)
        ess_sums = torch.zeros(3, dtype=working_dtype(self.train_split.x), device=device)  # ESS, ESS / m, steps
        lam_trace: list[tuple[int, Tensor | float]] = []
        seen, done = 0, 0
        partial, self._in_epoch = self._in_epoch, None  # an epoch an interrupt cut short, resumed
        if partial is not None:
            self.generator.set_state(partial["generator"])
            objective_sum, loss_sum = partial["objective_sum"].to(device), partial["loss_sum"].to(device)
            max_loss, ess_sums = partial["max_loss"].to(device), partial["ess_sums"].to(device)
            lam_trace, seen, done = [tuple(v) for v in partial["lam_trace"]], partial["seen"], partial["steps"]
        epoch_generator = self.generator.get_state()  # the batch order is drawn from it
        n_batches = self.train_split.num_batches(c.batch_size)
        trace_every = max(1, n_batches // max(1, c.lam_samples_per_epoch))
        batches = self.train_split.batches(c.batch_size, shuffle=True, generator=self.generator)
        if self.world is not None:
            batches = distributed.shard_batches(batches, self.world)
        bar = tqdm(
            itertools.islice(enumerate(batches), done, None),
            total=n_batches,
            initial=done,
            desc=f"epoch {self.epoch + 1}",
            disable=not self.progress_bar,
            leave=False,
        )
        # a resumable run (its own last.pt; one process) stops after the step a signal arrives in
        resumable = self.out_dir is not None and self.writes_files and self.world is None
        deferred = signals_deferred() if resumable else contextlib.nullcontext(lambda: None)
        with deferred as pending:
            for i, (x, y) in bar:
                step_loss = schedule.criterion(self.step)
                objective, losses = self.objective(x, y, self.criterion())
                if losses.numel():  # before the optimizer step: ANRAT's lambda is the step's
                    ess_sums += step_ess(losses, step_loss)
                self.optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if self.world is not None:
                    distributed.average_gradients(schedule.parameters())  # DDP averages the model's
                self.optimizer.step()
                if self.lr_per_step and self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                if isinstance(schedule.nrae, ANRATLoss):
                    schedule.nrae.project_()  # lambda back into its bounds ("direct"; others: nothing)
                self.step += 1
                seen += losses.shape[0]
                with torch.no_grad():
                    objective_sum += objective.detach()
                    loss_sum += losses.detach().sum()
                    if losses.numel():  # a rank's shard of the last batch may be empty
                        max_loss = torch.maximum(max_loss, losses.detach().max())
                if i % trace_every == 0 and schedule.nrae is not None and not schedule.switched:
                    # ANRAT's lambda is a device tensor: keep it, read it at the end of the epoch
                    lam = schedule.lam
                    if isinstance(schedule.nrae, ANRATLoss):
                        lam = schedule.nrae.lambda_tensor().detach()
                    elif isinstance(schedule.nrae, ESSLoss):  # the last batch's tilt (a tensor on the torch path)
                        lam = schedule.nrae.last_lambda()
                    lam_trace.append((self.step, lam))
                signum = pending()
                if signum is not None:  # a safe point: the step is done; keep it and stop
                    self._save_in_epoch(
                        epoch_generator, i + 1, seen, objective_sum, loss_sum, max_loss, ess_sums, lam_trace
                    )
                    raise Interrupted(signum)
        bar.close()
        if self.world is not None:  # the objective is already the global one on every rank
            loss_sum, seen = distributed.sum_over_ranks(
                torch.stack([loss_sum.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
            ).tolist()
            max_loss = distributed.max_over_ranks(max_loss)
            ess_sums = distributed.sum_over_ranks(ess_sums)  # each rank's shards (module docstring)
        if not torch.isfinite(objective_sum):
            raise TrainingDiverged(
                f"training diverged in epoch {self.epoch + 1}: the objective became non-finite "
                f"(lr={c.lr:g}); lower the learning rate"
                + (f". The last good state is in {self.out_dir / 'last.pt'}" if self.out_dir is not None else "")
            )
        record = {
            "epoch": self.epoch + 1,
            "criterion": schedule.criterion_name,
            "train_objective": float(objective_sum) / max(1, n_batches),
            "train_loss": float(loss_sum) / max(1, seen),
            "train_max_loss": float(max_loss),
            "lam_trace": [[s, float(v)] for s, v in lam_trace],
            "rho": schedule.rho,
        }
        ess_total, fraction_total, ess_steps = ess_sums.tolist()
        record["train_ess"] = ess_total / ess_steps if ess_steps else None
        record["train_ess_fraction"] = fraction_total / ess_steps if ess_steps else None
        schedule.end_epoch(self.epoch, record["train_max_loss"])
        record["lr"] = self.optimizer.param_groups[0]["lr"]  # the weights' (lambda's group is last)
        if self.lr_scheduler is not None and not self.lr_per_step:
            self.lr_scheduler.step()
        record["lam"] = schedule.nrae.lam if schedule.nrae is not None else None
        record["switched"] = schedule.switched
        record["switch_epoch"] = schedule.switch_epoch
        record["train_seconds"] = time.perf_counter() - start
        self.epoch += 1
        return record

    def evaluate(self, split: Split) -> dict[str, float]:
        """:func:`evaluate`; under torch.distributed each rank takes its part of ``split`` and the
        sums of losses, errors and counts are reduced over the ranks (a collective)."""
        kind, p, batch_size = self.schedule.config.kind, self.schedule.config.p, self.config.eval_batch_size
        r = self.schedule.config.r
        if self.world is None:
            return evaluate(self.model, split, kind, p, batch_size, r)
        sums = _evaluation_sums(self.model, distributed.shard(split, self.world), kind, p, batch_size, r)
        return _evaluation_result(distributed.sum_over_ranks(sums), _classifies(kind, split))

    # --- the run -----------------------------------------------------------------------------
    def fit(self, epochs: int | None = None, resume: bool = True) -> TrainResult:
        """Train until ``epochs`` (default ``config.epochs``) epochs are complete, then load the best."""
        epochs = self.config.epochs if epochs is None else epochs
        if self.out_dir is not None and self.writes_files:
            remove_stale_temporaries(self.out_dir, WRITTEN_FILES)
        if resume and self.out_dir is not None and (self.out_dir / "last.pt").exists():
            self.load_state_dict(load_checkpoint(self.out_dir / "last.pt", map_location=self.train_split.x.device))
            self.saved_epoch = self.epoch
            self.saved_steps = (self._in_epoch or {}).get("steps", 0)
        if self.world is not None:
            distributed.require_agreement(
                self.epoch,
                "the epoch to resume from (is OUT one folder shared by all nodes?)",
                self.train_split.x.device,
            )
        self._rewrite_metrics()  # metrics.jsonl agrees with the history we start from
        if self.out_dir is not None and self.writes_files:  # a training that resumes (not a fine-tuning)
            report_position(self._position)
        if self.best_state is None and self.val_split is not None and self.epoch == 0:
            self._consider(0, self.evaluate(self.val_split))
        while self.epoch < epochs:
            start = time.perf_counter()
            record = self.train_epoch()
            self._closing = True  # the epoch's steps are done: validation, selection, checkpoint
            if self.val_split is not None:
                val = self.evaluate(self.val_split)
                record.update({f"val_{k}": v for k, v in val.items()})
                self._consider(self.epoch, val)
            elif self.epoch == epochs:
                self._consider(self.epoch, None)
            record["seconds"] = time.perf_counter() - start
            self.history.append(record)
            self.save()
            self._rewrite_metrics()
            self._closing = False
            if self.progress:
                print(epoch_line(record, epochs), file=sys.stderr, flush=True)
        clear_position(self._position)  # the training ended: its position (and a reference to this trainer) goes
        self.load_best()
        return TrainResult(self.best_epoch, self.best_val, self.history, self.schedule.switch_epoch)

    def _consider(self, epoch: int, val: dict[str, float] | None) -> None:
        """Keep the weights of ``epoch`` if they beat the best validation score so far, or always
        when the run keeps its last epoch (``select="last"``)."""
        if improves(val, self.best_val, self.config.select):
            self.best_epoch, self.best_val = epoch, val
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.out_dir is not None and epoch > 0 and self.writes_files:
                save_atomic(self.model_checkpoint(), self.out_dir / "best.pt")

    def load_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # --- checkpoints -------------------------------------------------------------------------
    def model_checkpoint(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """A self-describing checkpoint of the current weights (what the pruning stage takes)."""
        return {
            "format": FORMAT,
            "arch": copy.deepcopy(self.arch),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "lam": self.schedule.lam,
            "schedule": asdict(self.schedule.config),
            "train": asdict(self.config),
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "metrics": metrics if metrics is not None else {"val": self.best_val},
            "run_config": self.run_config,
            **({"input_norm": self.input_norm.as_dict()} if self.input_norm is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        state = self.model_checkpoint()
        state.update(
            {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "schedule_state": self.schedule.state_dict(),
                "step": self.step,
                "history": self.history,
                "best_val": self.best_val,
                "best_state": {k: v.cpu() for k, v in self.best_state.items()} if self.best_state else None,
                "rng": {"generator": self.generator.get_state(), **global_rng_state()},
            }
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.train_split.x.device
        self.model.load_state_dict(state["state_dict"])
        self.schedule.load_state_dict(state["schedule_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self.best_epoch, self.best_val = state["best_epoch"], state["best_val"]
        best = state["best_state"]
        self.best_state = {k: v.to(device) for k, v in best.items()} if best is not None else None
        self.generator.set_state(state["rng"]["generator"].cpu())
        set_global_rng_state(state["rng"])
        self._in_epoch = state.get("in_epoch")  # an epoch cut short by an interrupt: train_epoch goes on with it
        per_rank = state["rng"].get("per_rank")
        if self.world is not None and per_rank is not None and len(per_rank) == self.world.size:
            distributed.set_rng_state(per_rank[self.world.rank], device)
        elif self.world is not None:  # saved by another number of processes: fresh per-rank streams
            distributed.seed_rank(self.config.seed + self.epoch, self.world)

    def save(self) -> None:
        if self.out_dir is None:
            return
        # Under torch.distributed every rank's RNG (dropout) goes into rank 0's last.pt.
        per_rank = distributed.gather_rng_states(self.train_split.x.device) if self.world is not None else None
        if self.writes_files:
            state = self.state_dict()
            if per_rank is not None:
                state["rng"]["per_rank"] = per_rank
            save_atomic(state, self.out_dir / "last.pt")
            self.saved_epoch, self.saved_steps = self.epoch, 0

    def _save_in_epoch(
        self,
        generator: Tensor,
        steps: int,
        seen: int,
        objective_sum: Tensor,
        loss_sum: Tensor,
        max_loss: Tensor,
        ess_sums: Tensor,
        lam_trace: list[tuple[int, Tensor | float]],
    ) -> None:
        """``last.pt`` after ``steps`` steps of the current epoch: the state after the last step,
        the generator the epoch's batch order was drawn from, and the epoch's running sums, so that
        :meth:`train_epoch` resumes at the next step and ends as if never stopped."""
        state = self.state_dict()
        state["in_epoch"] = {
            "generator": generator,
            "steps": steps,
            "seen": seen,
            "objective_sum": objective_sum.detach().cpu(),
            "loss_sum": loss_sum.detach().cpu(),
            "max_loss": max_loss.detach().cpu(),
            "ess_sums": ess_sums.detach().cpu(),
            "lam_trace": [[s, float(v)] for s, v in lam_trace],
        }
        save_atomic(state, self.out_dir / "last.pt")
        self.saved_epoch, self.saved_steps = self.epoch, steps

    def _position(self) -> tuple[str, str]:
        """Where the training is and how an interrupted run goes on (anrat.interrupts)."""
        where = f"at the end of epoch {self.epoch}" if self._closing else f"at epoch {self.epoch + 1}, step {self.step}"
        if self.saved_epoch == 0 and not self.saved_steps:
            return where, "no epoch was saved yet: run the same command to start again"
        held = f"epoch {self.saved_epoch}"
        if self.saved_steps:
            held += f" and {self.saved_steps} steps of epoch {self.saved_epoch + 1}"
        return where, f"{self.out_dir / 'last.pt'} holds {held}: run the same command to resume"

    def _rewrite_metrics(self) -> None:
        """Write metrics.jsonl from the history (empty for a fresh run, the checkpoint's after a
        resume), whole and atomically after every epoch: a full disk leaves the earlier epochs'
        lines intact, never half a line."""
        if self.out_dir is not None and self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
