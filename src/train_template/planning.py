"""The training plan of a run, from the real data: one path for ``fit`` and ``plan``.

:func:`plan_run` is the only way a plan is made. ``fit`` calls it at ``setup`` (through
``steps.RunMachinery``) with the Trainer's numbers; the ``plan`` command calls it with
the config's numbers for any world size. Both read the data's :class:`TrainLayout`:

- a data module with ``train_layout(world_size)`` (``StreamingDataModule``, litdata's own
  length rule, no loader built) is asked;
- any other source is measured by :func:`measured_layout` on a throwaway loader from
  ``train_dataloader()``, split as Lightning's ``DistributedSampler`` splits it.

The plan must exist before ``configure_optimizers`` (a module sizes its schedule from
``trainer.estimated_stepping_batches``, as Lightning's docs show), and the loader Lightning
trains on must not be built that early: one built before the checkpoint is restored never
gets its saved position back (Lightning #20550). At train start the plan is checked
against the real loader on every rank (:func:`check_loader`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from train_template import seam
from train_template.elastic import loader_layout, ordered_train_loader
from train_template.errors import UserError
from train_template.plan import (
    TrainingPlan,
    TrainLayout,
    accumulation_for,
    make_plan,
    resume_changes,
)
from train_template.schedule import LRSchedule


@dataclass
class PlanOptions:
    """The training plan's own inputs (``--plan.*``); the LR curve is ``--lr_schedule.*``."""

    max_samples: int | None = None
    """Train on this many samples (all ranks together) instead of ``--trainer.max_epochs``;
    rounded up to whole optimizer steps."""
    max_tokens: int | None = None
    """Train on this many tokens (all ranks together; token datasets); rounded up to whole
    optimizer steps."""
    global_batch_size: int | None = None
    """Samples per optimizer step, all ranks together: the accumulation is derived from the
    world size and the per-device batch (``--trainer.accumulate_grad_batches`` then unset)."""
    scale_partial_accumulation: bool = True
    """Give the epoch's last, short accumulation window the mean gradient of the batches it
    holds (Lightning divides its loss by the full window size, Lightning #19987)."""


class PlannedTrainer(pl.Trainer):
    """A Trainer that holds the run's plan; ``estimated_stepping_batches`` is its ``max_steps``.

    Lightning's own estimate builds the train loader when it is read in
    ``configure_optimizers`` (too early for an exact resume) and ignores sample or token
    budgets. Everything else is Lightning's Trainer unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_plan: TrainingPlan | None = None  # set at fit setup
        self.lr_schedule: LRSchedule | None = None  # the run's --lr_schedule
        # Lightning splits a map-style loader over ranks only with this on; the template
        # then trains a plain map-style loader in the global order instead (elastic.py).
        self.use_distributed_sampler = kwargs.get("use_distributed_sampler", True)
        if self.use_distributed_sampler:
            seam.replace_train_sampler(self, lambda loader: ordered_train_loader(loader, self))

    @property
    def estimated_stepping_batches(self) -> int | float:
        if self.training_plan is not None:
            return self.training_plan.max_steps
        return super().estimated_stepping_batches


def plan_run(
    source: Any,
    *,
    world_size: int,
    num_nodes: int,
    accumulate_grad_batches: int,
    limit_train_batches: int | float | None,
    max_epochs: int | None,
    max_steps: int,
    options: PlanOptions,
    schedule: LRSchedule,
    distributed_sampler: bool = True,
) -> TrainingPlan:
    """The plan for ``source`` (the data module, or the module that has the loaders)."""
    layout = train_layout_of(source, world_size, accumulate_grad_batches, distributed_sampler)
    if options.global_batch_size is not None:
        derived = accumulation_for(
            options.global_batch_size, world_size, layout.batch_size, accumulate_grad_batches
        )
        if derived != accumulate_grad_batches:
            # A global-order layout depends on the accumulation (whole global batches).
            layout = train_layout_of(source, world_size, derived, distributed_sampler)
        accumulate_grad_batches = derived
    length = layout.batches_per_rank
    # A stream without a length has no epochs, unless an int limit_train_batches makes them.
    batches = seam.limited_batches(math.inf if length is None else length, limit_train_batches)
    sized = length is not None
    return make_plan(
        batches_per_epoch=None if math.isinf(batches) else int(batches),
        batch_size=layout.batch_size,
        accumulate_grad_batches=accumulate_grad_batches,
        devices=world_size // num_nodes,
        num_nodes=num_nodes,
        rank_samples=layout.rank_samples if sized else None,
        data_order=dict(layout.order),
        tokens_per_sample=layout.tokens_per_sample,
        max_epochs=max_epochs,
        max_steps=max_steps,
        max_samples=options.max_samples,
        max_tokens=options.max_tokens,
        warmup=schedule.warmup,
    )


def train_layout_of(
    source: Any, world_size: int, accumulate_grad_batches: int = 1, distributed_sampler: bool = True
) -> TrainLayout:
    """The data's own ``train_layout(world_size, accumulate_grad_batches)``, or the measured one."""
    if callable(getattr(source, "train_layout", None)):
        return source.train_layout(world_size, accumulate_grad_batches=accumulate_grad_batches)
    return measured_layout(source, world_size, accumulate_grad_batches, distributed_sampler)


def measured_layout(
    source: Any, world_size: int, accumulate_grad_batches: int = 1, distributed_sampler: bool = True
) -> TrainLayout:
    """Layout of a train loader from ``train_dataloader()``: a plain map-style loader
    trains in the global order (``elastic.py``); one with a sampler of its own at one
    process has its own length, on several each rank's share as Lightning's
    ``DistributedSampler`` makes it (every rank padded to ``ceil(len(sampler) /
    world_size)`` samples)."""
    loader = source.train_dataloader()
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:
        raise UserError("the train loader has no batch_size: the plan needs a batched loader")
    tokens = getattr(source, "tokens_per_sample", None)
    if distributed_sampler:
        layout = loader_layout(loader, world_size, accumulate_grad_batches, tokens)
        if layout is not None:
            return layout
    try:
        length = len(loader)
        sampled = len(loader.sampler) if loader.sampler is not None else None
    except TypeError:  # a stream without a length: each rank reads its own share
        return TrainLayout(batch_size, (None,) * world_size, (None,) * world_size, tokens)
    if world_size == 1 or not distributed_sampler or sampled is None:
        samples = sampled if sampled is not None else length * batch_size
        return TrainLayout(batch_size, (length,) * world_size, (samples,) * world_size, tokens)
    samples = math.ceil(sampled / world_size)
    full, partial = divmod(samples, batch_size)
    batches = full + int(partial > 0 and not loader.drop_last)
    return TrainLayout(batch_size, (batches,) * world_size, (samples,) * world_size, tokens)


def plan_of_trainer(
    trainer: PlannedTrainer, pl_module: pl.LightningModule, options: PlanOptions
) -> TrainingPlan:
    """:func:`plan_run` with a fit's Trainer numbers; the Trainer then accumulates as the
    plan says (``--plan.global_batch_size`` derives it)."""
    plan = plan_run(
        trainer.datamodule if trainer.datamodule is not None else pl_module,
        world_size=trainer.world_size,
        num_nodes=trainer.num_nodes,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        limit_train_batches=trainer.limit_train_batches,
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
        options=options,
        schedule=trainer.lr_schedule or LRSchedule(),
        distributed_sampler=getattr(trainer, "use_distributed_sampler", True),
    )
    # Lightning reads this attribute at every batch; set before the loop starts.
    trainer.accumulate_grad_batches = plan.accumulate_grad_batches
    return plan


def is_elastic(plan: dict | TrainingPlan) -> bool:
    """A plan in the global sample order (``--data.elastic``): resumable on any layout."""
    order = plan.get("data_order", {}) if isinstance(plan, dict) else plan.data_order
    return bool(order.get("elastic"))


def check_resume(saved: dict | None, plan: TrainingPlan) -> None:
    """Refuse a checkpoint whose run had another plan (same decision on every rank: the
    checkpoint and the plan are the same everywhere)."""
    if saved is not None and (changes := resume_changes(saved, plan)):
        raise UserError(
            f"the checkpoint was trained with another plan ({'; '.join(changes)}): resume with "
            "the original devices, num_nodes, batch size, accumulation, data settings and "
            "length, or start a new run in a new --trainer.default_root_dir"
        )


def check_loader(trainer: pl.Trainer, plan: TrainingPlan) -> None:
    """The real loader against the plan, on every rank, before the first step."""
    if plan.batches_per_epoch is None:
        return  # a stream without a length: nothing to count; check_stream_lasted at its end
    counts = _batch_counts_of_all_ranks(trainer, trainer.num_training_batches)
    # Every rank reaches the same decision: the gathered counts are the same everywhere.
    if len(set(counts)) > 1:
        raise UserError(
            f"ranks would train on different batch counts per epoch {counts}, which hangs "
            "DDP: make train_dataloader yield the same count on every rank (as "
            "StreamingDataModule does by padding short ranks)"
        )
    if counts[0] != plan.batches_per_epoch:
        raise UserError(
            f"the train loader yields {counts[0]} batches per epoch but the plan measured "
            f"{plan.batches_per_epoch} at setup: make train_dataloader() return the same "
            "loader on every call (and train_layout match it)"
        )


def _batch_counts_of_all_ranks(trainer: pl.Trainer, batches: int | float) -> list[int]:
    # A rank with fewer batches would leave the others waiting forever in the gradient
    # all-reduce of the step it never takes. strategy.all_gather puts the tensor on the
    # root device (NCCL needs it there).
    if trainer.world_size == 1:
        return [int(batches)]
    local = torch.tensor([int(batches)], device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(local).reshape(-1).tolist()


def check_stream_lasted(trainer: pl.Trainer, plan: TrainingPlan) -> None:
    """At the end of a stream's one pass: it must have lasted the whole planned length."""
    if plan.batches_per_epoch is None and trainer.global_step < plan.max_steps:
        raise UserError(
            f"the train stream ran dry after {trainer.global_step} of the planned "
            f"{plan.max_steps} optimizer steps ({plan.length_from}): give a longer stream, or "
            f"a length it can fill (--trainer.max_steps {trainer.global_step} or less); the "
            "last checkpoint is kept"
        )
