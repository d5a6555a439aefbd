"""The members of a batched run (:mod:`anrat.batched`): their settings, and what one stack can train.

A :class:`Member` stands for one single-model run (a :class:`~anrat.trainer.TrainConfig` and a
:class:`~anrat.schedules.ScheduleConfig`); :func:`grid` builds the members of seeds x schedules x
training axes. :func:`check_members` refuses members one stack cannot train together, and
:func:`unsupported_option` names the option of a single-model run that the batched engine does not
train: the one check :class:`anrat.run.RunConfig` and :class:`~anrat.batched.BatchedTrainer` share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from typing import Any

from anrat.errors import InputError
from anrat.functional import LossKind
from anrat.schedules import ScheduleConfig
from anrat.trainer import TrainConfig

OPTIMIZERS = ("sgd", "adam")  # the update rules of anrat.stacked_optim
SHARED_TRAIN_FIELDS = ("epochs", "batch_size", "optimizer", "eval_batch_size")
RESUMABLE_TRAIN_FIELDS = ("epochs",)  # a checkpoint resumes with other values of these


@dataclass
class Member:
    """One training of the grid: the settings of the single-model run it stands for."""

    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="plain"))


def grid(
    train: TrainConfig, schedules: Sequence[ScheduleConfig], seeds: Sequence[int], **train_axes: Sequence[Any]
) -> list[Member]:
    """The members of ``seeds x schedules x train_axes`` (e.g. ``lr=[0.1, 0.5]``), seed slowest.

    Each member's TrainConfig is ``train`` with its seed and its values of the axes.
    """
    names = list(train_axes)
    members = []
    for seed, schedule, *values in product(seeds, schedules, *(train_axes[n] for n in names)):
        members.append(Member(replace(train, seed=seed, **dict(zip(names, values))), replace(schedule)))
    return members


def check_members(members: Sequence[Member]) -> tuple[LossKind, str]:
    """Validate the members and return the shared loss kind and optimizer name."""
    if not members:
        raise InputError("a batched run needs at least one member")
    first = members[0]
    for k, m in enumerate(members):
        m.train.validate()
        m.schedule.validate()
        for name in SHARED_TRAIN_FIELDS:
            if str(getattr(m.train, name)).lower() != str(getattr(first.train, name)).lower():
                raise InputError(
                    f"member {k} has {name}={getattr(m.train, name)!r}, member 0 "
                    f"{getattr(first.train, name)!r}: all members of a batched run share {name}"
                )
        if m.schedule.kind != first.schedule.kind:
            raise InputError(
                f"member {k} has loss kind {m.schedule.kind!r}, member 0 {first.schedule.kind!r}: "
                "all members of a batched run share the loss kind"
            )
        option = unsupported_option(m.train, m.schedule)
        if option is not None:
            raise InputError(f"member {k}: {option} is not supported by the batched trainer")
    return first.schedule.kind, first.train.optimizer.lower()


def unsupported_option(train: TrainConfig, schedule: ScheduleConfig) -> str | None:
    """The option of a single-model run that the batched trainer cannot train, named with its
    dotted key (``"amp (train.amp=True)"``); None when it can."""
    if train.amp:
        return "amp (train.amp=True)"
    if train.compile is not None:
        return f"compile (train.compile={train.compile!r})"
    if train.optimizer.lower() not in OPTIMIZERS:
        return f"the optimizer {train.optimizer!r} (train.optimizer; supported: {', '.join(OPTIMIZERS)})"
    if schedule.class_weight is not None:
        return "class_weight (schedule.class_weight)"
    if train.lr_decay == "cosine_step":
        return "lr_decay='cosine_step' (train.lr_decay; 'cosine' is stepped per epoch)"
    return None


def member_settings(members: Sequence[Member]) -> list[dict[str, Any]]:
    """Each member's settings as a checkpoint stores them (``members``)."""
    return [{"train": asdict(m.train), "schedule": asdict(m.schedule)} for m in members]


def fixed_settings(settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a checkpoint must share with the run that resumes it: the members' settings less the
    options a resumed run may change (``epochs``: more epochs continue the run)."""
    return [{**m, "train": {n: v for n, v in m["train"].items() if n not in RESUMABLE_TRAIN_FIELDS}} for m in settings]


__all__ = ["OPTIMIZERS", "Member", "check_members", "fixed_settings", "grid", "member_settings", "unsupported_option"]
