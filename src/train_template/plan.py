"""The training plan: how many optimizer steps a run takes, derived from the real loader.

Pure arithmetic on purpose: no Lightning, no litdata, so it can be tested exhaustively
in microseconds. ``planning.plan_run`` is the one caller: at ``fit`` setup and in the
``plan`` command it hands this module a :class:`TrainLayout` (what every rank's train
loader yields, measured on the real data) and the trainer's numbers.

How Lightning steps (2.x): each rank's train loader yields ``batches_per_epoch``
batches; the optimizer steps after every ``accumulate_grad_batches`` batches *and*
on the last batch of the epoch, even when that accumulation window is short. So
``steps_per_epoch = ceil(batches_per_epoch / accumulate_grad_batches)``, which the
usual ``ceil(samples / (batch * accumulate * world))`` gets wrong whenever a short
window or drop_last is involved.

Precedence of the training length (most specific wins, printed in the plan):
``max_steps`` (optimizer steps) > ``max_samples`` (global samples) or ``max_tokens``
(global tokens, token datasets) > ``max_epochs``. Setting more than one of
``max_steps``, ``max_samples`` and ``max_tokens`` is a conflict and an error.

A stream without a length (an ``IterableDataset`` with no ``__len__``: Hugging Face
streaming, webdataset, a bucket reader) has ``batches_per_epoch=None``: its length must be
given in steps, samples or tokens, and the plan's epoch fields are unknown (``None``); the
stream is one pass that must last the run (``steps.RunMachinery`` stops with one line
when it runs dry).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from train_template.errors import UserError


class PlanError(UserError, ValueError):
    """A plan input the user has to change; the message is one line naming the setting."""


@dataclass(frozen=True)
class WarmupSetting:
    """Warmup in optimizer steps, epochs or a fraction of the run; converted to steps."""

    steps: int | None = None
    fraction: float | None = None
    epochs: float | None = None

    def to_steps(self, max_steps: int, steps_per_epoch: int | None) -> int:
        """Most specific unit wins: steps, then epochs, then fraction (a config's default
        fraction stays overridable from the command line)."""
        if self.steps is not None:
            if self.steps < 0:
                raise PlanError(
                    f"--lr_schedule.warmup_steps={self.steps} is negative: use 0 or more"
                )
            return self.steps
        if self.epochs is not None:
            if self.epochs < 0:
                raise PlanError(
                    f"--lr_schedule.warmup_epochs={self.epochs} is negative: use 0 or more"
                )
            if steps_per_epoch is None:
                raise PlanError(
                    f"--lr_schedule.warmup_epochs={self.epochs}: the train stream has no "
                    "epochs (no length): use --lr_schedule.warmup_steps or warmup_fraction"
                )
            return math.ceil(self.epochs * steps_per_epoch)
        if self.fraction is not None:
            if not 0 <= self.fraction < 1:
                raise PlanError(
                    f"--lr_schedule.warmup_fraction={self.fraction} is outside [0, 1): "
                    "use a fraction of the run, e.g. 0.05"
                )
            return int(round(self.fraction * max_steps))
        return 0


@dataclass(frozen=True)
class TrainLayout:
    """What every rank's own train loader yields per epoch: the one layout protocol.

    A data module that knows it without building a loader (``StreamingDataModule``)
    returns it from ``train_layout(world_size)``; any other data source is measured
    (``planning.measured_layout``). ``order`` holds the data settings that fix which
    samples come in which order (seed, shuffle, ...): a resume must keep them.
    """

    batch_size: int
    # Per rank, before limit_train_batches (None: a stream without a length).
    rank_batches: tuple[int | None, ...]
    rank_samples: tuple[int | None, ...]  # the rank's own samples (padding not counted)
    tokens_per_sample: int | None = None
    order: tuple[tuple[str, object], ...] = ()

    @property
    def world_size(self) -> int:
        return len(self.rank_batches)

    @property
    def batches_per_rank(self) -> int | None:
        """Every rank runs the longest rank's count: short ranks are padded to it."""
        if any(batches is None for batches in self.rank_batches):
            return None
        return max(self.rank_batches)


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that depends on world size, accumulation and loader length, in one place."""

    world_size: int
    devices: int
    num_nodes: int
    batch_size: int
    accumulate_grad_batches: int
    global_batch_size: int
    # Per rank, after sharding, drop_last and limit_train_batches. The epoch fields are
    # None for a stream without a length.
    batches_per_epoch: int | None
    samples_per_epoch: int | None  # distinct samples, all ranks together (padding not counted)
    steps_per_epoch: int | None
    epochs: int | None
    max_steps: int
    warmup_steps: int
    length_from: (
        str  # which setting decided the length: max_steps, max_samples, max_tokens, max_epochs
    )
    # Token datasets only (None otherwise): tokens one sample trains on, per step, budget.
    tokens_per_sample: int | None = None
    global_tokens_per_step: int | None = None
    max_tokens: int | None = None
    # The data settings that fix the sample order (TrainLayout.order), kept for resume.
    data_order: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """All fields; the token fields only for token datasets."""
        fields = dataclasses.asdict(self)
        if self.tokens_per_sample is None:
            for key in ("tokens_per_sample", "global_tokens_per_step", "max_tokens"):
                fields.pop(key)
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# What a resume must keep equal, the one list, checked in one place (resume_changes):
# the world size, the data settings that fix the sample order (data_order, shown as
# --data.* options), then every number of the remaining schedule. The dataset size
# enters through batches_per_epoch and samples_per_epoch.
RESUME_KEYS = (
    "world_size",
    "data_order",
    "batch_size",
    "accumulate_grad_batches",
    "batches_per_epoch",
    "samples_per_epoch",
    "max_steps",
    "warmup_steps",
)
# In the global sample order (--data.elastic) the layout may change: the run's global
# batch, its epochs and its schedule must not.
ELASTIC_RESUME_KEYS = (
    "data_order",
    "global_batch_size",
    "steps_per_epoch",
    "samples_per_epoch",
    "max_steps",
    "warmup_steps",
)


def make_plan(
    *,
    batches_per_epoch: int | None,
    batch_size: int,
    accumulate_grad_batches: int,
    devices: int = 1,
    num_nodes: int = 1,
    rank_samples: Sequence[int] | None = None,
    data_order: dict | None = None,
    max_epochs: int | None = None,
    max_steps: int = -1,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    tokens_per_sample: int | None = None,
    warmup: WarmupSetting = WarmupSetting(),
) -> TrainingPlan:
    """Derive the plan; raises PlanError with a one-line fix for impossible inputs.

    ``rank_samples`` is what each rank's own loader yields per epoch, without padding
    (defaults to full batches everywhere); it only matters for reporting and for
    ``max_samples``.
    """
    if batch_size < 1:
        raise PlanError(f"--data.batch_size={batch_size}: the batch size must be at least 1")
    if accumulate_grad_batches < 1:
        raise PlanError(
            f"--trainer.accumulate_grad_batches={accumulate_grad_batches}: must be at least 1"
        )
    if devices < 1 or num_nodes < 1:
        raise PlanError(
            f"--trainer.devices={devices} --trainer.num_nodes={num_nodes}: both must be >= 1"
        )
    world_size = devices * num_nodes
    global_batch_size = batch_size * accumulate_grad_batches * world_size
    if batches_per_epoch is None:  # a stream without a length: no epochs
        samples_per_epoch = steps_per_epoch = None
    else:
        if batches_per_epoch < 1:
            raise PlanError(
                f"the train loader yields {batches_per_epoch} batches per rank per epoch "
                f"(batch_size={batch_size}, world_size={world_size}): use a smaller "
                "--data.batch_size, fewer devices, more data, or --data.drop_last false"
            )
        rank_cap = batches_per_epoch * batch_size  # limit_train_batches may cut a rank short
        if rank_samples is None:
            rank_samples = [rank_cap] * world_size
        if len(rank_samples) != world_size:
            raise ValueError(
                f"{len(rank_samples)} per-rank sample counts for world size {world_size}"
            )
        samples_per_epoch = sum(min(samples, rank_cap) for samples in rank_samples)
        steps_per_epoch = math.ceil(batches_per_epoch / accumulate_grad_batches)

    _check_lengths(max_steps, max_samples, max_tokens, tokens_per_sample)
    if max_steps is not None and max_steps > 0:
        length_from = "max_steps"
        total_steps = max_steps
    elif max_samples is not None or max_tokens is not None:
        length_from = "max_samples" if max_samples is not None else "max_tokens"
        budget = max_samples if max_samples is not None else -(-max_tokens // tokens_per_sample)
        total_steps = _steps_for_samples(
            budget,
            samples_per_epoch,
            steps_per_epoch,
            batch_size * world_size,
            accumulate_grad_batches,
        )
    elif steps_per_epoch is None:
        raise PlanError(
            f"--trainer.max_epochs={max_epochs}: the train loader has no length (a stream), so "
            "it has no epochs: give the length as --trainer.max_steps, --plan.max_samples or "
            "--plan.max_tokens"
        )
    else:
        if max_epochs is None or max_epochs < 1:
            raise PlanError(
                f"--trainer.max_epochs={max_epochs} trains nothing: set a positive "
                "--trainer.max_epochs, --trainer.max_steps or --plan.max_samples"
            )
        length_from = "max_epochs"
        total_steps = max_epochs * steps_per_epoch
    epochs = None if steps_per_epoch is None else math.ceil(total_steps / steps_per_epoch)

    warmup_steps = warmup.to_steps(total_steps, steps_per_epoch)
    if warmup_steps >= total_steps and warmup_steps > 0:
        raise PlanError(
            f"warmup ({warmup_steps} steps) is not shorter than training ({total_steps} steps): "
            "lower the --lr_schedule.warmup_* setting or train longer"
        )
    return TrainingPlan(
        world_size=world_size,
        devices=devices,
        num_nodes=num_nodes,
        batch_size=batch_size,
        accumulate_grad_batches=accumulate_grad_batches,
        global_batch_size=global_batch_size,
        batches_per_epoch=batches_per_epoch,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        max_steps=total_steps,
        warmup_steps=warmup_steps,
        length_from=length_from,
        tokens_per_sample=tokens_per_sample,
        global_tokens_per_step=(
            None if tokens_per_sample is None else global_batch_size * tokens_per_sample
        ),
        max_tokens=max_tokens if tokens_per_sample is not None else None,
        data_order=dict(data_order or {}),
    )


def _check_lengths(max_steps, max_samples, max_tokens, tokens_per_sample) -> None:
    """One training length at most, and none that trains nothing."""
    lengths = {
        "--trainer.max_steps": max_steps if max_steps is not None and max_steps > 0 else None,
        "--plan.max_samples": max_samples,
        "--plan.max_tokens": max_tokens,
    }
    given = [f"{name}={value}" for name, value in lengths.items() if value is not None]
    if len(given) > 1:
        raise PlanError(f"{' and '.join(given)} are set: keep only one training length")
    if max_steps is not None and max_steps not in (-1, None) and max_steps < 1:
        raise PlanError(
            f"--trainer.max_steps={max_steps} trains nothing: use a positive count, or -1 for unset"
        )
    if max_samples is not None and max_samples < 1:
        raise PlanError(f"--plan.max_samples={max_samples}: must be at least 1")
    if max_tokens is not None:
        if tokens_per_sample is None:
            raise PlanError(
                f"--plan.max_tokens={max_tokens}: the data module yields no token samples "
                "(no tokens_per_sample): use --plan.max_samples or --trainer.max_epochs"
            )
        if max_tokens < 1:
            raise PlanError(f"--plan.max_tokens={max_tokens}: must be at least 1")


def _steps_for_samples(
    max_samples: int,
    samples_per_epoch: int | None,
    steps_per_epoch: int | None,
    samples_per_global_batch: int,
    accumulate_grad_batches: int,
) -> int:
    """Optimizer steps until at least ``max_samples`` samples have been consumed.

    Whole epochs first, then the whole batches the remainder needs; the step count
    follows Lightning's rule for the partial epoch too. A stream (no epochs) is all
    remainder.
    """
    if samples_per_epoch is None:
        full_epochs, remainder = 0, max_samples
    else:
        full_epochs, remainder = divmod(max_samples, samples_per_epoch)
    remainder_batches = math.ceil(remainder / samples_per_global_batch)
    full_steps = full_epochs * steps_per_epoch if full_epochs else 0
    return full_steps + math.ceil(remainder_batches / accumulate_grad_batches)


def accumulation_for(
    global_batch_size: int, world_size: int, batch_size: int, accumulate_grad_batches: int | None
) -> int:
    """The accumulation that makes ``global_batch_size`` at this world size and per-device
    batch (``--plan.global_batch_size``); one line naming what works when none does."""
    per_step = world_size * batch_size
    if global_batch_size < 1 or global_batch_size % per_step:
        sizes = [
            b for b in range(1, global_batch_size + 1) if global_batch_size % (world_size * b) == 0
        ]
        # The largest that fits where this batch did (memory), else the smallest there is.
        fitting = [b for b in sizes if b <= batch_size]
        suggestion = fitting[-1] if fitting else (sizes[0] if sizes else None)
        hint = (
            f"use a --data.batch_size that divides it over {world_size} rank(s), e.g. {suggestion}"
            if suggestion
            else f"use a global batch that {world_size} rank(s) can share"
        )
        raise PlanError(
            f"--plan.global_batch_size={global_batch_size} is not a whole number of "
            f"world size x batch per device = {world_size} x {batch_size} = {per_step}: {hint}"
        )
    accumulate = global_batch_size // per_step
    if accumulate_grad_batches not in (None, 1, accumulate):
        raise PlanError(
            f"--plan.global_batch_size={global_batch_size} needs accumulation {accumulate} at "
            f"world size {world_size} and batch {batch_size}, but "
            f"--trainer.accumulate_grad_batches={accumulate_grad_batches}: set only one of them"
        )
    return accumulate


def accumulation_window_size(batch_idx: int, batches_per_epoch: int, accumulate: int) -> int:
    """How many batches the accumulation window containing ``batch_idx`` really has.

    Every window is ``accumulate`` batches long except possibly the last one of the
    epoch, which Lightning closes early on the final batch.
    """
    window_start = (batch_idx // accumulate) * accumulate
    return min(accumulate, batches_per_epoch - window_start)


def resume_changes(saved: dict, current: TrainingPlan) -> list[str]:
    """What differs between a checkpoint's plan and this launch's, in ``RESUME_KEYS``
    order; data settings and the batch size are named as their ``--data.*`` options."""
    now = current.to_dict()
    elastic = saved.get("data_order", {}).get("elastic") and now["data_order"].get("elastic")
    changes = []
    for key in ELASTIC_RESUME_KEYS if elastic else RESUME_KEYS:
        if key not in saved or saved[key] == now[key]:
            continue
        if key == "data_order":
            changes += [
                f"--data.{name} {saved[key].get(name)} -> {value}"
                for name, value in now[key].items()
                if name in saved[key] and saved[key][name] != value
            ]
        elif key == "batch_size":
            changes.append(f"--data.batch_size {saved[key]} -> {now[key]}")
        else:
            changes.append(f"{key} {saved[key]} -> {now[key]}")
    return changes


def format_plan(plan: TrainingPlan, planned_schedule: bool = True) -> str:
    """The table printed on rank 0 when fit starts and by the dry run. Warmup is shown
    only when the module's scheduler is the template's planned one (``planned_schedule``);
    any other scheduler decides its own warmup."""
    rows = [
        ("world size", f"{plan.world_size} ({plan.num_nodes} node(s) x {plan.devices} device(s))"),
        ("batch size per device", plan.batch_size),
        ("accumulate grad batches", plan.accumulate_grad_batches),
        ("global batch size", plan.global_batch_size),
        ("batches per epoch (per rank)", _known(plan.batches_per_epoch)),
        ("samples per epoch (all ranks)", _known(plan.samples_per_epoch)),
        ("optimizer steps per epoch", _known(plan.steps_per_epoch)),
        ("epochs", _known(plan.epochs)),
        ("max steps", f"{plan.max_steps} (length from {plan.length_from})"),
        (
            "warmup steps",
            plan.warmup_steps if planned_schedule else "set by the module's scheduler",
        ),
    ]
    if plan.tokens_per_sample is not None:
        rows += [
            ("tokens per sample", plan.tokens_per_sample),
            ("tokens per optimizer step", plan.global_tokens_per_step),
            ("tokens in the run", plan.max_steps * plan.global_tokens_per_step),
        ]
    width = max(len(name) for name, _ in rows)
    lines = ["Training plan", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _known(value: int | None) -> int | str:
    return "unknown (a stream without a length)" if value is None else value
