"""A grid of trainings as one vectorised run: K members of one architecture trained at once.

Instead of K training loops, :class:`BatchedTrainer` stacks the K members' weights along a new
leading dimension (:func:`torch.func.stack_module_state`) and runs one step for all of them with
:func:`torch.func.vmap` over :func:`torch.func.functional_call` and :func:`torch.func.grad`.
Member k (:class:`anrat.members.Member`: a :class:`~anrat.trainer.TrainConfig` and a
:class:`~anrat.schedules.ScheduleConfig`) stands for the single-model run

    torch.manual_seed(train.seed); model = model_factory()
    Trainer(model, LambdaSchedule(schedule), train_split, val_split, train).fit()

and follows it to float rounding (without dropout): the same initial weights, batch order, lambda
updates and optimizer updates (:mod:`anrat.stacked_optim`), the same criterion
(:func:`anrat.objective.objective`, vmapped, its weights' gradient taken through the surrogate
``sum_i w_i l_i``). A member whose objective or weights become non-finite is frozen and reported;
the others go on. Members run in chunks of ``max_members``; ``out_dir/last.pt`` holds the whole
stack after every epoch and resumes it bit for bit; :meth:`BatchedTrainer.member_checkpoint`
exports any member in the single-model checkpoint layout. What the members may differ in, what
they share, the exactness, logging, memory and checkpoints in detail: docs/batched.md. Options a
stack cannot train are refused by :func:`anrat.members.unsupported_option`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from anrat.atomic_files import write_text_atomic
from anrat.checkpoint import FORMAT, global_rng_state, load_checkpoint, save_atomic, set_global_rng_state
from anrat.data import Split
from anrat.epoch_lines import stack_epoch_line
from anrat.errors import InputError
from anrat.functional import error_exponent, per_sample_loss, tilt_for_ess
from anrat.linear_layout import layout_mode
from anrat.losses import ANRATLoss, NRAELoss
from anrat.members import Member, check_members, fixed_settings, grid, member_settings, unsupported_option
from anrat.objective import SETTING_DTYPES, lambda_of_theta, objective, objective_settings
from anrat.schedules import LambdaSchedule, ScheduleConfig, excursion_plain_step
from anrat.stacked_optim import OPTIMIZER_CLASSES, member_hyperparameters
from anrat.trainer import TrainConfig, improves, lr_factor

BATCHED_FORMAT = "anrat.batched/1"


@dataclass
class BatchedResult:
    """Per member (lists indexed by member): the selected epoch and its validation score, the
    epoch of the switch to the plain loss; ``diverged``: member -> what happened, and
    ``diverged_epoch``: member -> the (1-based) epoch in which it was frozen."""

    best_epoch: list[int]
    best_val: list[dict[str, float] | None]
    switch_epoch: list[int | None]
    diverged: dict[int, str]
    diverged_epoch: dict[int, int]
    history: list[dict[str, Any]]


def _on_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: v.detach().cpu() for n, v in tensors.items()}


def _where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` for the members where ``mask`` (K,) holds, else ``old``."""
    return torch.where(mask.reshape((-1,) + (1,) * (new.dim() - 1)), new, old)


class BatchedTrainer:
    """Trains the ``members`` of one architecture at once; selects each one's best epoch on ``val``.

    Args:
        model_factory: builds the network (called once per member under ``torch.manual_seed(seed)``,
            the member's initial weights; all members must have the same parameter shapes).
        members: the trainings (:class:`Member`), see the module docstring.
        train, val: on-device data shared by all members; ``val`` may be None (then each member's
            last epoch is selected).
        out_dir: where ``last.pt`` and ``metrics.jsonl`` go (None: keep nothing).
        arch: ``{"name": ..., "kwargs": ...}`` stored in exported member checkpoints.
        max_members: at most this many members per forward/backward pass (None: all at once).
        progress: one line per epoch on stderr (:func:`stack_epoch_line`) and, on a terminal, a
            progress bar over each epoch's steps.
        run_config: the options of the run that made the stack (e.g. ``anrat.run.RunConfig`` as
            a dict), stored in ``last.pt`` so that a resume can be checked against them.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        members: Sequence[Member],
        train: Split,
        val: Split | None,
        out_dir: str | Path | None = None,
        arch: dict[str, Any] | None = None,
        max_members: int | None = None,
        progress: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.kind, optimizer = check_members(members)
        if max_members is not None and max_members < 1:
            raise InputError(f"max_members must be >= 1, got {max_members}")
        self.members = list(members)
        self.train_split, self.val_split = train, val
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.arch = arch
        self.progress, self.progress_bar = progress, progress and sys.stderr.isatty()
        self.run_config = run_config or {}
        self.device = train.x.device
        self.shared = self.members[0].train
        k = len(self.members)
        self.chunk = max_members or k
        self.base, self.params, self.buffers = self._initial_stack(model_factory)
        self.schedules = [LambdaSchedule(replace(m.schedule), backend="torch") for m in self.members]
        self.theta = torch.stack([self._initial_theta(s) for s in self.schedules]).to(self.device)
        self.optimizer = OPTIMIZER_CLASSES[optimizer]()
        self.opt_state = {name: self.optimizer.init_state(p) for name, p in self._trained().items()}
        self.epoch = 0  # epochs completed
        self.hp = self._optimizer_hyper()
        self.generators = [torch.Generator().manual_seed(m.train.seed) for m in self.members]
        self.active = torch.ones(k, dtype=torch.bool, device=self.device)  # not frozen
        self.frozen_step = torch.full((k,), -1, dtype=torch.int64, device=self.device)
        self.diverged: dict[int, str] = {}
        self.diverged_epoch: dict[int, int] = {}
        self.step = 0  # steps taken
        self.history: list[dict[str, Any]] = []
        self.best_epoch = [0] * k
        self.best_val: list[dict[str, float] | None] = [None] * k
        self.best_params: dict[str, Tensor] | None = None
        self._exponents = [error_exponent(m.schedule.kind, m.schedule.p, m.schedule.r) for m in self.members]
        self._same_p = len(set(self._exponents)) == 1
        # each member's running estimate of the dataset NRAE (normalizer="running"); NaN: none yet
        self.running_nrae = torch.full((k,), float("nan"), dtype=torch.float32, device=self.device)
        self._has_ess = any(m.schedule.name == "ess" for m in self.members)  # the tilt solve is traced only then
        # the running normaliser's and RAE's branches of the objective are traced only when used
        self._has_running = any(m.schedule.normalizer == "running" for m in self.members)
        self._has_rae = any(m.schedule.switch_to == "rae" for m in self.members)
        self._hyper_cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}  # column -> (values, tensor)
        self.loss_hyper = self._loss_hyper()

    # --- construction --------------------------------------------------------------------------
    def _initial_stack(
        self, factory: Callable[[], nn.Module]
    ) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
        models = []
        for m in self.members:
            with torch.random.fork_rng():
                torch.manual_seed(m.train.seed)
                models.append(factory().to(self.device))
        shapes = [[tuple(p.shape) for p in model.parameters()] for model in models]
        if any(s != shapes[0] for s in shapes):
            raise InputError("all members of a batched run must have the same parameter shapes")
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        return base, {n: p.detach() for n, p in params.items()}, buffers

    @staticmethod
    def _initial_theta(schedule: LambdaSchedule) -> Tensor:
        """lambda's parameter theta as the schedule's ANRATLoss sets it (0 for other members)."""
        if isinstance(schedule.nrae, ANRATLoss):
            return schedule.nrae.theta.detach().clone()
        return torch.zeros((), dtype=torch.float32)

    def _trained(self) -> dict[str, Tensor]:
        """Everything the optimizer steps: the weights and lambda's parameter (``"__theta__"``)."""
        return {**self.params, "__theta__": self.theta}

    def _optimizer_hyper(self) -> dict[str, dict[str, Tensor]]:
        """This epoch's per-member optimizer settings (:func:`anrat.stacked_optim.member_hyperparameters`)."""
        layers = {name for name, _ in self.base.named_modules()}
        return member_hyperparameters(self.members, self._trained(), layers, self.epoch)

    def _loss_hyper(self) -> dict[str, Tensor]:
        """The members' :func:`anrat.objective.objective_settings` as (K,) tensors (refreshed after
        every epoch). Only the columns that changed since the last epoch become new tensors (an
        annealed t, a switch): with one step per epoch (full-batch runs) rebuilding all is a cost."""
        rows = [objective_settings(s, e) for s, e in zip(self.schedules, self._exponents)]
        hyper = {}
        for name, dtype in SETTING_DTYPES.items():
            col = tuple(row[name] for row in rows)
            if name not in self._hyper_cache or self._hyper_cache[name][0] != col:
                self._hyper_cache[name] = (col, torch.tensor(col, dtype=dtype, device=self.device))
            hyper[name] = self._hyper_cache[name][1]
        return hyper

    # --- one step ------------------------------------------------------------------------------
    def _loss_p(self, hyper: dict[str, Tensor]) -> float | Tensor:
        """The error's exponent of the per-sample loss (p for "lp" unless r is set; r, default 2,
        for "true_class_sq"; :func:`anrat.functional.error_exponent`): the shared float when all
        members share it (the same kernel as the Trainer's), else the member's 0-d tensor."""
        return self._exponents[0] if self._same_p else hyper["r"]

    def _member_losses(self, out: Tensor, y: Tensor, hyper: dict[str, Tensor]) -> Tensor:
        exponent = self._loss_p(hyper)
        return per_sample_loss(out, y, self.kind, exponent, r=None if self.kind == "ce" else exponent)

    def _member_grads(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        theta: Tensor,
        x: Tensor,
        y: Tensor,
        hyper: dict[str, Tensor],
    ):
        """One member's gradients (weights, theta) and ``(objective, per-sample losses, ESS)``."""

        def surrogate(params: dict[str, Tensor], theta: Tensor):
            with layout_mode(self.device):
                out = functional_call(self.base, (params, buffers), (x,))
            losses = self._member_losses(out, y, hyper)
            step_hyper = hyper
            if self._has_ess:  # an ess member's t: the tilt at which this batch's ESS is rho * m
                t = tilt_for_ess(losses.detach(), hyper["rho"], backend="torch")
                step_hyper = {**hyper, "t": torch.where(hyper["ess"], t, hyper["t"])}
            value, w, g_theta, running = objective(
                losses, theta, step_hyper, with_running=self._has_running, with_rae=self._has_rae
            )
            m = losses.shape[0]
            # ESS = (sum w)^2 / sum w^2: the running normaliser's and RAE's weights do not sum to 1
            wd = w.detach().double()
            ess = torch.where(hyper["plain"], float(m), wd.sum().square() / wd.square().sum())  # plain: m
            return (w * losses).sum() + g_theta * theta, (value, losses.detach(), running, ess)

        return grad(surrogate, argnums=(0, 1), has_aux=True)(params, theta)

    def _step_chunk(self, lo: int, hi: int, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step of members ``lo:hi`` on their batches ``index`` (k, B); returns their
        objectives (k,), per-sample losses (k, B) and the ESS of their weights (k,)."""
        sl = slice(lo, hi)
        x, y = self.train_split.x[index], self.train_split.y[index]
        params = {n: p[sl] for n, p in self.params.items()}
        buffers = {n: b[sl] for n, b in self.buffers.items()}
        hyper = {n: h[sl] for n, h in self.loss_hyper.items()}
        # excursions: the plain loss on the last plain_steps steps of every period (as the schedule's criterion)
        step = torch.full_like(hyper["period"], self.step)
        plain_step = excursion_plain_step(step, hyper["period"], hyper["plain_steps"])
        hyper["plain"] = hyper["plain"] | (hyper["excursions"] & plain_step)
        hyper["running_nrae"] = self.running_nrae[sl]
        (g_params, g_theta), (objective, losses, running, ess) = vmap(self._member_grads, randomness="different")(
            params, buffers, self.theta[sl], x, y, hyper
        )
        grads = {**g_params, "__theta__": g_theta}
        trained = self._trained()
        names = list(grads)
        new, new_states = self.optimizer.update(
            [trained[n][sl] for n in names],
            [grads[n] for n in names],
            [{s: v[sl] for s, v in self.opt_state[n].items()} for n in names],
            [{h: v[sl] for h, v in self.hp[n].items()} for n in names],
        )
        ok = self.active[sl] & torch.isfinite(objective)
        if "__theta__" in names:  # "direct": lambda projected back onto its bounds (ANRATLoss.project_)
            i, new = names.index("__theta__"), list(new)
            bounded = torch.clamp(new[i], hyper["lo"].to(new[i].dtype), hyper["hi"].to(new[i].dtype))
            new[i] = torch.where(hyper["direct"], bounded, new[i])
        for name, stepped in zip(names, new):
            if name != "__theta__":
                ok &= torch.isfinite(stepped).reshape(stepped.shape[0], -1).all(dim=1)
        # theta moves only for ANRAT members on the NRAE (a switched member's loss ignores it)
        theta_ok = ok & hyper["anrat"] & ~hyper["plain"] & ~hyper["rae"]
        on_running = self.active[sl] & hyper["running"] & ~hyper["plain"]
        self.running_nrae[sl] = torch.where(on_running, running, self.running_nrae[sl])
        for name, stepped, new_state in zip(names, new, new_states):
            mask = theta_ok if name == "__theta__" else ok
            trained[name][sl] = _where(mask, stepped, trained[name][sl])
            for s, v in new_state.items():
                self.opt_state[name][s][sl] = _where(mask, v, self.opt_state[name][s][sl])
        newly_frozen = self.active[sl] & ~ok
        self.frozen_step[sl] = torch.where(newly_frozen, self.step, self.frozen_step[sl])
        self.active[sl] &= ok
        return objective, losses, ess

    def train_epoch(self) -> dict[str, Any]:
        """One epoch of every member; returns the epoch's record (per-member lists)."""
        self.base.train()
        started = time.perf_counter()
        n, bs, k = len(self.train_split), self.shared.batch_size, len(self.members)
        orders = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
        objective_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        max_loss = torch.full((k,), -math.inf, dtype=torch.float64, device=self.device)
        ess_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        ess_fraction_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        active_before = self.active.clone()
        if any(m.train.lr_decay != "none" for m in self.members):
            self.hp = self._optimizer_hyper()  # this epoch's learning rates
        n_batches = self.train_split.num_batches(bs)
        # lambda sampled within the epoch as the Trainer samples it: after step i + 1 when
        # i % trace_every == 0 (each member's lam_samples_per_epoch); theta read at the epoch's end
        trace_every = [max(1, n_batches // max(1, m.train.lam_samples_per_epoch)) for m in self.members]
        traced: list[tuple[int, int, Tensor]] = []  # (batch index, step, theta after the step)
        starts = range(0, n, bs)
        bar = tqdm(starts, total=n_batches, desc=f"epoch {self.epoch + 1}", disable=not self.progress_bar, leave=False)
        for i, start in enumerate(bar):
            index = orders[:, start : start + bs]
            for lo in range(0, k, self.chunk):
                hi = min(lo + self.chunk, k)
                objective, losses, ess = self._step_chunk(lo, hi, index[lo:hi])
                ess_sum[lo:hi] += ess
                ess_fraction_sum[lo:hi] += ess / losses.shape[1]
                objective_sum[lo:hi] += objective.double()
                loss_sum[lo:hi] += losses.double().sum(dim=1)
                max_loss[lo:hi] = torch.maximum(max_loss[lo:hi], losses.double().amax(dim=1))
            self.step += 1
            if any(i % every == 0 for every in trace_every):
                traced.append((i, self.step, self.theta.detach().clone()))
        bar.close()
        self._report_frozen(active_before)
        record = {
            "epoch": self.epoch + 1,
            "criterion": [s.criterion_name for s in self.schedules],
            "train_objective": (objective_sum / max(1, n_batches)).tolist(),
            "train_loss": (loss_sum / max(1, n)).tolist(),
            "train_max_loss": max_loss.tolist(),
            "rho": [s.rho for s in self.schedules],
            "train_ess": (ess_sum / max(1, n_batches)).tolist(),
            "train_ess_fraction": (ess_fraction_sum / max(1, n_batches)).tolist(),
            "lam_trace": self._lam_trace(traced, trace_every),
            "lr": [m.train.lr * lr_factor(m.train, self.epoch) for m in self.members],
        }
        self._end_epoch(record["train_max_loss"])
        record["lam"] = [s.lam for s in self.schedules]
        record["switched"] = [s.switched for s in self.schedules]
        record["switch_epoch"] = [s.switch_epoch for s in self.schedules]
        record["frozen"] = sorted(self.diverged)
        record["train_seconds"] = time.perf_counter() - started  # the whole stack's
        self.epoch += 1
        return record

    def _lam_trace(self, traced: list[tuple[int, int, Tensor]], trace_every: list[int]) -> list[list[list[float]]]:
        """Per member, ``[[step, lambda], ...]`` within the epoch (the Trainer's ``lam_trace``):
        ANRAT's lambda from its theta (clamped to its bounds, then exp, softplus or itself for
        ``"direct"``, in float32 as :meth:`anrat.losses.ANRATLoss.lambda_tensor`), a fixed or
        annealed lambda as it stands; empty for members on the plain loss."""
        if not traced:
            return [[] for _ in self.members]
        thetas = torch.stack([theta for _, _, theta in traced]).cpu()  # (samples, K)
        traces = []
        for k, s in enumerate(self.schedules):
            if s.nrae is None or s.switched:
                traces.append([])
                continue
            if isinstance(s.nrae, ANRATLoss):
                theta = thetas[:, k].clamp(*s.nrae.theta_bounds)
                kind = s.config.parameterization
                lams = lambda_of_theta(theta, kind == "log", kind == "direct")[0].tolist()
            else:
                lams = [s.lam] * len(traced)
            traces.append([[step, lam] for (i, step, _), lam in zip(traced, lams) if i % trace_every[k] == 0])
        return traces

    def _report_frozen(self, active_before: Tensor) -> None:
        for k in torch.nonzero(active_before & ~self.active).flatten().tolist():
            m = self.members[k].train
            self.diverged_epoch[k] = self.epoch + 1
            self.diverged[k] = (
                f"member {k} diverged in epoch {self.epoch + 1} (step {int(self.frozen_step[k]) + 1}): "
                f"the objective or the weights became non-finite (lr={m.lr:g}); frozen at its "
                "last finite weights"
            )

    def _end_epoch(self, max_losses: list[float]) -> None:
        """Each member's schedule takes its epoch-boundary decisions (anneal, switch) as in the
        single-model run; ANRAT's lambda is read from the stacked theta first."""
        self._sync_schedules()
        for k, s in enumerate(self.schedules):
            if k not in self.diverged:
                s.end_epoch(self.epoch, max_losses[k])
        self.loss_hyper = self._loss_hyper()

    # --- evaluation and selection --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: Split, params: dict[str, Tensor] | None = None) -> list[dict[str, float]]:
        """Per member: mean per-sample loss and, for classification, the error rate on ``split``
        (as :func:`anrat.trainer.evaluate`), with the current weights or ``params``."""
        params = self.params if params is None else params
        was_training = self.base.training
        self.base.eval()
        k = len(self.members)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        wrong = torch.zeros(k, dtype=torch.int64, device=self.device)
        classify = self.kind == "ce" or not split.y.is_floating_point()
        for x, y in split.batches(self.shared.eval_batch_size):
            for lo in range(0, k, self.chunk):
                sl = slice(lo, min(lo + self.chunk, k))
                hyper = {n: h[sl] for n, h in self.loss_hyper.items()}
                out, losses = vmap(self._member_eval, in_dims=(0, 0, None, None, 0), randomness="different")(
                    {n: p[sl] for n, p in params.items()}, {n: b[sl] for n, b in self.buffers.items()}, x, y, hyper
                )
                loss_sum[sl] += losses.double().sum(dim=1)
                if classify:
                    pred = (
                        (out.reshape(out.shape[0], -1) > 0).long()
                        if out.dim() == 2 or out.shape[2] == 1
                        else out.argmax(dim=2)
                    )
                    wrong[sl] += (pred != y.reshape(-1).long()).sum(dim=1)
        self.base.train(was_training)
        n = len(split)
        results = [{"loss": s / n} for s in loss_sum.tolist()]
        if classify:
            for r, w in zip(results, wrong.tolist()):
                r["error"] = w / n
        return results

    def _member_eval(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor, hyper: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        with layout_mode(self.device):
            out = functional_call(self.base, (params, buffers), (x,))
        return out, self._member_losses(out, y, hyper)

    def _consider(self, epoch: int, vals: list[dict[str, float]] | None) -> None:
        """Keep each member's weights of ``epoch`` if they beat its best validation score so far
        (strictly, as the Trainer), or unconditionally when there is no validation split or the
        member keeps its last epoch (``train.select = "last"``)."""
        k = len(self.members)
        improved = []
        for i in range(k):
            val = vals[i] if vals is not None else None
            better = improves(val, self.best_val[i], self.members[i].train.select)
            if better:
                self.best_epoch[i], self.best_val[i] = epoch, val
            improved.append(better)
        mask = torch.tensor(improved, device=self.device)
        if self.best_params is None:
            self.best_params = {n: p.clone() for n, p in self.params.items()}
        else:
            self.best_params = {n: _where(mask, p, self.best_params[n]) for n, p in self.params.items()}

    # --- the run -------------------------------------------------------------------------------
    def fit(self, epochs: int | None = None, resume: bool = True) -> BatchedResult:
        """Train every member until ``epochs`` (default: the members' ``epochs``) are complete,
        resuming from ``out_dir/last.pt`` when ``resume`` and it exists (a finished run with fewer
        epochs goes on from there)."""
        epochs = self.shared.epochs if epochs is None else epochs
        if resume and self.out_dir is not None and (self.out_dir / "last.pt").exists():
            self.load_state_dict(load_checkpoint(self.out_dir / "last.pt", map_location=self.device))
        if self.best_params is None and self.val_split is not None and self.epoch == 0:
            self._consider(0, self.evaluate(self.val_split))
        while self.epoch < epochs:
            started = time.perf_counter()
            record = self.train_epoch()
            if self.val_split is not None:
                vals = self.evaluate(self.val_split)
                record["val"] = vals
                self._consider(self.epoch, vals)
            elif self.epoch == epochs:
                self._consider(self.epoch, None)
            record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            self.save()
            if self.progress:
                print(stack_epoch_line(record, epochs), file=sys.stderr, flush=True)
        return self.result()

    def result(self) -> BatchedResult:
        return BatchedResult(
            list(self.best_epoch),
            list(self.best_val),
            [s.switch_epoch for s in self.schedules],
            dict(self.diverged),
            dict(self.diverged_epoch),
            list(self.history),
        )

    # --- export of one member ------------------------------------------------------------------
    def member_state_dict(self, k: int, best: bool = True) -> dict[str, Tensor]:
        """Member ``k``'s weights as the ``state_dict`` of one ``model_factory()`` network (the
        selected epoch's, or with ``best=False`` the last epoch's), on the CPU."""
        if not 0 <= k < len(self.members):
            raise InputError(f"no member {k}; the run has {len(self.members)} members")
        params = self.best_params if best and self.best_params is not None else self.params
        state = {n: p[k].detach().cpu().clone() for n, p in {**params, **self.buffers}.items()}
        order = [n for n, _ in self.base.state_dict(keep_vars=True).items()]
        return {n: state[n] for n in order}

    def member_model(self, k: int, best: bool = True) -> nn.Module:
        """Member ``k`` as a plain ``nn.Module`` on the CPU."""
        model = copy.deepcopy(self.base).to_empty(device="cpu")
        model.load_state_dict(self.member_state_dict(k, best))
        return model.train(False)

    def member_checkpoint(self, k: int) -> dict[str, Any]:
        """Member ``k``'s selected weights in the single-model checkpoint layout
        (:meth:`anrat.trainer.Trainer.model_checkpoint`): what the pruning stage takes."""
        m = self.members[k]
        return {
            "format": FORMAT,
            "arch": copy.deepcopy(self.arch),
            "state_dict": self.member_state_dict(k),
            "lam": self.schedules[k].lam,
            "schedule": asdict(m.schedule),
            "train": asdict(m.train),
            "epoch": self.epoch,
            "best_epoch": self.best_epoch[k],
            "metrics": {"val": self.best_val[k]},
            "run_config": {"batched_member": k},
        }

    # --- checkpoints ---------------------------------------------------------------------------
    def _sync_schedules(self) -> None:
        """Copy the stacked per-member state (ANRAT's theta, the running NRAE) into the schedules'
        losses, where the schedules' own rules and checkpoints read it (one host transfer each)."""
        thetas, running = self.theta.detach().cpu().tolist(), self.running_nrae.detach().cpu().tolist()
        with torch.no_grad():
            for k, s in enumerate(self.schedules):
                if isinstance(s.nrae, ANRATLoss):
                    s.nrae.theta.fill_(thetas[k])
                elif isinstance(s.nrae, NRAELoss) and s.nrae.normalizer == "running":
                    s.nrae.running_nrae.fill_(running[k])

    def state_dict(self) -> dict[str, Any]:
        """The whole stack, as data ``torch.load(weights_only=True)`` reads."""
        self._sync_schedules()
        return {
            "format": BATCHED_FORMAT,
            "arch": copy.deepcopy(self.arch),
            "members": member_settings(self.members),
            "run_config": copy.deepcopy(self.run_config),
            "params": _on_cpu(self.params),
            "buffers": _on_cpu(self.buffers),
            "theta": self.theta.cpu(),
            "running_nrae": self.running_nrae.cpu(),
            "optimizer": {n: _on_cpu(s) for n, s in self.opt_state.items()},
            "schedules": [s.state_dict() for s in self.schedules],
            "active": self.active.cpu(),
            "frozen_step": self.frozen_step.cpu(),
            "diverged": {str(k): v for k, v in self.diverged.items()},
            "diverged_epoch": {str(k): v for k, v in self.diverged_epoch.items()},
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best_epoch": list(self.best_epoch),
            "best_val": list(self.best_val),
            "best_params": _on_cpu(self.best_params) if self.best_params is not None else None,
            "rng": {"generators": [g.get_state() for g in self.generators], **global_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != BATCHED_FORMAT:
            raise InputError(f"not a batched-run checkpoint (format {state.get('format')!r})")
        # options added since a checkpoint was written are absent from it; their defaults do what it did
        defaults = {"train": asdict(TrainConfig()), "schedule": asdict(ScheduleConfig())}
        saved = [{part: {**defaults[part], **m[part]} for part in defaults} for m in state["members"]]
        if fixed_settings(saved) != fixed_settings(member_settings(self.members)):
            raise InputError(
                "the checkpoint holds a batched run with other members; start afresh (resume=False) "
                "or use another out_dir"
            )
        dev = self.device
        self.params = {n: v.to(dev) for n, v in state["params"].items()}
        self.buffers = {n: v.to(dev) for n, v in state["buffers"].items()}
        self.theta = state["theta"].to(dev)
        if "running_nrae" in state:  # absent from checkpoints written before the running normaliser
            self.running_nrae = state["running_nrae"].to(dev)
        self.opt_state = {n: {s: v.to(dev) for s, v in d.items()} for n, d in state["optimizer"].items()}
        for s, saved_state in zip(self.schedules, state["schedules"]):
            s.load_state_dict(saved_state)
        self.loss_hyper = self._loss_hyper()
        self.active, self.frozen_step = state["active"].to(dev), state["frozen_step"].to(dev)
        self.diverged = {int(k): v for k, v in state["diverged"].items()}
        self.diverged_epoch = {int(k): v for k, v in state["diverged_epoch"].items()}
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self.best_epoch, self.best_val = list(state["best_epoch"]), list(state["best_val"])
        best = state["best_params"]
        self.best_params = {n: v.to(dev) for n, v in best.items()} if best is not None else None
        for g, g_state in zip(self.generators, state["rng"]["generators"]):
            g.set_state(g_state.cpu())
        set_global_rng_state(state["rng"])

    def save(self) -> None:
        """``last.pt`` (atomic) and ``metrics.jsonl`` (one line per epoch) in ``out_dir``."""
        if self.out_dir is None:
            return
        save_atomic(self.state_dict(), self.out_dir / "last.pt")
        write_text_atomic(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))


__all__ = [
    "BATCHED_FORMAT",
    "BatchedResult",
    "BatchedTrainer",
    "Member",
    "grid",
    "stack_epoch_line",
    "unsupported_option",
]
