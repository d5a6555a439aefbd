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
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from anrat.data import Split, as_split
from anrat.errors import InputError
from anrat.functional import LossKind
from anrat.schedules import LambdaSchedule, ScheduleConfig, fixed_tilt
from anrat.trainer import TrainConfig, Trainer, evaluate
from pruning.flat import flatten, unflatten
from pruning.importance import Importance, make_importance
from pruning.layers import is_convolution, output_layer, prunable_layers, weight_name
from pruning.masks import apply_masks, count_nonzero, count_total, make_permanent
from pruning.saliency import masks_at_sparsity
from pruning.significance import WaldResult, check_covariance, check_test_options, wald_test
from pruning.surgery import prune_units


@dataclass
class FineTune:
    """How each round fine-tunes: ``optimizer`` (a ``torch.optim`` class name) on the per-sample
    loss, best epoch on validation (the epoch before fine-tuning included).

    The default, Adam at 3e-4 for one epoch, was chosen on validation data for a model trained
    elsewhere (docs/results.md): it recovers from a pruning round where plain SGD at 0.05, the
    earlier default, did not. Pass ``optimizer="sgd", lr=0.05`` for that behaviour.
    """

    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 64
    momentum: float = 0.0
    seed: int = 0
    optimizer: str = "adam"
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="plain"))

    def train_config(self) -> TrainConfig:
        """The trainer settings of one fine-tuning (validated with the schedule: a bad optimizer, rate
        or lambda is refused here)."""
        config = TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            seed=self.seed,
            optimizer=self.optimizer,
        )
        config.validate()
        self.schedule.validate()
        return config


@dataclass
class PruneResult:
    model: nn.Module  # the pruned model, masks permanent, units removed
    rounds: list[dict[str, Any]]  # one record per round (kept or rolled back)
    base_val: dict[str, float]  # validation figures of the unpruned model
    final_val: dict[str, float]
    params_before: int
    params_after: int
    nonzero_after: int


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


def _capped_masks(test: WaldResult, step: float) -> dict[str, Tensor]:
    """Keep-masks that prune the insignificant weights with the largest p-values, at most a
    fraction ``step`` of the weights still nonzero (over all tested layers)."""
    pvals = flatten(test.pvalues)
    alive = flatten({n: z != 0 for n, z in test.z.items()})  # z = 0 <=> w = 0 (already pruned)
    candidate = ~flatten(test.significant) & alive
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


def _capped_units(test: WaldResult, step: float, blocks: dict[str, int] | None = None) -> dict[str, Tensor]:
    """Jointly insignificant units with the largest p-values, at most ``step`` of each layer
    (:func:`_unit_budget`; ``blocks`` maps a layer to its block size, 1 if absent)."""
    units = {}
    for layer, idx in test.redundant_units().items():
        budget = _unit_budget(test.unit_pvalues[layer].numel(), step, (blocks or {}).get(layer, 1))
        if idx.numel() and budget:
            order = torch.argsort(test.unit_pvalues[layer][idx], descending=True)
            units[layer] = idx[order[:budget]]
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
    channel_multiple: int = 1,
) -> dict[str, int]:
    """Remove units, never a whole layer and never the output layer's units.

    A convolution is left with a multiple of ``channel_multiple`` filters (or all it has):
    onnxruntime's CPU convolutions work on blocks of 8 (AVX2) or 16 (AVX-512) channels, and a layer
    left with, say, 17 or 24 of 32 filters ran no faster, or slower, than the unpruned one
    (docs/results.md). The count is rounded to the nearest multiple: down, by also removing the
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
        if is_convolution(modules[name]) and channel_multiple > 1:
            target = _aligned_width(width - idx.numel(), width, channel_multiple)
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


def fine_tune(
    model: nn.Module, train: Split, val: Split | None, ft: FineTune, kind: LossKind = "ce", progress: bool = False
) -> dict[str, float] | None:
    """Fine-tune under masks: the zero weights of the prunable layers are held at zero by
    ``torch.nn.utils.prune`` hooks."""
    if ft.epochs == 0:
        return None
    masks = {weight_name(name): (m.weight != 0) for name, m in prunable_layers(model).items()}
    apply_masks(model, masks)
    schedule = LambdaSchedule(replace(ft.schedule, kind=kind))
    trainer = Trainer(model, schedule, train, val, ft.train_config(), progress=progress)
    result = trainer.fit()
    make_permanent(model)
    return result.best_val


@dataclass
class PruneConfig:
    """Every option of :func:`prune` (the pruning command's ``--config``/``--set`` keys and the
    recipes' ``[prune]`` table).

    Attributes:
        alpha, method: level and ``statsmodels`` multiple-testing method of the tests.
        estimator: standard-error estimator (``"kfac"``, ``"diagonal"``, ``"full"``).
        max_samples: training samples the Fisher information is estimated on, per round (None: all).
        structured / unstructured: remove whole units / individual weights.
        tolerance: largest allowed rise of validation error over the unpruned model (error-rate
            units, 0.001 = 0.1 percentage point; for regression, of the mean loss).
        max_rounds: test / prune / fine-tune rounds at most.
        step: at most this fraction of the remaining weights (and of each layer's units) is
            removed per round, the least significant first (backward elimination: the standard
            errors of the survivors shrink once their redundant neighbours are gone, so tests are
            repeated on the refitted model rather than trusted for all weights at once). A round
            that breaks the tolerance is rolled back and retried with half the step, down to
            ``min_step``; a kept round doubles it again, up to ``step``. A convolution's share is
            counted in whole blocks of ``channel_multiple`` filters (:func:`_unit_budget`).
        channel_multiple: a convolution is left with a multiple of this many filters (or all it
            has), rounded to the nearest (:func:`_remove_units`): onnxruntime's CPU convolutions
            work in blocks of 8 or 16 channels, so other widths bring little or no speed; 1: off.
        fine_tune: how each round fine-tunes (:class:`FineTune`).
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
    tolerance: float = 0.001
    max_rounds: int = 10
    step: float = 0.5
    min_step: float = 0.05
    channel_multiple: int = 16
    fine_tune: FineTune = field(default_factory=FineTune)

    def validate(self) -> None:
        """Refuse what :func:`prune` cannot run, before any work (NaN fails every comparison)."""
        check_test_options(self.alpha, self.estimator, self.method)
        check_covariance(self.covariance, self.tilt, self.estimator)
        if not (self.structured or self.unstructured):
            raise InputError("nothing to do: both structured and unstructured pruning are off")
        if (
            not (self.tolerance >= 0)
            or isinstance(self.max_rounds, bool)
            or not isinstance(self.max_rounds, int)
            or self.max_rounds < 1
        ):
            raise InputError(f"need tolerance >= 0 and max_rounds >= 1, got {self.tolerance!r}, {self.max_rounds!r}")
        if not 0 < self.step <= 1 or not 0 < self.min_step <= self.step:
            raise InputError(f"need 0 < min_step <= step <= 1, got step={self.step!r}, min_step={self.min_step!r}")
        if (
            isinstance(self.channel_multiple, bool)
            or not isinstance(self.channel_multiple, int)
            or self.channel_multiple < 1
        ):
            raise InputError(f"channel_multiple must be an integer >= 1, got {self.channel_multiple!r}")
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or self.max_samples < 1):
            raise InputError(f"max_samples must be >= 1 (or None: all), got {self.max_samples!r}")
        self.fine_tune.train_config()

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


def prune(
    model: nn.Module,
    train_data: Split | DataLoader | Dataset | tuple[Tensor, Tensor],
    val_data: Split | DataLoader | Dataset | tuple[Tensor, Tensor],
    config: PruneConfig | None = None,
    *,
    kind: LossKind = "ce",
    progress: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` by statistical significance, round by round (module docstring).

    Args:
        model: a trained network (modified in place and returned in the result).
        train_data: data the Fisher information is estimated on (the training data): a
            :class:`anrat.data.Split`, an ``(x, y)`` pair, a ``Dataset`` or a ``DataLoader``
            (:func:`anrat.data.as_split`; read once into memory, moved to the model's device).
            Inputs are used exactly as given: the model sees what it was trained on.
        val_data: held-out data the rollback rule and fine-tuning selection use, in any of those
            forms; not the test data, or the test error afterwards is biased.
        config: the options (:class:`PruneConfig`); keyword ``options`` replace its fields
            (``prune(model, train, val, tolerance=0.002)``).
        kind: the per-sample loss, ``"ce"`` (classification) or ``"lp"`` (regression).
        log: called with each round's record (e.g. to print or write JSONL); a record holds
            ``seconds_left_at_most``, the mean round time so far times the rounds still allowed
            (the loop may stop sooner). :func:`round_line` puts a record in words.
    """
    config = (config or PruneConfig()).with_options(**options)
    config.validate()
    alpha, method, estimator, max_samples = config.alpha, config.method, config.estimator, config.max_samples
    structured, unstructured, tolerance, max_rounds = (
        config.structured,
        config.unstructured,
        config.tolerance,
        config.max_rounds,
    )
    step, min_step, channel_multiple = config.step, config.min_step, config.channel_multiple
    layers = list(prunable_layers(model))
    if not layers:
        raise InputError("nothing to prune: the model has no nn.Linear or nn.Conv2d layer")
    device = next(model.parameters()).device
    train_data, val_data = as_split(train_data, "train_data", device), as_split(val_data, "val_data", device)
    ft = config.fine_tune
    example_input = train_data.x[:2]
    started = time.perf_counter()
    key = "error" if kind == "ce" else "loss"
    base_val = evaluate(model, val_data, kind)
    params_before = count_total(model)
    rounds: list[dict[str, Any]] = []
    max_step = step
    for r in range(1, max_rounds + 1):
        start = time.perf_counter()
        previous = copy.deepcopy(model)
        test = wald_test(
            model,
            train_data,
            loss=kind,
            estimator=estimator,
            alpha=alpha,
            method=method,
            max_samples=max_samples,
            progress=progress,
            covariance=config.covariance,
            tilt=config.tilt,
        )
        test.center_layers(model)  # the weights zeroed are the ones whose H0 was not rejected
        zeroed = _zero_(model, _capped_masks(test, step)) if unstructured else 0
        blocks = {n: channel_multiple for n, m in prunable_layers(model).items() if is_convolution(m)}
        units = _merge_units(_capped_units(test, step, blocks) if structured else {}, _dead_units(model, layers))
        removed_units = _remove_units(model, units, example_input, test.output_layer, channel_multiple)
        layers = list(prunable_layers(model))
        record: dict[str, Any] = {"round": r, "weights_zeroed": zeroed, "units_removed": removed_units}
        if zeroed == 0 and not removed_units:
            record.update({"stopped": "nothing insignificant left", "seconds": time.perf_counter() - start})
            rounds.append(record)
            if log:
                log(record)
            break
        fine_tune(model, train_data, val_data, ft, kind, progress=progress)
        val = evaluate(model, val_data, kind)
        record.update(
            {
                "params": count_total(model),
                "nonzero": count_nonzero(model),
                f"val_{key}": val[key],
                f"base_val_{key}": base_val[key],
                "tolerance": tolerance,
                "max_rounds": max_rounds,
                "seconds": time.perf_counter() - start,
                "seconds_left_at_most": (time.perf_counter() - started) / r * (max_rounds - r),
            }
        )
        record["step"] = step
        if val[key] <= base_val[key] + tolerance:
            step = min(max_step, 2 * step)  # a kept round earns back the step a rollback halved
        else:
            record["rolled_back"] = True
            model = previous
            if step / 2 >= min_step:  # retry with half the step
                step /= 2
            else:
                record["stopped"] = (
                    f"validation {key} {val[key]:.4f} > unpruned {base_val[key]:.4f} + "
                    f"tolerance {tolerance:g} at the smallest step"
                )
                rounds.append(record)
                if log:
                    log(record)
                break
        rounds.append(record)
        if log:
            log(record)
    return PruneResult(
        model,
        rounds,
        base_val,
        evaluate(model, val_data, kind),
        params_before,
        count_total(model),
        count_nonzero(model),
    )


def round_line(record: dict[str, Any]) -> str:
    """One plain line for a round's record of :func:`prune` (for logs and terminals alike)."""
    of = f"/{record['max_rounds']}" if "max_rounds" in record else ""
    parts = [f"round {record['round']}{of}: zeroed {record['weights_zeroed']:,} weights"]
    if record.get("units_removed"):
        parts.append("removed units " + ", ".join(f"{k}: {v}" for k, v in record["units_removed"].items()))
    if "nonzero" in record:
        parts.append(f"{record['nonzero']:,} nonzero of {record['params']:,} parameters")
    key = "error" if "val_error" in record else "loss"
    if f"val_{key}" in record:
        value, base = record[f"val_{key}"], record.get(f"base_val_{key}")
        fmt = (lambda v: f"{v:.2%}") if key == "error" else (lambda v: f"{v:.4g}")  # noqa: E731
        parts.append(f"validation {key} {fmt(value)}" + (f" (unpruned {fmt(base)})" if base is not None else ""))
    parts.append("rolled back" if record.get("rolled_back") else "kept" if "params" in record else "")
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
    start = time.perf_counter()
    scores = scorer(model, train_data)
    total = sum(s.numel() for s in scores.values())
    zeroed = _zero_(model, masks_at_sparsity(scores, fraction_removed))
    layers = list({name.rsplit(".", 1)[0] for name in scores})
    output = output_layer(model, train_data.x[:2])
    removed_units = _remove_units(model, _dead_units(model, layers), train_data.x[:2], output)
    fine_tune(model, train_data, val_data, fine_tune_config or FineTune(), kind)
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
