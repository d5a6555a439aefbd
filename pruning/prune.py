"""The iterative pruning loop: test -> prune -> fine-tune -> repeat, with rollback.

One round on a model whose weights are plain tensors (no prune hooks):

1. **Test** every weight and unit of the Linear/Conv layers (:func:`pruning.wald_test`).
2. **Prune** the weights whose H0: w = 0 is not rejected (zeroed), then **remove** the units that
   are jointly insignificant or left with no weight at all (:func:`pruning.surgery.prune_units`,
   the adjacent layers shrink).
3. **Fine-tune** under masks (``torch.nn.utils.prune``, so the pruned weights stay exactly zero)
   with the anrat trainer, selecting the best epoch on validation; then make the masks permanent.
4. **Check** validation error against the unpruned model's: above ``tolerance`` (in error-rate
   units, e.g. 0.001 = 0.1 percentage point) the round is rolled back and retried with half the
   step (a kept round doubles it back); the loop stops at the smallest step, when a test finds
   nothing more to prune, or after ``max_rounds``.

The baselines (magnitude, Optimal Brain Damage; :mod:`pruning.importance`) go through
:func:`prune_to_sparsity`: one shot to a given fraction of weights removed, dead units removed the
same way, and the same fine-tuning.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from anrat.data import Split, as_split
from anrat.errors import InputError
from anrat.functional import LossKind
from anrat.schedules import LambdaSchedule, ScheduleConfig, fixed_tilt
from anrat.trainer import Distillation, TrainConfig, Trainer, evaluate
from pruning.acceptance import NonInferiority, check_margin_alpha, paired_noninferiority
from pruning.export import export_onnx, paired_latency
from pruning.flat import flatten, unflatten
from pruning.importance import Importance, make_importance
from pruning.layers import is_convolution, output_layer, prunable_layers, weight_name
from pruning.masks import apply_masks, count_nonzero, count_total, make_permanent
from pruning.saliency import masks_at_sparsity
from pruning.significance import WaldResult, check_covariance, check_test_options, wald_test
from pruning.surgery import prune_units


@dataclass
class FineTune:
    """How the network recovers after each pruning round: ``epochs`` of ``optimizer`` (a
    ``torch.optim`` class name) on the per-sample loss, the learning rate annealed from ``lr`` to 0
    within the round (``lr_decay="cosine_step"``; ``"none"`` keeps it constant), distilling from the
    unpruned model with weight ``distill`` at ``temperature`` (:class:`anrat.trainer.Distillation`;
    0: off), and ``final_epochs`` more of the same after the last kept round. The last state is
    kept: recovery selects nothing on the validation data, which stays free for the acceptance test.

    The defaults were chosen on validation data of the main job's trained LeNet-5
    (docs/results/main-job.md): a well-trained network ends its training at a learning rate near 0, and a
    constant rate, the earlier default, undid that annealing.
    """

    epochs: int = 1
    lr: float = 0.03
    batch_size: int = 64
    momentum: float = 0.9
    seed: int = 0
    optimizer: str = "sgd"
    lr_decay: str = "cosine_step"
    distill: float = 0.5
    temperature: float = 4.0
    final_epochs: int = 1
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="plain"))

    @classmethod
    def constant_rate(cls, **options: Any) -> FineTune:
        """The recovery before issue 23: a constant learning rate, no momentum, no distillation, no
        final recovery (``options`` set the rest: ``lr``, ``optimizer``, ``epochs``...). The
        benchmarks whose recorded figures were measured with it use it."""
        return cls(**{"momentum": 0.0, "lr_decay": "none", "distill": 0.0, "final_epochs": 0, **options})

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        """The trainer settings of one fine-tuning of ``epochs`` (default ``self.epochs``), validated
        with the schedule and the distillation options: a bad optimizer, rate, lambda, weight or
        temperature is refused here."""
        config = TrainConfig(
            epochs=self.epochs if epochs is None else epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            seed=self.seed,
            optimizer=self.optimizer,
            lr_decay=self.lr_decay,
            select="last",
        )
        config.validate()
        self.schedule.validate()
        Distillation(nn.Identity(), self.distill, self.temperature).validate()
        if isinstance(self.final_epochs, bool) or not isinstance(self.final_epochs, int) or self.final_epochs < 0:
            raise InputError(f"final_epochs must be an integer >= 0, got {self.final_epochs!r}")
        return config


@dataclass
class Target:
    """What a deployer asks for, instead of the statistical stopping rule: prune until the network
    keeps at most ``params`` nonzero weights (a count >= 1, or a fraction of the unpruned model's in
    (0, 1)), and/or until its ONNX model runs ``speedup`` times faster than the unpruned one in
    onnxruntime at batch 1 (> 1, measured each round). Rounds are then kept whatever their cost, the
    tests' p-values ranking what goes first; the cost is reported with its confidence bound."""

    params: float | None = None
    speedup: float | None = None

    @property
    def active(self) -> bool:
        return self.params is not None or self.speedup is not None

    def validate(self, total: int | None = None) -> None:
        """Refuse a target that cannot be reached (``total``: the model's prunable weights)."""
        p = self.params
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, int | float) or not p > 0 or (p >= 1 and p != int(p))
        ):
            raise InputError(
                f"target params must be a count of weights (an integer >= 1) or a fraction in (0, 1), got {p!r}"
            )
        if p is not None and total is not None and p >= 1 and p >= total:
            raise InputError(f"target params {int(p):,} is not below the model's {total:,} prunable weights")
        sp = self.speedup
        if sp is not None and (isinstance(sp, bool) or not isinstance(sp, int | float) or not 1 < sp < 1000):
            raise InputError(f"target speedup must be a number in (1, 1000), got {sp!r}")

    def validate_for(self, model: nn.Module) -> int:
        """:meth:`validate` against ``model``'s prunable weights; returns their count."""
        total = sum(int(m.weight.numel()) for m in prunable_layers(model).values())
        self.validate(total)
        return total

    def weights(self, total: int) -> int | None:
        """The most nonzero weights the target allows, of ``total``; None: no weight target."""
        if self.params is None:
            return None
        return int(self.params * total) if self.params < 1 else int(self.params)


@dataclass
class PruneResult:
    model: nn.Module  # the pruned model, masks permanent, units removed
    rounds: list[dict[str, Any]]  # one record per round (kept or rolled back)
    base_val: dict[str, float]  # validation figures of the unpruned model
    final_val: dict[str, float]
    params_before: int
    params_after: int
    nonzero_after: int
    # the final model's acceptance test against the unpruned one (NonInferiority.as_dict; classification)
    acceptance: dict[str, Any] | None = None
    final_recovery: dict[str, Any] | None = None  # the recovery after the last kept round
    warning: str | None = None  # why the validation data cannot judge the pruning, if they cannot


def _zero_(model: nn.Module, keep: dict[str, Tensor]) -> int:
    """Multiply weights by their keep-masks in place; return how many nonzero weights were zeroed."""
    params = dict(model.named_parameters())
    removed = 0
    with torch.no_grad():
        for name, mask in keep.items():
            w = params[name]
            mask = mask.to(w.device)
            removed += int(((w != 0) & ~mask).sum())
            w.mul_(mask)
    return removed


def _capped_masks(test: WaldResult, step: float, significant_too: bool = False) -> dict[str, Tensor]:
    """Keep-masks that prune the insignificant weights with the largest p-values, at most a
    fraction ``step`` of the weights still nonzero (over all tested layers). ``significant_too``
    (a target to reach): the significant ones may go as well, after the others (larger p first)."""
    pvals = flatten(test.pvalues)
    alive = flatten({n: z != 0 for n, z in test.z.items()})  # z = 0 <=> w = 0 (already pruned)
    candidate = alive if significant_too else ~flatten(test.significant) & alive
    budget = min(int(candidate.sum()), int(step * int(alive.sum())))
    drop = torch.zeros_like(candidate)
    if budget > 0:
        order = torch.argsort(torch.where(candidate, pvals, torch.full_like(pvals, -1.0)), descending=True)
        drop[order[:budget]] = True
    return unflatten(~drop, test.significant)


def _unit_budget(width: int, step: float, block: int) -> int:
    """How many of a layer's ``width`` units one round may remove: ``step`` of them, counted in
    whole blocks of ``block`` units (the nearest number of blocks, ties up) for a layer wider than
    one block. Counting a convolution's budget in blocks of ``channel_multiple`` filters keeps a
    smaller step from proposing a part-block that alignment would round back to nothing."""
    if block > 1 and width > block:
        return int(step * width / block + 0.5) * block
    return int(step * width)


def _capped_units(
    test: WaldResult, step: float, blocks: dict[str, int] | None = None, significant_too: bool = False
) -> dict[str, Tensor]:
    """Jointly insignificant units with the largest p-values, at most ``step`` of each layer
    (:func:`_unit_budget`; ``blocks`` maps a layer to its block size, 1 if absent).
    ``significant_too`` (a target to reach): every unit but the output layer's is a candidate,
    the insignificant ones first since their p-values are larger."""
    candidates = test.redundant_units()
    if significant_too:
        candidates = {
            layer: torch.arange(p.numel()) for layer, p in test.unit_pvalues.items() if layer != test.output_layer
        }
    units = {}
    for layer, idx in candidates.items():
        budget = _unit_budget(test.unit_pvalues[layer].numel(), step, (blocks or {}).get(layer, 1))
        if idx.numel() and budget:
            order = torch.argsort(test.unit_pvalues[layer][idx], descending=True)
            units[layer] = idx[order[:budget]]
    return units


def _alive(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Per named weight, which entries are nonzero (bool, on the CPU)."""
    params = dict(model.named_parameters())
    return {name: (params[name].detach() != 0).cpu() for name in names}


def _lowest_weights(scores: dict[str, Tensor], alive: dict[str, Tensor], step: float) -> dict[str, Tensor]:
    """Keep-masks that drop the lowest-scoring ``step`` fraction of the nonzero weights (``alive``)
    over all scored layers; zero weights are not counted."""
    flat = flatten(scores)
    alive = flatten(alive)
    budget = int(step * int(alive.sum()))
    drop = torch.zeros_like(alive)
    if budget > 0:
        order = torch.argsort(torch.where(alive, flat, torch.full_like(flat, math.inf)))
        drop[order[:budget]] = True
    return unflatten(~drop, scores)


def _lowest_units(
    scores: dict[str, Tensor], alive: dict[str, Tensor], step: float, blocks: dict[str, int], output: str | None
) -> dict[str, Tensor]:
    """Per layer (the output layer aside), the ``step`` share of its live units (:func:`_unit_budget`;
    a unit is live while it has a nonzero weight) with the lowest summed weight scores (for
    magnitude the unit's L1 norm)."""
    units = {}
    for name, score in scores.items():
        layer = name.rsplit(".", 1)[0]
        if layer == output:
            continue
        per_unit = score.reshape(score.shape[0], -1).sum(dim=1)
        live = torch.nonzero(alive[name].reshape(score.shape[0], -1).any(dim=1)).flatten()
        budget = _unit_budget(live.numel(), step, blocks.get(layer, 1))
        if budget and live.numel() > 1:
            units[layer] = live[torch.argsort(per_unit[live])[:budget]]
    return units


def _dead_units(model: nn.Module, layers: list[str]) -> dict[str, Tensor]:
    """Units (rows / filters) of the named layers whose weights are all zero."""
    modules = dict(model.named_modules())
    dead = {}
    for name in layers:
        w = modules[name].weight
        idx = torch.nonzero(w.detach().reshape(w.shape[0], -1).abs().sum(dim=1) == 0).flatten().cpu()
        if idx.numel():
            dead[name] = idx
    return dead


def _merge_units(*groups: dict[str, Tensor]) -> dict[str, Tensor]:
    merged: dict[str, Tensor] = {}
    for group in groups:
        for name, idx in group.items():
            merged[name] = torch.unique(torch.cat([merged.get(name, idx.new_empty(0)), idx]))
    return {name: idx for name, idx in merged.items() if idx.numel()}


def _conv_block(width: int, multiple: int, below_one_block: bool = False) -> int:
    """The block a convolution of ``width`` filters is counted and aligned in: ``multiple``, or with
    ``below_one_block`` (a speed target), for a layer no wider than one block, the block halved
    until it is narrower than the layer (16 filters go in 8s, then 4s). Onnxruntime gains nothing
    from part blocks of a wide layer, but a layer of one block that sets the floor (a first
    convolution at full resolution) only gets faster with fewer filters (docs/results/user-model.md)."""
    if below_one_block:
        while multiple > 1 and width <= multiple:
            multiple //= 2
    return multiple


def _aligned_width(kept: int, width: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (ties up), within [multiple, width];
    a layer narrower than ``multiple`` keeps its width."""
    if width <= multiple:
        return width
    return min(width, max(multiple, (kept + multiple // 2) // multiple * multiple))


def _remove_units(
    model: nn.Module,
    units: dict[str, Tensor],
    example_input: Tensor,
    output_layer: str | None,
    blocks: dict[str, int] | None = None,
) -> dict[str, int]:
    """Remove units, never a whole layer and never the output layer's units.

    A convolution is left with a multiple of its block, ``blocks[name]`` (``channel_multiple``, or
    less under a speed target, :func:`_conv_block`), filters (or all it has):
    onnxruntime's CPU convolutions work on blocks of 8 (AVX2) or 16 (AVX-512) channels, and a layer
    left with, say, 17 or 24 of 32 filters ran no faster, or slower, than the unpruned one
    (docs/results/main-job.md). The count is rounded to the nearest multiple: down, by also removing the
    tested layer's weakest remaining filters (smallest L1 norm), or up, by keeping back the
    strongest candidates. The rollback rule then judges the round as usual.
    """
    modules = dict(model.named_modules())
    plan = {}
    for name, idx in units.items():
        if name == output_layer:
            continue
        width = modules[name].weight.shape[0]
        norms = modules[name].weight.detach().reshape(width, -1).abs().sum(dim=1).cpu()
        if idx.numel() >= width:  # keep the strongest unit rather than cut the network in two
            idx = idx[idx != int(norms.argmax())]
        block = (blocks or {}).get(name, 1)
        if is_convolution(modules[name]) and block > 1:
            target = _aligned_width(width - idx.numel(), width, block)
            drop = torch.zeros(width, dtype=torch.bool)
            drop[idx] = True
            by_strength = torch.argsort(norms, descending=True)
            # survivors strongest first, then candidates strongest first: the first `target` stay
            order = torch.cat([by_strength[~drop[by_strength]], by_strength[drop[by_strength]]])
            idx = order[target:].sort().values
        if idx.numel():
            plan[name] = idx
    if plan:
        prune_units(model, plan, example_input)
    return {name: int(idx.numel()) for name, idx in plan.items()}


def _align_filters(model: nn.Module, multiple: int, example_input: Tensor, output_layer: str | None) -> dict[str, int]:
    """Narrow each convolution wider than ``multiple`` filters (the output layer aside) to a
    multiple of it, rounded down, removing its weakest filters (smallest L1 norm of their
    weights); return the filters removed per layer."""
    plan = {}
    for name, module in prunable_layers(model).items():
        width = module.weight.shape[0]
        if name == output_layer or not is_convolution(module) or width <= multiple or width % multiple == 0:
            continue
        norms = module.weight.detach().reshape(width, -1).abs().sum(dim=1).cpu()
        plan[name] = torch.argsort(norms)[: width % multiple].sort().values
    if plan:
        prune_units(model, plan, example_input)
    return {name: int(idx.numel()) for name, idx in plan.items()}


def fine_tune(
    model: nn.Module,
    train: Split,
    ft: FineTune,
    kind: LossKind = "ce",
    progress: bool = False,
    *,
    teacher: nn.Module | None = None,
    epochs: int | None = None,
) -> None:
    """Recover under masks (:class:`FineTune`, ``epochs`` overriding ``ft.epochs``): the zero
    weights of the prunable layers are held at zero by ``torch.nn.utils.prune`` hooks; with
    ``teacher`` and ``ft.distill > 0`` (classification) the network distils from it. The last
    state is kept."""
    config = ft.train_config(epochs)
    if config.epochs == 0:
        return
    masks = {weight_name(name): (m.weight != 0) for name, m in prunable_layers(model).items()}
    apply_masks(model, masks)
    schedule = LambdaSchedule(replace(ft.schedule, kind=kind))
    distill = None
    if teacher is not None and ft.distill > 0 and kind == "ce":
        distill = Distillation(teacher, ft.distill, ft.temperature)
    Trainer(model, schedule, train, None, config, progress=progress, distill=distill).fit()
    make_permanent(model)


RANKINGS = ("wald", "magnitude", "taylor", "obd")


@dataclass
class PruneConfig:
    """Every option of :func:`prune` (the pruning command's ``--config``/``--set`` keys and the
    recipes' ``[prune]`` table).

    Attributes:
        alpha, method: level and ``statsmodels`` multiple-testing method of the Wald tests.
        estimator: standard-error estimator (``"kfac"``, ``"diagonal"``, ``"full"``).
        max_samples: training samples the Fisher information is estimated on, per round (None: all).
        structured / unstructured: remove whole units / individual weights.
        tolerance: the margin delta of the acceptance test, the largest rise of error the user
            accepts (error-rate units in (0, 1): 0.001 = 0.1 percentage point; for regression, of
            the mean validation loss). A round is kept when a one-sided non-inferiority test on the
            validation images' paired outcomes, pruned against unpruned, shows the rise is below
            delta at level ``acceptance_alpha`` (:mod:`pruning.acceptance`).
        acceptance_alpha: the level of that test: a round that truly costs delta or more is kept
            with probability at most this.
        max_rounds: test / prune / fine-tune rounds at most.
        step: at most this fraction of the remaining weights (and of each layer's units) is
            removed per round, the least significant first (backward elimination: the standard
            errors of the survivors shrink once their redundant neighbours are gone, so tests are
            repeated on the refitted model rather than trusted for all weights at once). A round
            that is not accepted is rolled back and retried with half the step, down to
            ``min_step``; a kept round multiplies it by ``step_growth`` again, up to ``step``. A convolution's share is
            counted in whole blocks of ``channel_multiple`` filters (:func:`_unit_budget`).
        channel_multiple: a convolution is left with a multiple of this many filters (or all it
            has), rounded to the nearest (:func:`_remove_units`): onnxruntime's CPU convolutions
            work in blocks of 8 or 16 channels, so other widths bring little or no speed; 1: off.
            Under a speed target a layer of one block goes in half blocks (:func:`_conv_block`).
        final_channel_multiple: after the last kept round, each convolution wider than this is
            narrowed to a multiple of it, rounded down, its weakest filters (smallest L1 norm)
            going (:func:`_align_filters`); the final recovery follows and the acceptance test
            judges the result, undoing the alignment if it fails. Unlike ``channel_multiple`` it
            leaves the rounds' steps fine. 16 is onnxruntime's block on AVX-512 CPUs and a multiple
            of the AVX2 block of 8; 1: off.
        fine_tune: how each round recovers (:class:`FineTune`).
        ranking: what goes first: ``"wald"`` (the tests' p-values, weights and units by their joint
            tests; insignificant ones only) or a baseline importance of :mod:`pruning.importance`
            (``"magnitude"``, ``"taylor"``, ``"obd"``: the lowest scores first, units by their summed
            scores), each capped by ``step``; for comparisons at the same recovery budget.
        target: prune to a size or speed instead of stopping by the acceptance test (:class:`Target`).
        covariance, tilt: ``"fisher"`` or ``"sandwich"`` covariance of the Wald tests and the t of
            the NRAE the model was trained (and is fine-tuned) to minimise
            (:func:`pruning.significance.wald_test`; the sandwich needs ``estimator`` ``"full"`` or
            ``"diagonal"``).
    """

    alpha: float = 0.05
    method: str = "holm"
    estimator: str = "kfac"
    covariance: str = "fisher"
    tilt: float = 0.0
    max_samples: int | None = 10_000
    structured: bool = True
    unstructured: bool = True
    tolerance: float = 0.002
    acceptance_alpha: float = 0.05
    max_rounds: int = 10
    step: float = 0.25
    min_step: float = 0.05
    step_growth: float = 1.0
    channel_multiple: int = 16
    final_channel_multiple: int = 1
    fine_tune: FineTune = field(default_factory=FineTune)
    target: Target = field(default_factory=Target)
    ranking: str = "wald"

    def validate(self) -> None:
        """Refuse what :func:`prune` cannot run, before any work (NaN fails every comparison)."""
        check_test_options(self.alpha, self.estimator, self.method)
        check_covariance(self.covariance, self.tilt, self.estimator)
        check_margin_alpha(self.tolerance, self.acceptance_alpha)
        if not (self.structured or self.unstructured):
            raise InputError("nothing to do: both structured and unstructured pruning are off")
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise InputError(f"need max_rounds >= 1, got {self.max_rounds!r}")
        if not 0 < self.step <= 1 or not 0 < self.min_step <= self.step:
            raise InputError(f"need 0 < min_step <= step <= 1, got step={self.step!r}, min_step={self.min_step!r}")
        if not 1 <= self.step_growth <= 16:
            raise InputError(f"step_growth must be in [1, 16], got {self.step_growth!r}")
        for name in ("channel_multiple", "final_channel_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or self.max_samples < 1):
            raise InputError(f"max_samples must be >= 1 (or None: all), got {self.max_samples!r}")
        self.fine_tune.train_config()
        self.target.validate()
        if self.ranking not in RANKINGS:
            raise InputError(f"unknown ranking {self.ranking!r}; expected one of {', '.join(RANKINGS)}")

    def significance(self, model: nn.Module, data: Split, kind: LossKind = "ce", progress: bool = False) -> WaldResult:
        """The Wald tests of ``model`` on ``data`` (the training data) with this configuration's
        statistics (:func:`pruning.significance.wald_test`)."""
        return wald_test(
            model,
            data,
            loss=kind,
            estimator=self.estimator,
            alpha=self.alpha,
            method=self.method,
            max_samples=self.max_samples,
            progress=progress,
            covariance=self.covariance,
            tilt=self.tilt,
        )

    def for_criterion(self, criterion: ScheduleConfig) -> PruneConfig:
        """A copy that tests and fine-tunes by ``criterion``, the criterion the model was trained
        with (:func:`anrat.schedules.criterion_at_epoch`): the fine-tuning minimises it, and when
        it is NRAE at one tilt t (:func:`anrat.schedules.fixed_tilt`), which is not a likelihood,
        the Wald tests use the sandwich covariance at that t. Otherwise the covariance stays as
        configured (the Fisher is valid for the plain loss; ``ess`` moves its t every batch).
        """
        tilted = replace(self, fine_tune=replace(self.fine_tune, schedule=criterion))
        tilt = fixed_tilt(criterion)
        if tilt is None:
            return replace(tilted, tilt=0.0)
        if self.estimator == "kfac":
            raise InputError(
                f"the model was trained by NRAE at t = {tilt:.4g}: its Wald tests need the sandwich "
                "covariance, which has no KFAC form; set the pruning estimator to 'diagonal' or 'full'"
            )
        return replace(tilted, covariance="sandwich", tilt=tilt)

    def with_options(self, **options: Any) -> PruneConfig:
        """A copy with the named fields replaced; an unknown name is refused."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InputError(f"unknown pruning option {unknown[0]!r}; expected one of {', '.join(names)}")
        return replace(self, **options)


def wrong_outcomes(model: nn.Module, split: Split, batch_size: int = 1000) -> Tensor:
    """Per sample of ``split``, whether ``model`` misclassifies it (bool, on the CPU)."""
    was_training = model.training
    model.eval()
    wrong = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            out = model(split.x[start : start + batch_size])
            wrong.append((out.argmax(dim=1) != split.y[start : start + batch_size]).cpu())
    model.train(was_training)
    return torch.cat(wrong)


def validation_warning(val_error: float, n_val: int, other_error: float | None = None, other: str = "") -> str | None:
    """One line when the validation data cannot judge pruning: the model makes no error on them, or
    far fewer than on ``other`` data (error ``other_error``; e.g. the test images), the signs of
    images it was trained on. None when neither holds."""
    remedy = "give held-out images the model never saw with --val-data"
    if val_error == 0 and n_val >= 100:
        return (
            f"warning: the model makes no error on the {n_val:,} validation images, so pruning cannot be judged "
            f"on them (were they part of its training data?); {remedy}"
        )
    if other_error is not None and other_error * n_val >= 20 and val_error < other_error / 3:
        return (
            f"warning: validation error {val_error:.2%} is far below the {other_error:.2%} on {other}: the "
            f"validation images look like training images, and every pruning round will look worse; {remedy}"
        )
    return None


def _significant_counts(test: WaldResult) -> dict[str, int]:
    alive = {n: z != 0 for n, z in test.z.items()}
    return {
        "weights_tested": int(sum(int(a.sum()) for a in alive.values())),
        "weights_significant": int(sum(int((test.significant[n] & alive[n]).sum()) for n in alive)),
        "units_tested": int(sum(v.numel() for k, v in test.unit_significant.items() if k != test.output_layer)),
        "units_significant": int(sum(int(v.sum()) for k, v in test.unit_significant.items() if k != test.output_layer)),
    }


STATISTICS_BLIND = (
    "the tests found (almost) nothing significant, so the amount removed was set by the step{target}, "
    "not by the statistics"
)


def _judge(
    model: nn.Module,
    val: Split,
    kind: LossKind,
    reference_wrong: Tensor | None,
    base: dict[str, float],
    config: PruneConfig,
) -> tuple[dict[str, float], NonInferiority | None, bool]:
    """Validation figures of ``model``, its acceptance test against the reference (classification)
    and whether the round passes: the test for classification, mean loss <= base + tolerance for
    regression."""
    figures = evaluate(model, val, kind)
    if reference_wrong is None:
        return figures, None, figures["loss"] <= base["loss"] + config.tolerance
    test = paired_noninferiority(reference_wrong, wrong_outcomes(model, val), config.tolerance, config.acceptance_alpha)
    return figures, test, test.accepted


def _speedup(dense_onnx: Path, model: nn.Module, example: Tensor, folder: Path) -> float:
    """Batch-1 onnxruntime speed-up of ``model`` over the ONNX file ``dense_onnx``, timed in
    alternation (:func:`pruning.export.paired_latency`; 300 calls each: with 100, one CNN's readings
    moved between 1.3x and 2.0x from round to round on a busy machine) on one onnxruntime thread
    (steady when other work shares the cores; :class:`pruning.pipeline.ReportOptions`)."""
    path = folder / "candidate.onnx"
    export_onnx(copy.deepcopy(model).cpu().eval(), path, example.cpu())
    times = paired_latency({"dense": dense_onnx, "pruned": path}, 1, repeats=300, warmup=20, threads=1)
    return times["dense"] / times["pruned"]


def prune(
    model: nn.Module,
    train_data: Split | DataLoader | Dataset | tuple[Tensor, Tensor],
    val_data: Split | DataLoader | Dataset | tuple[Tensor, Tensor],
    config: PruneConfig | None = None,
    *,
    kind: LossKind = "ce",
    progress: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    inspect: Callable[[dict[str, Any], nn.Module], None] | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` by statistical significance, round by round (module docstring).

    Args:
        model: a trained network (modified in place and returned in the result).
        train_data: data the Fisher information is estimated on and the network recovers on (the
            training data): a :class:`anrat.data.Split`, an ``(x, y)`` pair, a ``Dataset`` or a
            ``DataLoader`` (:func:`anrat.data.as_split`; read once into memory, moved to the
            model's device). Inputs are used exactly as given: the model sees what it was trained on.
        val_data: held-out data the acceptance test judges each round on, in any of those forms;
            not the test data, or the test error afterwards is biased. Best not the data that
            selected the model either: the unpruned model's error on them is then optimistic, which
            makes the test conservative (more rounds refused).
        config: the options (:class:`PruneConfig`); keyword ``options`` replace its fields
            (``prune(model, train, val, tolerance=0.002)``).
        kind: the per-sample loss, ``"ce"`` (classification) or ``"lp"`` (regression).
        log: called with each round's record (e.g. to print or write JSONL); a record holds
            ``seconds_left_at_most``, the mean round time so far times the rounds still allowed
            (the loop may stop sooner). :func:`round_line` puts a record in words.
        inspect: called after each kept round with its record and the model as it stands (for
            benchmarks that measure every point of the way; it must not change the model).
    """
    config = (config or PruneConfig()).with_options(**options)
    config.validate()
    max_samples = config.max_samples
    structured, unstructured, max_rounds = config.structured, config.unstructured, config.max_rounds
    step, min_step, channel_multiple = config.step, config.min_step, config.channel_multiple
    layers = list(prunable_layers(model))
    if not layers:
        raise InputError("nothing to prune: the model has no nn.Linear or nn.Conv2d layer")
    target = config.target
    total_weights = target.validate_for(model)
    device = next(model.parameters()).device
    train_data, val_data = as_split(train_data, "train_data", device), as_split(val_data, "val_data", device)
    ft = config.fine_tune
    example_input = train_data.x[:2]
    started = time.perf_counter()
    key = "error" if kind == "ce" else "loss"
    base_val = evaluate(model, val_data, kind)
    params_before = count_total(model)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    reference_wrong = wrong_outcomes(teacher, val_data) if kind == "ce" else None
    weight_target = target.weights(total_weights)
    scratch = tempfile.TemporaryDirectory(prefix="anrat-prune-") if target.speedup is not None else None
    dense_onnx = None
    if scratch is not None:
        dense_onnx = Path(scratch.name) / "dense.onnx"
        export_onnx(copy.deepcopy(teacher).cpu(), dense_onnx, example_input.cpu())
    warning = validation_warning(base_val["error"], len(val_data)) if kind == "ce" else None
    rounds: list[dict[str, Any]] = []
    max_step = step
    kept_any, reached = False, False
    for r in range(1, max_rounds + 1):
        start = time.perf_counter()
        previous = copy.deepcopy(model)
        if weight_target is not None:  # no round removes more than the target asks (units aside)
            alive = count_nonzero_weights(model)
            step = min(step, max(min_step, 1 - weight_target / max(1, alive)))
        speed = target.speedup is not None
        blocks = {
            n: _conv_block(m.weight.shape[0], channel_multiple, speed)
            for n, m in prunable_layers(model).items()
            if is_convolution(m)
        }
        counts: dict[str, int] = {}
        if config.ranking == "wald":
            test = config.significance(model, train_data, kind, progress)
            test.center_layers(model)  # the weights zeroed are the ones whose H0 was not rejected
            # a target is reached whatever it costs: the significant go too, the least significant first;
            # weights only for a size target: zeroed weights bring no speed in a dense ONNX model
            keep = _capped_masks(test, step, significant_too=weight_target is not None)
            candidates = _capped_units(test, step, blocks, significant_too=target.active)
            output = test.output_layer
            counts = _significant_counts(test)
        else:
            scores = make_importance(config.ranking, loss=kind, max_samples=max_samples)(model, train_data)
            output = output_layer(model, example_input)
            alive = _alive(model, scores)
            keep = _lowest_weights(scores, alive, step)
            candidates = _lowest_units(scores, alive, step, blocks, output)
        zeroed = _zero_(model, keep) if unstructured else 0
        units = _merge_units(candidates if structured else {}, _dead_units(model, layers))
        removed_units = _remove_units(model, units, example_input, output, blocks)
        layers = list(prunable_layers(model))
        record: dict[str, Any] = {"round": r, "weights_zeroed": zeroed, "units_removed": removed_units, **counts}
        if counts and counts["weights_significant"] <= 0.01 * counts["weights_tested"]:
            record["statistics"] = STATISTICS_BLIND.format(target=" or the target" if target.active else "")
        if zeroed == 0 and not removed_units:
            record.update({"stopped": "nothing insignificant left", "seconds": time.perf_counter() - start})
            rounds.append(record)
            if log:
                log(record)
            break
        fine_tune(model, train_data, ft, kind, progress=progress, teacher=teacher)
        val, acceptance, passed = _judge(model, val_data, kind, reference_wrong, base_val, config)
        record.update(
            {
                "params": count_total(model),
                "nonzero": count_nonzero(model),
                f"val_{key}": val[key],
                f"base_val_{key}": base_val[key],
                "tolerance": config.tolerance,
                "max_rounds": max_rounds,
                "step": step,
            }
        )
        if acceptance is not None:
            record["acceptance"] = acceptance.as_dict()
        if target.active:
            if weight_target is not None:
                record["target_params"] = weight_target
            if dense_onnx is not None:
                record["speedup_batch1"] = _speedup(dense_onnx, model, example_input, Path(scratch.name))
            reached = (weight_target is None or count_nonzero_weights(model) <= weight_target) and (
                target.speedup is None or record["speedup_batch1"] >= target.speedup
            )
            kept_any = True
            if reached:
                record["stopped"] = "target reached"
        elif passed:
            kept_any = True
            step = min(max_step, config.step_growth * step)  # a kept round earns back the step a rollback halved
        else:
            record["rolled_back"] = True
            model = previous
            if step / 2 >= min_step:  # retry with half the step
                step /= 2
            else:
                record["stopped"] = (
                    f"the round was not shown to be within the tolerance of {config.tolerance:g} at the smallest step"
                )
        record["seconds"] = time.perf_counter() - start
        record["seconds_left_at_most"] = (time.perf_counter() - started) / r * (max_rounds - r)
        rounds.append(record)
        if log:
            log(record)
        if inspect and not record.get("rolled_back"):
            inspect(record, model)
        if record.get("stopped"):
            break
    if target.active and not reached:
        note = {"round": len(rounds), "stopped": "the target was not reached within max_rounds or units left"}
        rounds.append({**note, "weights_zeroed": 0, "units_removed": {}})
        if log:
            log(rounds[-1])
    final = None
    # the convolutions' final alignment, then a longer recovery after the last kept round
    align = kept_any and config.final_channel_multiple > 1
    before = copy.deepcopy(model) if align or (kept_any and ft.final_epochs > 0) else None
    aligned = (
        _align_filters(model, config.final_channel_multiple, example_input, output_layer(model, example_input))
        if align
        else {}
    )
    if before is not None and (aligned or ft.final_epochs > 0):
        start = time.perf_counter()
        epochs = max(1, ft.final_epochs) if aligned else ft.final_epochs  # an aligned model always recovers
        fine_tune(model, train_data, ft, kind, progress=progress, teacher=teacher, epochs=epochs)
        val, acceptance, passed = _judge(model, val_data, kind, reference_wrong, base_val, config)
        alignment = "kept"
        if aligned and not passed and not target.active:  # the alignment cost too much: recover without it
            model, epochs = copy.deepcopy(before), ft.final_epochs
            if epochs:
                fine_tune(model, train_data, ft, kind, progress=progress, teacher=teacher, epochs=epochs)
            val, acceptance, passed = _judge(model, val_data, kind, reference_wrong, base_val, config)
            aligned = {name: 0 for name in aligned}
            alignment = "undone: the aligned model was not shown to be within the tolerance"
        final = {"epochs": epochs, f"val_{key}": val[key]}
        if any(aligned.values()) or alignment != "kept":
            final.update({"filters_aligned": aligned, "alignment": alignment})
        if acceptance is not None:
            final["acceptance"] = acceptance.as_dict()
        if not passed and not target.active:
            kept = [r_ for r_ in rounds if "acceptance" in r_ and not r_.get("rolled_back")]
            if kept and kept[-1]["acceptance"]["accepted"]:
                model, final["kept"] = before, False  # the recovery made the accepted model fail: undo it
        final["seconds"] = time.perf_counter() - start
        if log:
            log({"round": "final", "weights_zeroed": 0, "units_removed": aligned, **final})
    if scratch is not None:
        scratch.cleanup()
    final_val = evaluate(model, val_data, kind)
    acceptance = None
    if reference_wrong is not None:
        acceptance = paired_noninferiority(
            reference_wrong, wrong_outcomes(model, val_data), config.tolerance, config.acceptance_alpha
        ).as_dict()
    return PruneResult(
        model,
        rounds,
        base_val,
        final_val,
        params_before,
        count_total(model),
        count_nonzero(model),
        acceptance=acceptance,
        final_recovery=final,
        warning=warning,
    )


def count_nonzero_weights(model: nn.Module) -> int:
    """Nonzero weights of the prunable layers (biases and other parameters aside)."""
    return sum(int((m.weight != 0).sum()) for m in prunable_layers(model).values())


def round_line(record: dict[str, Any]) -> str:
    """One plain line for a round's record of :func:`prune` (for logs and terminals alike)."""
    if record.get("round") == "final":
        parts = [f"final recovery: {record['epochs']} epoch(s)"]
        if record.get("alignment") == "kept":
            parts.insert(0, "aligned filters " + ", ".join(f"{k}: -{v}" for k, v in record["filters_aligned"].items()))
        elif record.get("alignment"):
            parts.insert(0, f"filter alignment {record['alignment']}")
        if "acceptance" in record:
            parts.append(paired_line(record["acceptance"]))
        if record.get("kept") is False:
            parts.append("undone (the model before it passed the test)")
        return "; ".join(parts)
    of = f"/{record['max_rounds']}" if "max_rounds" in record else ""
    parts = [f"round {record['round']}{of}: zeroed {record['weights_zeroed']:,} weights"]
    if record.get("units_removed"):
        parts.append("removed units " + ", ".join(f"{k}: {v}" for k, v in record["units_removed"].items()))
    if "weights_tested" in record:
        parts.append(
            f"significant: {record['weights_significant']:,} of {record['weights_tested']:,} weights, "
            f"{record['units_significant']} of {record['units_tested']} units"
        )
    if "nonzero" in record:
        parts.append(f"{record['nonzero']:,} nonzero of {record['params']:,} parameters")
    if "speedup_batch1" in record:
        parts.append(f"{record['speedup_batch1']:.2f}x faster at batch 1")
    if "val_error" in record:
        parts.append(f"validation error {record['val_error']:.2%} (unpruned {record['base_val_error']:.2%})")
    if "acceptance" in record:
        parts.append(paired_line(record["acceptance"]))
    elif "val_loss" in record:
        parts.append(f"validation loss {record['val_loss']:.4g} (unpruned {record['base_val_loss']:.4g})")
    parts.append("rolled back" if record.get("rolled_back") else "kept" if "params" in record else "")
    if record.get("statistics"):
        parts.append(record["statistics"])
    if record.get("stopped"):
        parts.append(f"stopped: {record['stopped']}")
    if "seconds" in record:
        left = record.get("seconds_left_at_most")
        if left and not record.get("stopped"):
            parts.append(
                f"{record['seconds']:.0f} s, at most ~"
                + (f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s")
                + " left"
            )
        else:
            parts.append(f"{record['seconds']:.0f} s")
    return "; ".join(p for p in parts if p)


def paired_line(acceptance: dict[str, Any]) -> str:
    """An acceptance test's record (:meth:`pruning.acceptance.NonInferiority.as_dict`) in words."""
    return NonInferiority(**acceptance).line()


def prune_to_sparsity(
    model: nn.Module,
    train_data: Split,
    val_data: Split,
    *,
    criterion: str | Importance,
    fraction_removed: float,
    fine_tune_config: FineTune | None = None,
    kind: LossKind = "ce",
    max_samples: int | None = 10_000,
) -> PruneResult:
    """Baseline: remove ``fraction_removed`` of the prunable layers' weights, the least important
    by ``criterion`` first, in one shot, remove the units left without weights, and fine-tune with
    the same budget as :func:`prune`.

    ``criterion`` is an :class:`pruning.importance.Importance` or its name: ``"magnitude"`` |w|,
    ``"obd"`` 0.5*F_jj*w^2 or ``"wald"`` |z|, built with ``loss=kind`` and ``max_samples`` (an
    object keeps its own options).
    """
    if not 0 <= fraction_removed < 1:
        raise InputError(f"fraction_removed must be in [0, 1), got {fraction_removed!r}")
    scorer = make_importance(criterion, loss=kind, max_samples=max_samples)
    device = next(model.parameters()).device
    train_data, val_data = as_split(train_data, "train_data", device), as_split(val_data, "val_data", device)
    base_val = evaluate(model, val_data, kind)
    params_before = count_total(model)
    teacher = copy.deepcopy(model).eval()  # the unpruned model, distilled from when ft.distill > 0
    start = time.perf_counter()
    scores = scorer(model, train_data)
    total = sum(s.numel() for s in scores.values())
    zeroed = _zero_(model, masks_at_sparsity(scores, fraction_removed))
    layers = list({name.rsplit(".", 1)[0] for name in scores})
    output = output_layer(model, train_data.x[:2])
    removed_units = _remove_units(model, _dead_units(model, layers), train_data.x[:2], output)
    fine_tune(model, train_data, fine_tune_config or FineTune(), kind, teacher=teacher)
    val = evaluate(model, val_data, kind)
    record = {
        "criterion": scorer.name,
        "weights_zeroed": zeroed,
        "weights_scored": total,
        "units_removed": removed_units,
        "params": count_total(model),
        "nonzero": count_nonzero(model),
        "val": val,
        "seconds": time.perf_counter() - start,
    }
    return PruneResult(model, [record], base_val, val, params_before, count_total(model), count_nonzero(model))
